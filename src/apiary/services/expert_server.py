"""The expert-server service: hosts experts, trains them on the requests that reach them,
checkpoints them and declares them in the DHT.

One process hosts many experts of one kind and hidden size, named on a grid (`ffn.0.3`): all
the names given, or (`num_experts`) that many of them chosen among those no other server
declares (`apiary.moe.claiming`), once the DHT is reached. Its
public port serves `apiary.moe.Experts` (and, with an embedded DHT node, the DHT). Every
`declare_period` seconds it declares its experts in the DHT (through the participant's dht
service with `dht_local`, or its own node joining `initial_peers`), each declaration living
three periods, so a dead server's experts disappear from searches on their own. With a
checkpoint directory, every expert's weights and optimizer state are saved every
`checkpoint_period` seconds and at shutdown, and loaded at start.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.api import DHTClient
from apiary.moe.activations import ActivationCache
from apiary.moe.batching import BatchingRuntime
from apiary.moe.claiming import claim_free_experts
from apiary.moe.declaration import keep_declared
from apiary.moe.experts import Expert, ExpertSpec
from apiary.moe.kinds import resolve_kind
from apiary.moe.metrics import ExpertServerMetrics
from apiary.moe.server import ExpertServer
from apiary.moe.training import ExpertTraining, OptimizerName, SchedulerName
from apiary.services.host import ServiceHost, ServiceSettings
from apiary.services.reachability import ReachabilityMode, dht_peers
from apiary.wire import ChannelPool, Endpoint, PeerAddress, WireSettings

logger = logging.getLogger(__name__)

STATUS_EXPERTS = 64  # experts listed one by one in /status


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`; ValueError if unusable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


class ExpertServerSettings(BaseModel):
    experts: list[str] = Field(min_length=1, description="names of the experts hosted, on a grid (ffn.0.3)")
    num_experts: int | None = Field(None, ge=1, description="host this many of `experts`, free in the DHT (none: all)")
    kind: str = Field("ffn", description="ffn, transformer, slow or failing (tests), or package.module:factory")
    hidden_size: int = Field(1024, gt=0, description="the experts' input and output size")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the experts' compute dtype, also on the wire")
    optimizer: OptimizerName = Field("adam", description="every expert's optimizer (none: experts never change)")
    lr: float = Field(1e-3, ge=0, allow_inf_nan=False, description="learning rate of every expert")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="weight decay")
    max_grad_norm: float | None = Field(None, gt=0, description="clip each expert's gradient norm (none: no clipping)")
    scheduler: SchedulerName = Field("constant", description="after warm-up: constant, or linear or cosine decay to 0 at total_steps")
    warmup_steps: int = Field(0, ge=0, description="updates of linear learning-rate warm-up")
    total_steps: int | None = Field(None, gt=0, description="updates after which linear and cosine decay reach 0")
    slow_seconds: float = Field(1.0, ge=0, description="delay of every pass of the `slow` test kind")
    max_batch_size: int = Field(1024, ge=1, description="most samples in one batch (and in one request)")
    max_wait: float = Field(0.005, ge=0, description="seconds a request waits for others to join its batch")
    max_queued_requests: int = Field(1024, ge=1, description="requests that may wait per expert and method")
    kept_activations: int = Field(64, ge=0, description="forward passes whose activations are kept for their backward (0: none)")
    kept_activations_seconds: float = Field(30.0, gt=0, description="seconds kept activations wait for their backward")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    checkpoint_dir: Path | None = Field(None, description="where every expert's checkpoint is kept (none: no checkpoints)")
    checkpoint_period: float = Field(300.0, gt=0, description="seconds between checkpoints")
    declare_period: float = Field(30.0, gt=0, description="seconds between declarations in the DHT")
    dht_local: Endpoint | None = Field(None, description="local API of this participant's dht service")
    initial_peers: list[PeerAddress] = Field(default_factory=list, description="join the DHT through these (embedded node)")
    dht_timeout: float = Field(10.0, gt=0, description="deadline of a call to the dht service's local API")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        resolve_kind(kind)
        return kind

    @field_validator("device")
    @classmethod
    def _usable_device(cls, device: str) -> str:
        resolve_device(device)
        return device

    @property
    def training(self) -> ExpertTraining:
        return ExpertTraining(self.optimizer, self.lr, self.momentum, self.weight_decay, self.max_grad_norm,
                              self.scheduler, self.warmup_steps, self.total_steps)

    @model_validator(mode="after")
    def _enough_names(self) -> ExpertServerSettings:
        if self.num_experts is not None and self.num_experts > len(self.experts):
            raise ValueError(f"num_experts={self.num_experts} is more than the {len(self.experts)} experts named")
        return self

    @model_validator(mode="after")
    def _a_possible_training(self) -> ExpertServerSettings:
        self.training  # noqa: B018 - raises ValueError naming what cannot be combined
        return self

    @model_validator(mode="after")
    def _one_way_to_the_dht(self) -> ExpertServerSettings:
        if (self.dht_local is None) == (not self.initial_peers):
            got = "both" if self.dht_local is not None else "neither"
            raise ValueError(f"give exactly one of dht_local (the dht service's local API) and initial_peers "
                             f"(for an embedded DHT node); got {got}")
        return self


class ExpertServerService:
    """Builds and runs the service; `start()` returns once it serves and reaches the DHT."""

    def __init__(self, wire: WireSettings, service: ServiceSettings, settings: ExpertServerSettings):
        wire = wire.model_copy(update={"bulk": False})  # expert tensors travel in gRPC messages
        if service.reachability.reachability is ReachabilityMode.CLIENT:
            raise ValueError("an expert server has no client mode: trainers dial it (use --reachability auto, "
                             "public or relayed)")
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.host = ServiceHost("expert-server", wire, service, status=self.status, ready=lambda: self.declared_at is not None)
        self.metrics = ExpertServerMetrics(self.host.registry)
        experts = self._experts(settings.experts) if settings.num_experts is None else []
        runtime = BatchingRuntime(settings.max_batch_size, settings.max_wait, settings.max_queued_requests)
        self.server = ExpertServer(experts, runtime, max_tensor_bytes=wire.max_tensor_bytes,
                                   checkpoint_dir=settings.checkpoint_dir, checkpoint_period=settings.checkpoint_period,
                                   metrics=self.metrics,
                                   activations=ActivationCache(settings.kept_activations, settings.kept_activations_seconds))
        self.pool = ChannelPool(wire, identity=self.host.identity)
        self.node: DHTNode | None = None
        if settings.dht_local is not None:
            self.dht: DHTClient | DHTNode = DHTClient(settings.dht_local, self.pool, timeout=settings.dht_timeout)
        else:
            self.node = DHTNode(self.host.identity, DHTSettings(), pool=self.pool, registry=self.host.registry)
            self.dht = self.node
        self.declared_at: float | None = None

    def _experts(self, names: list[str]) -> list[Expert]:
        settings = self.settings
        kind = resolve_kind(settings.kind, slow_seconds=settings.slow_seconds)
        return [Expert(ExpertSpec(name, settings.kind, settings.hidden_size, settings.dtype), kind.factory(settings.hidden_size),
                       training=settings.training, device=self.device) for name in names]

    async def start(self) -> None:
        """Loads checkpoints, starts serving and reaches the DHT (choosing the experts with
        `num_experts`); on failure, stops what it started."""
        await self.host.start_service(self._start)

    async def _start(self) -> None:
        if self.settings.checkpoint_dir is not None:
            self.settings.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if self.node is not None:
            self.node.attach(self.host.server)
        self.server.attach(self.host.server)
        self.host.on_stop(self._close_dht)
        if self.settings.num_experts is None:
            await self.server.start()  # checkpoints are loaded before the first request is served
        self.host.on_stop(self.server.close)  # runs before the servers stop: saves the last checkpoints
        await self.host.start()
        if self.node is not None:
            await self.node.join(self.settings.initial_peers)
        else:
            await self.dht.info()  # fails now, with the address, if the dht service does not answer
        if self.settings.num_experts is not None:  # none hosted yet: callers get NOT_FOUND meanwhile
            names = await claim_free_experts(self.dht, self.settings.experts, self.settings.num_experts,
                                             self.address, ttl=3 * self.settings.declare_period)
            self.server.host(self._experts(names))
            await self.server.start()
        self.host.spawn(keep_declared(self.dht, list(self.server.experts), lambda: self.address,
                                      self.settings.declare_period, on_declared=self._declared), "declare-experts")
        self.host.reach(self.pool, dht_peers(self.dht, self.settings.initial_peers), self.dht)
        self.host.publish_record(self.dht, experts=lambda: list(self.server.experts))

    @property
    def address(self) -> str:
        """The address its experts are declared at, `peer_id@host:port`: callers sign for that id."""
        return self.host.address

    def _declared(self) -> None:
        self.declared_at = time.time()

    async def _close_dht(self) -> None:
        if self.node is not None:
            await self.node.shutdown()  # closes the pool too
        else:
            await self.pool.close()

    def status(self) -> dict[str, Any]:
        settings = self.settings
        experts = list(self.server.experts.values())
        return {
            "kind": settings.kind,
            "hidden_size": settings.hidden_size,
            "dtype": settings.dtype,
            "device": str(self.device),
            "experts": len(experts),
            "updates": sum(expert.updates for expert in experts),
            **{f"{method}_seconds": _rounded(self.metrics.recent_seconds(method)) for method in ("forward", "backward")},
            "listed": [{"name": expert.name, "updates": expert.updates} for expert in experts[:STATUS_EXPERTS]],
            "dht": (f"local API {settings.dht_local}" if self.node is None
                    else f"embedded node {self.node.address or '(client mode)'}"),
            "declared_at": self.declared_at,
            "checkpoint_dir": str(settings.checkpoint_dir) if settings.checkpoint_dir is not None else None,
        }


def _rounded(seconds: float | None) -> float | None:
    return round(seconds, 6) if seconds is not None else None
