"""Experts: torch modules that an expert server hosts and trains.

An `ExpertSpec` names an expert (e.g. "ffn.0.3"), its kind (`apiary.moe.kinds`) and its hidden
size; `build_expert` makes the module from the spec. An `Expert` pairs the module with its own
optimizer: a forward request only computes, a backward request recomputes the forward with
grad, returns the gradient of the inputs and applies one optimizer step (as in the DMoE paper,
the requests that flow through an expert are what trains it; `apiary.moe.training` says which
optimizer and schedule); a step whose gradients are not finite is skipped and counted, never
applied. The module lives on the
expert's device; inputs come and results go back on the CPU (the wire's side).

An expert's `dtype` (float32, bfloat16 or float16) is its compute precision: inputs may come in
it (half the bytes of float32) or in float32, results go back in the inputs' dtype, and the
module (float32 weights) runs under autocast at that precision; float16 on the CPU, where
half-precision matmuls are not always available, computes in float32.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from apiary.moe.activations import KeptActivations
from apiary.moe.kinds import resolve_kind
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

    def describe_input(self) -> str:
        dims = ["batch", "seq"][: self.input_ndim - 1] + [str(self.hidden_size)]
        return f"{self.dtype}[{', '.join(dims)}]"


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

    def check_inputs(self, inputs: Sequence[torch.Tensor]) -> None:
        """Raises ValueError naming the expert and what is wrong unless `inputs` fit its schema."""
        expected = self.spec.describe_input()
        if len(inputs) != 1:
            raise ValueError(f"expert {self.name!r} takes 1 input tensor ({expected}), got {len(inputs)}")
        x = inputs[0]
        if x.dtype not in (torch.float32, self.spec.torch_dtype):
            raise ValueError(f"expert {self.name!r}: input dtype is {str(x.dtype).removeprefix('torch.')}, "
                             f"expected {' or '.join(dict.fromkeys([self.spec.dtype, 'float32']))} ({expected})")
        if x.dim() != self.spec.input_ndim or x.shape[-1] != self.spec.hidden_size:
            raise ValueError(f"expert {self.name!r}: input shape is {list(x.shape)}, expected {expected}")
        if x.shape[0] == 0:
            raise ValueError(f"expert {self.name!r}: the input batch is empty")

    def check_grad_outputs(self, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]) -> None:
        """Raises ValueError unless `grad_outputs` match the outputs the inputs give."""
        if len(grad_outputs) != 1:
            raise ValueError(f"expert {self.name!r}: backward takes 1 output gradient, got {len(grad_outputs)}")
        g = grad_outputs[0]
        if g.dtype != inputs[0].dtype:
            raise ValueError(f"expert {self.name!r}: output gradient dtype is "
                             f"{str(g.dtype).removeprefix('torch.')}, expected the input's "
                             f"{str(inputs[0].dtype).removeprefix('torch.')}")
        if g.shape != inputs[0].shape:  # every kind maps hidden -> hidden
            raise ValueError(f"expert {self.name!r}: output gradient shape is {list(g.shape)}, "
                             f"expected {list(inputs[0].shape)} (the output's shape)")

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.check_inputs(inputs)
        with self._lock, torch.no_grad():
            return [self._compute(inputs[0].to(self.device)).to("cpu", inputs[0].dtype)]

    def forward_keeping(self, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], KeptActivations]:
        """The outputs, computed with grad; also the activations for a `backward` of the same inputs."""
        self.check_inputs(inputs)
        with self._lock:
            x = inputs[0].to(self.device).detach().requires_grad_(True)
            with torch.enable_grad():
                output = self._compute(x)
            return [output.detach().to("cpu", x.dtype)], KeptActivations(x, output, self.updates)

    def backward(self, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
                 kept: KeptActivations | None = None) -> list[torch.Tensor]:
        """The gradients of the inputs; also one optimizer step on the expert's parameters (skipped
        if their gradients are not finite; none without an optimizer). With `kept` activations of
        these inputs and no update since, the forward is not recomputed."""
        self.check_inputs(inputs)
        self.check_grad_outputs(inputs, grad_outputs)
        with self._lock:
            if kept is not None and kept.updates == self.updates and kept.inputs.shape == inputs[0].shape \
                    and torch.equal(kept.inputs.detach(), inputs[0].to(self.device)):
                x, output = kept.inputs, kept.output
            else:
                x = inputs[0].to(self.device).detach().requires_grad_(True)
                with torch.enable_grad():
                    output = self._compute(x)
            grad_output = grad_outputs[0].to(self.device, output.dtype)
            if self.optimizer is None:  # frozen: the input gradient only
                with torch.enable_grad():
                    (grad_input,) = torch.autograd.grad(output, x, grad_output)
                return [grad_input.cpu()]
            with torch.enable_grad():
                self.optimizer.zero_grad(set_to_none=True)
                output.backward(grad_output)
            self._step(self.optimizer)
            assert x.grad is not None
            return [x.grad.cpu()]

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output for `x` (on the device, in float32 or the expert's dtype), computed
        at the expert's precision."""
        dtype = self.spec.torch_dtype
        if dtype == torch.float32 or (dtype == torch.float16 and self.device.type == "cpu"):
            return self.module(x.float())
        with torch.autocast(self.device.type, dtype=dtype):
            return self.module(x)

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
