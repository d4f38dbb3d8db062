"""An expert's schema: the tensors it takes and gives, and the check of a call against it.

Every tensor shares the batch dimension (dim 0); `TensorSchema.dims` are its sizes after it: a
number, or a name (e.g. "seq") standing for any size, the same wherever the name appears in one
call. Inputs are positional, then keyword (named, maybe optional). A float tensor's dtype is
`FLOAT`, which stands for the expert's compute dtype: a call sends every float input in that
dtype or in float32, and gets its float outputs back in the dtype it sent. Other tensors (e.g. a
bool mask) have their own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from apiary.moe.protos.moe_pb2 import TensorSchema as TensorSchemaMessage

FLOAT = "float"  # the expert's compute dtype
TENSOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
          "bool": torch.bool, "int64": torch.int64, "int32": torch.int32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSchema:
    """One tensor: its sizes after the batch dimension, dtype (`FLOAT` or a torch dtype's name),
    keyword `name` (inputs passed by keyword) and whether a call may leave it out (keywords only)."""

    dims: tuple[int | str, ...]
    dtype: str = FLOAT
    name: str = ""
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype != FLOAT and self.dtype not in TENSOR_DTYPES:
            raise ValueError(f"tensor schema: dtype {self.dtype!r} is not {FLOAT!r} or one of {', '.join(TENSOR_DTYPES)}")
        if self.optional and not self.name:
            raise ValueError("tensor schema: only a keyword input can be optional")

    def describe(self, float_dtype: str) -> str:
        """e.g. `float32[batch, seq, 16]`."""
        return f"{float_dtype if self.dtype == FLOAT else self.dtype}[{', '.join(['batch', *map(str, self.dims)])}]"

    def to_message(self, float_dtype: str) -> TensorSchemaMessage:
        return TensorSchemaMessage(name=self.name, dims=[str(d) for d in self.dims], optional=self.optional,
                                   dtype=float_dtype if self.dtype == FLOAT else self.dtype)


@dataclass(frozen=True)
class ExpertSchema:
    """The inputs (positional ones first, then keyword ones) and outputs of an expert."""

    inputs: tuple[TensorSchema, ...]
    outputs: tuple[TensorSchema, ...]

    def __post_init__(self) -> None:
        keywords = [t.name for t in self.inputs if t.name]
        if not self.inputs or not self.outputs:
            raise ValueError("an expert schema needs at least one input and one output")
        if self.inputs[0].name or len(set(keywords)) != len(keywords):
            raise ValueError("an expert schema's first input is positional; keyword inputs have distinct names")
        if any(t.name for t in self.outputs) or any(a.name and not b.name for a, b in zip(self.inputs, self.inputs[1:])):
            raise ValueError("an expert schema's positional inputs come before its keyword inputs; outputs are unnamed")
        bound = {d for t in self.positional for d in t.dims if isinstance(d, str)}
        unbound = [d for t in self.outputs for d in t.dims if isinstance(d, str) and d not in bound]
        if unbound:
            raise ValueError(f"an expert schema's output dim {unbound[0]!r} appears in no positional input")

    @classmethod
    def same_shape(cls, dims: tuple[int | str, ...]) -> ExpertSchema:
        """One float input, one float output of its shape."""
        return cls((TensorSchema(dims),), (TensorSchema(dims),))

    @cached_property
    def positional(self) -> tuple[TensorSchema, ...]:
        return tuple(t for t in self.inputs if not t.name)

    @cached_property
    def keywords(self) -> dict[str, TensorSchema]:
        return {t.name: t for t in self.inputs if t.name}

    def describe(self, float_dtype: str) -> str:
        parts = [t.describe(float_dtype) for t in self.positional]
        parts += [f"{t.name}={t.describe(float_dtype)}" + ("?" if t.optional else "") for t in self.keywords.values()]
        return ", ".join(parts)

    def check(self, expert: str, float_dtype: torch.dtype, tensors: Sequence[torch.Tensor],
              keywords: Sequence[str] = ()) -> dict[str, int]:
        """Raises ValueError naming the expert and what is wrong unless `tensors` (positional, then
        the keyword inputs named `keywords`) fit the schema; returns the sizes of the named dims
        and of "batch"."""
        float_name = dtype_name(float_dtype)
        positional = len(tensors) - len(keywords)
        if positional != len(self.positional) or positional < 0:
            raise ValueError(f"expert {expert!r} takes {len(self.positional)} positional input tensor"
                             f"{'s' if len(self.positional) > 1 else ''} ({self.describe(float_name)}), "
                             f"got {max(positional, 0)}")
        known = self.keywords
        unknown = next((k for k in keywords if k not in known), None)
        if unknown is not None:
            raise ValueError(f"expert {expert!r}: unknown keyword input {unknown[:64]!r} "
                             f"(it takes {', '.join(known) or 'none'})")
        if len(set(keywords)) != len(keywords):
            repeated = next(k for i, k in enumerate(keywords) if k in keywords[:i])
            raise ValueError(f"expert {expert!r}: the keyword input {repeated!r} is given twice")
        missing = [k for k, t in known.items() if not t.optional and k not in keywords]
        if missing:
            raise ValueError(f"expert {expert!r}: the keyword input {missing[0]!r} is missing "
                             f"({self.describe(float_name)})")
        schemas = [*self.positional, *(known[k] for k in keywords)]
        sizes: dict[str, int] = {}
        first_float: torch.dtype | None = None
        for index, (tensor, schema) in enumerate(zip(tensors, schemas)):
            label = _label(index, positional, keywords)
            self._check_dtype(expert, tensor, schema, label, float_dtype)
            if schema.dtype == FLOAT:
                if first_float is not None and tensor.dtype != first_float:
                    raise ValueError(f"expert {expert!r}: the float inputs come in {dtype_name(first_float)} and "
                                     f"{dtype_name(tensor.dtype)}; send them all in one dtype")
                first_float = tensor.dtype
            if tensor.dim() != len(schema.dims) + 1:
                raise ValueError(f"expert {expert!r}: {label} shape is {list(tensor.shape)}, "
                                 f"expected {schema.describe(float_name)}")
            for dim, size in zip(("batch", *schema.dims), tensor.shape):
                bound = dim if isinstance(dim, int) else sizes.setdefault(dim, size)
                if size != bound:
                    raise ValueError(f"expert {expert!r}: {label} shape is {list(tensor.shape)}, expected "
                                     f"{schema.describe(float_name)}" + (
                                         f" with {dim}={bound} as in the first input" if isinstance(dim, str) else ""))
        if sizes["batch"] == 0:
            raise ValueError(f"expert {expert!r}: the input batch is empty")
        return sizes

    @staticmethod
    def _check_dtype(expert: str, tensor: torch.Tensor, schema: TensorSchema, label: str,
                     float_dtype: torch.dtype) -> None:
        if schema.dtype != FLOAT:
            if tensor.dtype != TENSOR_DTYPES[schema.dtype]:
                raise ValueError(f"expert {expert!r}: {label} dtype is {dtype_name(tensor.dtype)}, "
                                 f"expected {schema.dtype}")
            return
        if tensor.dtype != float_dtype and tensor.dtype != torch.float32:
            allowed = dict.fromkeys([float_dtype, torch.float32])
            raise ValueError(f"expert {expert!r}: {label} dtype is {dtype_name(tensor.dtype)}, "
                             f"expected {' or '.join(map(dtype_name, allowed))}")

    def output_shapes(self, sizes: dict[str, int]) -> list[list[int]]:
        """The outputs' shapes for a call whose named dims have `sizes` (as `check` returns them)."""
        return [[sizes["batch"], *(d if isinstance(d, int) else sizes[d] for d in t.dims)] for t in self.outputs]

    def to_messages(self, float_dtype: str) -> tuple[list[TensorSchemaMessage], list[TensorSchemaMessage]]:
        return ([t.to_message(float_dtype) for t in self.inputs], [t.to_message(float_dtype) for t in self.outputs])


def _label(index: int, positional: int, keywords: Sequence[str]) -> str:
    """How a refusal names input `index`: "input" (the only one), "input 1" or "keyword input 'mask'"."""
    if index >= positional:
        return f"keyword input {keywords[index - positional]!r}"
    return "input" if positional == 1 else f"input {index}"
