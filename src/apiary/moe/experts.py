"""Experts: torch modules that an expert server hosts and trains.

An `ExpertSpec` names an expert (e.g. "ffn.0.3"), its kind (`apiary.moe.kinds`) and its hidden
size; `build_expert` makes the module from the spec. An `Expert` pairs the module with its own
optimizer: a forward request only computes, a backward request recomputes the forward with
grad, returns the gradient of the inputs and applies one optimizer step (as in the DMoE paper,
the requests that flow through an expert are what trains it; `apiary.moe.training` says which
optimizer and schedule); a step whose gradients are not finite is skipped and counted, never
applied. The module lives on the
expert's device; inputs come and results go back on the CPU (the wire's side).

An expert's schema (its kind's: `apiary.moe.schema`) says what it takes: one or several
positional input tensors and keyword inputs, sharing the batch dimension; a request is checked
against it before it runs. An expert's `dtype` (float32, bfloat16 or float16) is its compute
precision: float inputs may come in it (half the bytes of float32) or in float32, float results
(and the input gradients) go back in the inputs' dtype, and the module (float32 weights) runs
under autocast at that precision; float16 on the CPU, where half-precision matmuls are not
always available, computes in float32.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from apiary.moe.activations import KeptActivations
from apiary.moe.kinds import resolve_kind
from apiary.moe.schema import ExpertSchema, dtype_name
from apiary.moe.training import ExpertTraining

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExpertSpec:
    """What an expert is: its name (unique on the server), kind, hidden size and compute dtype."""

    name: str
    kind: str
    hidden_size: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an expert needs a name")
        try:
            resolve_kind(self.kind)
        except ValueError as e:
            raise ValueError(f"expert {self.name!r}: {e}") from None
        if self.hidden_size <= 0:
            raise ValueError(f"expert {self.name!r}: hidden_size must be positive, got {self.hidden_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"expert {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def input_ndim(self) -> int:
        return resolve_kind(self.kind).input_ndim

    @property
    def schema(self) -> ExpertSchema:
        """What the expert takes and gives (`apiary.moe.schema`), by its kind."""
        return resolve_kind(self.kind).schema_for(self.hidden_size)


def build_expert(spec: ExpertSpec) -> nn.Module:
    """A freshly initialised module of the spec's kind (seed torch first for reproducibility)."""
    return resolve_kind(spec.kind).factory(spec.hidden_size)


