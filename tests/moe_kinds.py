"""An expert kind for tests, loaded as `moe_kinds:BLEND`: several inputs, a keyword, two outputs."""

from __future__ import annotations

import torch
from torch import nn

from apiary.moe.kinds import ExpertKind
from apiary.moe.schema import ExpertSchema, TensorSchema

CONTEXT = 4


class Blend(nn.Module):
    """x [batch, hidden] and a context [batch, 4] in, `scale` [batch, 1] by keyword; out: the blend
    [batch, hidden] and the context's gate [batch, 1]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.gate = nn.Linear(CONTEXT, 1)
        self.project = nn.Linear(CONTEXT, hidden)
        self.mix = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, *, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.gate(context))
        return (self.mix(x) * gate + self.project(context)) * scale, gate


def blend_schema(hidden: int) -> ExpertSchema:
    return ExpertSchema((TensorSchema((hidden,)), TensorSchema((CONTEXT,)), TensorSchema((1,), name="scale")),
                        (TensorSchema((hidden,)), TensorSchema((1,))))


BLEND = ExpertKind(Blend, schema=blend_schema)
