"""The decentralized mixture of experts: expert servers and the layers that call them.

Server side:
- `apiary.moe.kinds`: expert kinds (`ffn`, `transformer`, the test kinds `slow` and `failing`,
  or `package.module:factory`);
- `apiary.moe.schema`: `ExpertSchema` (an expert's positional and keyword inputs and outputs);
- `apiary.moe.experts`: `ExpertSpec`, `Expert` (a module with its own optimizer);
- `apiary.moe.training`: `ExpertTraining` (an expert's optimizer and learning-rate schedule);
- `apiary.moe.batching`: dynamic batching of requests per expert (`BatchingRuntime`);
- `apiary.moe.server`: the `apiary.moe.Experts` gRPC service (`ExpertServer`);
- `apiary.moe.finite`: the check that keeps NaN and infinity out of an expert;
- `apiary.moe.checkpoints`, `apiary.moe.declaration`, `apiary.moe.names`, `apiary.moe.metrics`.

Client side:
- `apiary.moe.client`: `RemoteExpert`, a torch module whose forward and backward run remotely;
- `apiary.moe.mixture`: `RemoteMixtureOfExperts` (beam search over the DHT, one call per
  server per pass, fault tolerance from `apiary.moe.dispatch`, failing servers skipped for a
  while by `apiary.moe.bans`);
- `apiary.moe.switch`: `RemoteSwitchMixtureOfExperts` (top-1 routing, load-balancing loss);
- `apiary.moe.wire_dtypes`: the dtype each expert's calls carry (its schema's, learnt from its answers).
"""

from apiary.moe.batching import BatchingRuntime, BatchTooLarge, QueueFull
from apiary.moe.beam_search import ExpertChoice, beam_search
from apiary.moe.client import RemoteExpert, background_loop, run_sync
from apiary.moe.dispatch import ExpertsUnavailable, FaultTolerance
from apiary.moe.experts import Expert, ExpertSpec, build_expert
from apiary.moe.kinds import BUILT_IN_KINDS, ExpertKind, resolve_kind
from apiary.moe.mixture import RemoteMixtureOfExperts
from apiary.moe.names import expand_expert_names
from apiary.moe.schema import ExpertSchema, TensorSchema
from apiary.moe.server import EXPERTS_SERVICE, ExpertServer, UnknownExpert
from apiary.moe.switch import RemoteSwitchMixtureOfExperts
from apiary.moe.training import ExpertTraining

__all__ = [
    "BUILT_IN_KINDS",
    "EXPERTS_SERVICE",
    "BatchTooLarge",
    "BatchingRuntime",
    "Expert",
    "ExpertChoice",
    "ExpertKind",
    "ExpertSchema",
    "ExpertServer",
    "ExpertSpec",
    "ExpertTraining",
    "ExpertsUnavailable",
    "FaultTolerance",
    "QueueFull",
    "RemoteExpert",
    "RemoteMixtureOfExperts",
    "RemoteSwitchMixtureOfExperts",
    "TensorSchema",
    "UnknownExpert",
    "background_loop",
    "beam_search",
    "build_expert",
    "expand_expert_names",
    "resolve_kind",
    "run_sync",
]