class Expert:
    """A hosted expert: module, optimizer and schedule (`training`, default Adam at 1e-3).
    Thread-safe: the runtime runs its batches in worker threads, one lock per expert keeps
    them from overlapping."""

    def __init__(self, spec: ExpertSpec, module: nn.Module | None = None, *,
                 training: ExpertTraining = ExpertTraining(), device: str | torch.device = "cpu"):
        self.spec = spec
        self.schema: ExpertSchema = spec.schema
        self.device = torch.device(device)
        self.module = (module if module is not None else build_expert(spec)).to(self.device)
        self.training = training
        self.optimizer = training.make_optimizer(self.module.parameters())
        self.updates = 0
        self.skipped_updates = 0  # backward passes whose gradients were not finite
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    def check_inputs(self, inputs: Sequence[torch.Tensor], keywords: Sequence[str] = ()) -> dict[str, int]:
        """Raises ValueError naming the expert and what is wrong unless `inputs` (positional, then
        the keyword inputs named `keywords`) fit its schema; returns the sizes of its named dims."""
        return self.schema.check(self.name, self.spec.torch_dtype, inputs, keywords)

    def check_grad_outputs(self, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
                           keywords: Sequence[str] = ()) -> None:
        """Raises ValueError unless `grad_outputs` match the outputs the inputs give."""
        sizes = self.check_inputs(inputs, keywords)
        shapes = self.schema.output_shapes(sizes)
        if len(grad_outputs) != len(shapes):
            raise ValueError(f"expert {self.name!r}: backward takes {len(shapes)} output gradient"
                             f"{'s' if len(shapes) > 1 else ''}, got {len(grad_outputs)}")
        dtype = _call_dtype(inputs)
        for index, (g, shape) in enumerate(zip(grad_outputs, shapes)):
            label = "output gradient" if len(shapes) == 1 else f"output gradient {index}"
            if g.dtype != dtype:
                raise ValueError(f"expert {self.name!r}: {label} dtype is {dtype_name(g.dtype)}, "
                                 f"expected the input's {dtype_name(dtype)}")
            if list(g.shape) != shape:
                raise ValueError(f"expert {self.name!r}: {label} shape is {list(g.shape)}, "
                                 f"expected {shape} (the output's shape)")

    def forward(self, inputs: Sequence[torch.Tensor], keywords: Sequence[str] = ()) -> list[torch.Tensor]:
        self.check_inputs(inputs, keywords)
        with self._lock, torch.no_grad():
            outputs = self._compute([t.to(self.device) for t in inputs], keywords)
            return _to_wire(outputs, _call_dtype(inputs))

    def forward_keeping(self, inputs: Sequence[torch.Tensor], keywords: Sequence[str] = ()
                        ) -> tuple[list[torch.Tensor], KeptActivations]:
        """The outputs, computed with grad; also the activations for a `backward` of the same inputs."""
        self.check_inputs(inputs, keywords)
        with self._lock:
            leaves = _leaves(inputs, self.device)
            with torch.enable_grad():
                outputs = self._compute(leaves, keywords)
            return _to_wire([o.detach() for o in outputs], _call_dtype(inputs)), \
                KeptActivations(leaves, outputs, self.updates)

    def backward(self, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
                 kept: KeptActivations | None = None, keywords: Sequence[str] = ()) -> list[torch.Tensor]:
        """The gradients of the inputs (zeros for those that are not float); also one optimizer step
        on the expert's parameters (skipped if their gradients are not finite; none without an
        optimizer). With `kept` activations of these inputs and no update since, the forward is
        not recomputed."""
        self.check_grad_outputs(inputs, grad_outputs, keywords)
        with self._lock:
            if kept is not None and kept.updates == self.updates and len(kept.inputs) == len(inputs) and all(
                    a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach(), b.to(self.device))
                    for a, b in zip(kept.inputs, inputs)):
                leaves, outputs = kept.inputs, kept.outputs
            else:
                leaves = _leaves(inputs, self.device)
                with torch.enable_grad():
                    outputs = self._compute(leaves, keywords)
            pairs = [(o, g.to(self.device, o.dtype)) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
            differentiable = [x for x in leaves if x.requires_grad]
            with torch.enable_grad():
                if self.optimizer is None:  # frozen: the input gradients only
                    found = torch.autograd.grad([o for o, _ in pairs], differentiable, [g for _, g in pairs],
                                                allow_unused=True) if pairs and differentiable else ()
                    grads = dict(zip(map(id, differentiable), found))
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    if pairs:
                        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                    grads = {id(x): x.grad for x in differentiable}
            if self.optimizer is not None:
                self._step(self.optimizer)
            return [g.cpu() if (g := grads.get(id(x))) is not None else torch.zeros_like(x, device="cpu")
                    for x in leaves]

    def _compute(self, inputs: Sequence[torch.Tensor], keywords: Sequence[str]) -> list[torch.Tensor]:
        """The module's outputs for `inputs` (on the device; float ones in float32 or the expert's
        dtype), computed at the expert's precision."""
        positional = len(inputs) - len(keywords)
        dtype = self.spec.torch_dtype
        if dtype == torch.float32 or (dtype == torch.float16 and self.device.type == "cpu"):
            inputs = [t.float() if t.is_floating_point() else t for t in inputs]
            result = self.module(*inputs[:positional], **dict(zip(keywords, inputs[positional:])))
        else:
            with torch.autocast(self.device.type, dtype=dtype):
                result = self.module(*inputs[:positional], **dict(zip(keywords, inputs[positional:])))
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        """One optimizer step on the gradients just computed, unless their norm is not finite (a
        NaN or infinity, or values whose squares overflow float32): that step would poison the
        weights and Adam's moments, so it is skipped and counted in `skipped_updates`."""
        parameters = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        if not bool(torch.isfinite(norm)):
            self.skipped_updates += 1
        else:
            if self.training.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(parameters, self.training.max_grad_norm, norm)
            for group in optimizer.param_groups:
                group["lr"] = self.training.learning_rate(self.updates)
            optimizer.step()
            self.updates += 1
        optimizer.zero_grad(set_to_none=True)


def _call_dtype(inputs: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype a call's float tensors travel in: its first float input's."""
    return next((t.dtype for t in inputs if t.is_floating_point()), torch.float32)


def _leaves(inputs: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The inputs on the device, the float ones as leaves that require grad."""
    return [t.to(device).detach().requires_grad_(True) if t.is_floating_point() else t.to(device) for t in inputs]


def _to_wire(outputs: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Outputs on the CPU, the float ones in the call's dtype."""
    return [o.to("cpu", dtype) if o.is_floating_point() else o.cpu() for o in outputs]
