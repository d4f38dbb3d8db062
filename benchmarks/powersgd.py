"""Bytes a peer exchanges per epoch of gradient averaging, by codec and PowerSGD rank, against
uncompressed float32.

For each model (built on the meta device: shapes only) and each codec of
apiary.averaging.compression, the bytes one peer sends and receives in a group of `--group`
peers: a butterfly all-reduce splits the averaged vector into one span per peer, and each peer
sends its part of every other span and the reduced own span back, receiving as much, so
4 (g - 1) parts of n / g values, each `Codec.wire_bytes` on the wire (the averager counts the
same payload bytes in its replies). Uncompressed gradient averaging averages every parameter
in one round; PowerSGD (optim/powersgd.py) averages the P's and the small tensors in one round
and the Q's in a second (`round_values`). The real 2-peer run of
tests/test_optim_powersgd.py checks these counts against the averager's reported bytes.

    .venv/bin/python benchmarks/powersgd.py
    .venv/bin/python benchmarks/powersgd.py --ranks 1,4,16 --group 4
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from record import save

from apiary.averaging.compression import CODECS, codec_by_name
from apiary.optim.powersgd import round_values
from apiary.tasks.charlm import CharTransformer

MODELS = {  # name: (context, width, layers, heads) of the charlm task's transformer
    "charlm (default, 0.14 M)": (64, 64, 2, 4),
    "charlm 1024 wide, 12 layers (0.15 B)": (1024, 1024, 12, 16),
}


def round_bytes(values: int, codec: str, group: int) -> int:
    """Bytes one peer sends and receives in a round averaging `values` float32 values."""
    if values == 0:
        return 0
    span = -(-values // group)
    return 4 * (group - 1) * codec_by_name(codec).wire_bytes(span)


def figures(ranks: list[int], min_size: int, group: int) -> dict[str, Any]:
    models = {}
    for name, (context, width, layers, heads) in MODELS.items():
        with torch.device("meta"):
            shapes = [p.shape for p in CharTransformer(context, width, layers, heads).parameters()]
        params = sum(shape.numel() for shape in shapes)
        float32 = round_bytes(params, "none", group)
        by_codec = {}
        for codec in CODECS:
            row = {"uncompressed": round_bytes(params, codec, group)}
            for rank in ranks:
                first, second = round_values(shapes, rank, min_size)
                row[f"rank {rank}"] = round_bytes(first, codec, group) + round_bytes(second, codec, group)
            by_codec[codec] = row
        models[name] = {"params": params, "float32_bytes": float32, "bytes": by_codec}
    return {"group": group, "min_size": min_size, "ranks": ranks, "models": models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4,8,16,32", help="PowerSGD ranks, comma-separated")
    parser.add_argument("--min-size", type=int, default=4096, help="PowerSGD's powersgd_min_size")
    parser.add_argument("--group", type=int, default=2, help="peers in a round's group")
    parser.add_argument("--no-save", action="store_true", help="print only; write no results file")
    args = parser.parse_args()
    result = figures([int(r) for r in args.ranks.split(",")], args.min_size, args.group)
    for name, model in result["models"].items():
        print(f"{name}: {model['params']:,} parameters, float32 {model['float32_bytes'] / 1e6:.3f} MB per epoch")
        for codec, row in model["bytes"].items():
            cells = [f"{column} {b / 1e6:.3f} MB ({model['float32_bytes'] / b:.1f}x)" for column, b in row.items()]
            print(f"  {codec:>10}: " + ", ".join(cells))
    if not args.no_save:
        save("powersgd", result)


if __name__ == "__main__":
    main()
