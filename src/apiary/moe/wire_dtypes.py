"""The dtype a mixture's calls to each expert carry, learnt from the experts' answers.

An expert's schema names its compute dtype (float32, bfloat16 or float16), and its server
accepts float inputs in that dtype or in float32. Every successful ForwardMany/BackwardMany
result names it, so a mixture layer sends an expert float32 until that expert has answered once,
then its own dtype (bfloat16 or float16: half the bytes), without an extra round trip. One table
per process unless a layer is given its own; bounded (the oldest entries go first).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from apiary.moe.experts import DTYPES


class WireDtypes:
    """Each expert's wire dtype by (server address, expert name); float32 until learnt."""

    def __init__(self, max_entries: int = 1 << 16):
        self.max_entries = max_entries
        self._dtypes: OrderedDict[tuple[str, str], torch.dtype] = OrderedDict()

    def get(self, address: str, name: str) -> torch.dtype:
        return self._dtypes.get((address, name), torch.float32)

    def learn(self, address: str, name: str, dtype: str) -> None:
        """Records what the expert's answer named (an empty or unknown name: float32)."""
        self._dtypes[address, name] = DTYPES.get(dtype, torch.float32)
        while len(self._dtypes) > self.max_entries:
            self._dtypes.popitem(last=False)


_process_dtypes: WireDtypes | None = None


def wire_dtypes() -> WireDtypes:
    """The process's table, shared by every mixture layer that is given none."""
    global _process_dtypes
    if _process_dtypes is None:
        _process_dtypes = WireDtypes()
    return _process_dtypes
