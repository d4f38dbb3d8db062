"""Training throughput through a remote expert over loopback, against the same expert trained
locally, measured in the same run.

For each preset, a server process hosts one feed-forward expert (apiary.moe.ExpertServer on an
apiary.wire RpcServer); the benchmark process then measures samples per second of
  local  - the same module (same initial weights) with the same Adam doing forward, backward
           and an optimizer step in this process (the reference);
  remote - forward and backward through RemoteExpert (the server's Backward computes the input
           gradient and takes the optimizer step), one batch after another; the Forward asks the
           server to keep its activations, so the Backward does not recompute them;
  remote, recomputing - the same with keep_activations=False: the Backward recomputes the forward.
Prints all three and remote/local. Presets: small = hidden 256, batch 64; large = hidden 1024,
batch 256; xl = hidden 4096, batch 1024 (for a GPU). Both processes use `--threads` torch threads
(default 1: on a small shared machine, several OpenMP threads per process make timings swing
tenfold with the load); they never compute at once. `--device cuda` puts the expert (and the
local reference) on the GPU; `--dtype bfloat16|float16` makes the expert compute in that
precision and the remote path carry its activations and gradients in it (half the bytes), the
local reference computing under the same autocast. Results: benchmarks/results/moe.json (on
CPU in float32), moe-<device>-<dtype>.json otherwise. Usage:
python benchmarks/moe.py [--presets small,large] [--steps 20] [--warmup 3] [--threads 1] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from record import save

PRESETS = {"small": (256, 64), "large": (1024, 256), "xl": (4096, 1024)}  # hidden size, batch size
NAME = "ffn.0.0"
SEED = 0


def expert_of(hidden: int, device: str, dtype: str):  # type: ignore[no-untyped-def]
    """The benchmark's expert, with the same initial weights in every process."""
    import torch

    from apiary.moe import Expert, ExpertSpec, ExpertTraining

    torch.manual_seed(SEED)
    return Expert(ExpertSpec(NAME, "ffn", hidden, dtype=dtype), training=ExpertTraining(lr=1e-4), device=device)


async def serve(hidden: int, batch: int, threads: int, device: str, dtype: str) -> None:
    import torch

    torch.set_num_threads(threads)
    from apiary.moe import BatchingRuntime, ExpertServer
    from apiary.wire import Identity, RpcServer, WireSettings

    server = ExpertServer([expert_of(hidden, device, dtype)], BatchingRuntime(max_batch_size=batch, max_wait_seconds=0.0))
    rpc = RpcServer(WireSettings(listen_host="127.0.0.1", bulk=False, tls=False), Identity.generate())  # plaintext, as the figures in docs/benchmarks.md (benchmarks/trust.py measures TLS)
    server.attach(rpc)
    await server.start()
    await rpc.start()
    print(json.dumps({"port": rpc.port}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()  # until the benchmark closes stdin
    await rpc.stop(0)
    await server.close()


def measure(steps_of: list, batch: int, steps: int, warmup: int) -> list[float]:  # type: ignore[type-arg]
    """Median samples per second of each step function over `steps` timed runs after `warmup`
    untimed ones; the paths take turns step by step, so that each sees the same machine load."""
    for step in steps_of:
        for _ in range(warmup):
            step()
    rates: list[list[float]] = [[] for _ in steps_of]
    for _ in range(steps):
        for path, step in enumerate(steps_of):
            started = time.perf_counter()
            step()
            rates[path].append(batch / (time.perf_counter() - started))
    return [statistics.median(r) for r in rates]


def run_preset(name: str, steps: int, warmup: int, threads: int, device: str,
               dtype: str) -> tuple[float, float, float]:
    import torch

    from apiary.moe import RemoteExpert
    from apiary.wire import ChannelPool, WireSettings

    torch.set_num_threads(threads)
    hidden, batch = PRESETS[name]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(hidden), str(batch), str(threads),
                               "--device", device, "--dtype", dtype],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(batch, hidden, generator=generator)
        grad = torch.randn(batch, hidden, generator=generator)

        local = expert_of(hidden, device, dtype)  # what the server hosts
        x_local, grad_local = x.to(device), grad.to(device)
        compute_dtype = getattr(torch, dtype)

        def local_step() -> None:
            inputs = x_local.clone().requires_grad_(True)
            with torch.autocast(local.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                output = local.module(inputs)
            local.optimizer.zero_grad(set_to_none=True)
            output.backward(grad_local.to(output.dtype))
            local.optimizer.step()
            if local.device.type == "cuda":
                torch.cuda.synchronize()

        def remote_step(remote: RemoteExpert) -> None:
            inputs = x.clone().requires_grad_(True)
            remote(inputs).backward(grad)

        plaintext = ChannelPool(WireSettings(tls=False))  # plaintext, as the figures in docs/benchmarks.md (benchmarks/trust.py measures TLS)
        keeping = RemoteExpert(f"127.0.0.1:{port}", NAME, plaintext, timeout=60, dtype=None)  # the expert's dtype
        recomputing = RemoteExpert(f"127.0.0.1:{port}", NAME, plaintext, timeout=60, keep_activations=False,
                                   dtype=None)
        local, remote, recompute = measure(
            [local_step, lambda: remote_step(keeping), lambda: remote_step(recomputing)], batch, steps, warmup)
        return local, remote, recompute
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,large")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--device", default="cpu", help="where the expert computes: cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the expert's compute dtype (and the wire's)")
    parser.add_argument("--serve", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(*args.serve, args.device, args.dtype))
        return
    load_before = os.getloadavg()[0]
    print(f"load average before: {load_before:.2f}")
    presets = {}
    print(f"{'preset':8} {'hidden':>6} {'batch':>5} {'local':>8} {'remote':>8} {'recomputing':>11} "
          f"{'remote/local':>12} {'recomputing/local':>17}   (samples/s)")
    for name in args.presets.split(","):
        local, remote, recompute = run_preset(name, args.steps, args.warmup, args.threads, args.device, args.dtype)
        hidden, batch = PRESETS[name]
        print(f"{name:8} {hidden:>6} {batch:>5} {local:>8.0f} {remote:>8.0f} {recompute:>11.0f} "
              f"{remote / local:>12.2f} {recompute / local:>17.2f}", flush=True)
        presets[name] = {"hidden": hidden, "batch": batch, "local": local, "remote": remote, "recomputing": recompute}
    load_after = os.getloadavg()[0]
    print(f"load average after: {load_after:.2f}")
    preset = None if (args.device, args.dtype) == ("cpu", "float32") else f"{args.device.replace(':', '')}-{args.dtype}"
    save("moe", {"steps": args.steps, "warmup": args.warmup, "threads": args.threads, "device": args.device,
                 "dtype": args.dtype, "load_before": load_before, "load_after": load_after, "presets": presets},
         preset=preset)


if __name__ == "__main__":
    main()
