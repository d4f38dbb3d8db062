"""The decentralized mixture of experts: expert servers and the modules that call them.

- `apiary.moe.experts`: expert kinds (`ffn`, `transformer`), `ExpertSpec`, `Expert`;
- `apiary.moe.runtime`: dynamic batching of requests per expert (`BatchingRuntime`);
- `apiary.moe.server`: the `apiary.moe.Experts` gRPC service (`ExpertServer`);
- `apiary.moe.client`: `RemoteExpert`, a torch module whose forward and backward run remotely.
"""

from apiary.moe.client import RemoteExpert, background_loop
from apiary.moe.experts import EXPERT_KINDS, Expert, ExpertSpec, build_expert
from apiary.moe.runtime import BatchingRuntime, BatchTooLarge, QueueFull
from apiary.moe.server import EXPERTS_SERVICE, ExpertServer, UnknownExpert

__all__ = [
    "EXPERTS_SERVICE",
    "EXPERT_KINDS",
    "BatchTooLarge",
    "BatchingRuntime",
    "Expert",
    "ExpertServer",
    "ExpertSpec",
    "QueueFull",
    "RemoteExpert",
    "UnknownExpert",
    "background_loop",
    "build_expert",
]
