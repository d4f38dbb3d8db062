"""The tables of docs/benchmarks.md, each rendered from the JSON results of benchmarks/results/
(written by benchmarks/record.py). A table whose results are missing renders as a note with the
command that measures it. One function per table; TABLES names them as the doc's markers do.
One module for all the doc's tables (short functions, one per table), hence its length."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from record import RESULTS, load

Results = Callable[[str, "str | None"], "dict[str, Any] | None"]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def measured(result: dict[str, Any]) -> str:
    """When, at which commit and under which load the figures were measured."""
    commit = result["commit"]
    edits = " + uncommitted edits" if commit.get("dirty") else ""
    when = result["time"].replace("T", " ").removesuffix("Z")
    load_average = result["machine"].get("load_average") or [float("nan")]
    return (f"measured {when} UTC at commit {(commit.get('hash') or 'unknown')[:10]}{edits}, load average "
            f"{load_average[0]:.1f} at the end")


def provenance(result: dict[str, Any]) -> str:
    """The line above a table: when, where, under which load and by which command."""
    when = measured(result)
    return f"_{when[0].upper()}{when[1:]}: `{' '.join(result['command'])}`._"


def missing(command: str) -> str:
    return f"_Not re-measured in this run: `{command}`._"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}"


def percent(share: float, digits: int = 1) -> str:
    return f"{100 * share:.{digits}f}%"


def small(value: float) -> str:
    """A spread or drift: 0 when it vanished, else two significant digits."""
    return "0" if abs(value) < 1e-12 else f"{value:.1e}"


def wire(results: Results) -> str:
    result = results("wire", None)
    if result is None:
        return missing(".venv/bin/python benchmarks/wire.py --repeats 5")
    rates = result["figures"]["mb_per_s"]
    labels = {"raw": "raw TCP socket (reference: length prefix + bytes into a reused buffer)",
              "bulk": "apiary.wire bulk transport (`BulkClient` → Probe bulk Sink)",
              "grpc": "apiary.wire gRPC chunk stream (4 MiB `TensorChunk`s → `Probe.Sink`, with SHA-256)"}
    rows = [[label, f"{rates[name]:.0f}", ratio(rates[name], rates["raw"])] for name, label in labels.items()]
    return provenance(result) + "\n\n" + table(["path", "MB/s", "ratio to raw socket"], rows)


def dht(results: Results) -> str:
    result = results("dht", None)
    if result is None:
        return missing(".venv/bin/python benchmarks/dht.py")
    f = result["figures"]
    rows = [[str(number), percent(r["stores_ok"]), f"{r['store_p50_ms']:.0f} / {r['store_p99_ms']:.0f} ms",
             f"{r['killed']} / {r['left']}", f"{percent(r['gets_ok'], 2)} of {r['gets']}",
             f"{r['get_p50_ms']:.0f} / {r['get_p99_ms']:.0f} ms"] for number, r in enumerate(f["per_round"], 1)]
    total, cli = f["all"], f["cli_rss_mb"]
    lines = [
        f"- All rounds: store p50 / p99 {total['store_p50_ms']:.0f} / {total['store_p99_ms']:.0f} ms, get p50 / p99 "
        f"{total['get_p50_ms']:.0f} / {total['get_p99_ms']:.0f} ms; get success {percent(total['gets_ok'], 2)} "
        f"= {total['gets_ok'] / f['get_target']:.3f} × the {percent(f['get_target'])} target.",
        f"- Peak RSS of the benchmark process: {f['peak_rss_mb']:.0f} MB "
        f"({f['peak_rss_mb'] / f['nodes']:.1f} MB per in-process node).",
        f"- A standalone `apiary dht` process (no torch): {cli['joined']:.0f} MB RSS after joining, "
        f"{cli['after']:.0f} MB after the rounds (peak {cli['peak']:.0f} MB) = {cli['peak'] / f['rss_budget_mb']:.2f} "
        f"× the {f['rss_budget_mb']:.0f} MB budget.",
    ]
    if (large := results("dht", "256-nodes")) is not None:
        g = large["figures"]
        lines.append(f"- `{' '.join(large['command'][1:])}`: {percent(g['all']['stores_ok'])} stored, "
                     f"{percent(g['all']['gets_ok'], 2)} found, peak RSS {g['peak_rss_mb']:.0f} MB "
                     f"({g['peak_rss_mb'] / g['nodes']:.1f} MB per node; {measured(large)}).")
    header = ["round", "stores ok", "store p50 / p99", "killed / left", "gets ok (all keys so far)", "get p50 / p99"]
    return provenance(result) + "\n\n" + table(header, rows) + "\n\n" + "\n".join(lines)


def averaging(results: Results) -> str:
    result = results("averaging", None)
    if result is None:
        return missing(".venv/bin/python benchmarks/averaging.py")
    f = result["figures"]
    rows = [["raw-socket bound: the same bytes (each peer's part to every other, and the reduced part back) over "
             "plain sockets, all peers at once", f"{f['raw_seconds']:.2f} s", "1.00"]]
    rows += [[f"all-reduce, codec `{codec}`", f"{seconds:.2f} s", ratio(f["raw_seconds"], seconds)]
             for codec, seconds in f["round_seconds"].items() if codec != "verify"]
    return provenance(result) + "\n\n" + table(["what", "round time", "raw bound / round time"], rows)


def averaging_verify(results: Results) -> str:
    result = results("averaging", "verify")
    if result is None:
        return missing(".venv/bin/python benchmarks/averaging.py --peers 4 --numel 10000000 --codecs none "
                       "--verify --repeats 7")
    f = result["figures"]
    plain, verified = f["round_seconds"]["none"], f["round_seconds"]["verify"]
    rows = [["all-reduce, codec `none`", f"{plain:.2f} s", "1.00"],
            ["all-reduce, codec `none`, verified", f"{verified:.2f} s", ratio(verified, plain)]]
    note = (f"The audits moved {f['audit_bytes'] / 1e6:.2f} MB for all {f['peers']} peers, "
            f"{percent(f['audit_bytes'] / f['reduce_bytes'], 2)} of the all-reduce's bytes.")
    return provenance(result) + "\n\n" + table(["what", "round time", "/ unverified"], rows) + "\n\n" + note


MOSHPIT_LABELS = {"paired, adopt": "paired, adopt (now)", "random groups, mix (ref)": "random groups"}
BEFORE, NOW, REFERENCE = "unpaired, mix (before)", "paired, adopt", "random groups, mix (ref)"


def moshpit_churn(results: Results) -> str:
    result = results("moshpit_churn", None)
    if result is None:
        return missing(".venv/bin/python benchmarks/moshpit_churn.py --rates 0,0.05,0.1,0.2,0.3")
    f = result["figures"]
    rows, finals = [], {}
    for line in f["lines"]:
        rate, variant, spreads = line["failures"], line["variant"], line["median_spread"]
        finals.setdefault(rate, {})[variant] = line
        if rate == 0 and variant == NOW:
            label = "any grid rule"
        elif rate == 0 and variant != REFERENCE or rate not in (0, 0.1) and variant not in (BEFORE, NOW, REFERENCE):
            continue  # every grid rule is exact without failures; the doc shows every rule at 10% only
        else:
            label = MOSHPIT_LABELS.get(variant, variant)
        exact = next((i + 1 for i, spread in enumerate(spreads) if spread < 1e-12), None)
        contraction = f"exact after {exact} rounds" if exact else f"{line['contraction']:.2f}"
        picks = [spreads[i - 1] if i <= len(spreads) else float("nan") for i in (2, 4)]
        rows.append([percent(rate, 0), label, *(small(s) for s in picks), small(spreads[-1]),
                     percent(line["within_target"]), contraction, small(line["drift"])])
    rounds = f["rounds"]
    header = ["failures", "grid, rejoin", "after 2", "after 4", f"after {rounds} rounds",
              f"swarms within {f['target']:g} after {rounds}", "contraction per round", "drift"]
    ratios = ", ".join(f"{lines[BEFORE]['median_spread'][-1] / lines[NOW]['median_spread'][-1]:.0f} at {percent(rate, 0)}"
                       for rate, lines in finals.items() if rate > 0 and lines[NOW]["median_spread"][-1] > 0)
    notes = [f"- Median spread after {rounds} rounds, before / now (same failures): {ratios}."]
    if 0.1 in finals:
        ten = finals[0.1]
        notes.append(f"- At 10%, the 90th percentile of the final spread: {small(ten[NOW]['p90_final_spread'])} now, "
                     f"{small(ten[BEFORE]['p90_final_spread'])} before.")
    return provenance(result) + "\n\n" + table(header, rows) + "\n\n" + "\n".join(notes)


def moe(results: Results, preset: str | None = None) -> str:
    """The remote expert against local compute; `preset` names a device and dtype (moe-<preset>.json)."""
    result = results("moe", preset)
    if result is None:
        device, _, dtype = (preset or "cpu-float32").partition("-")
        return missing(f".venv/bin/python benchmarks/moe.py --steps 30 --device {device} --dtype {dtype}")
    f = result["figures"]
    rows = [[name, str(p["hidden"]), str(p["batch"]), f"{p['local']:.0f}", f"{p['remote']:.0f}",
             f"{p['recomputing']:.0f}", ratio(p["remote"], p["local"]), ratio(p["recomputing"], p["local"])]
            for name, p in f["presets"].items()]
    header = ["preset", "hidden", "batch", "local samples/s", "remote", "remote, recomputing", "remote/local",
              "recomputing/local"]
    note = f"Load average {f['load_before']:.1f} before, {f['load_after']:.1f} after."
    return provenance(result) + "\n\n" + table(header, rows) + "\n\n" + note


TRAINING_LABELS = {"synchronous": "synchronous gradient averaging", "delayed updates": "delayed updates"}


def training(results: Results) -> str:
    result = results("training", None)
    if result is None:
        return missing(".venv/bin/python benchmarks/training.py --peers 4 --epochs 8 --steps 32")
    f = result["figures"]
    reference = f["reference_samples_per_second"]

    def cell(value: float, digits: int) -> str:
        return "–" if value != value else f"{value:.{digits}f}"  # NaN: no rounds waited on (delayed updates)

    rows = [[TRAINING_LABELS.get(name, name.replace("diloco", "DiLoCo")), f"{m['seconds_per_epoch']:.2f}",
             f"{m['mb_per_epoch']:.2f}", cell(m["round_wait"], 2), cell(m["formed_early"], 2),
             f"{m['samples_per_second']:.0f}", ratio(m["samples_per_second"], reference), f"{m['loss_end']:.2f}"]
            for name, m in f["modes"].items()]
    header = ["mode", "s / epoch", "MB exchanged / epoch (all peers)", "wait (s)", "early", "swarm samples/s",
              "ratio to plain loop", "held-out loss"]
    note = f"Reference, one plain torch loop (2 threads) in the same run: {reference:.0f} samples/s."
    return provenance(result) + "\n\n" + table(header, rows) + "\n\n" + note


def memory(results: Results, preset: str | None) -> str:
    result = results("memory", preset)
    if result is None:
        return missing(f".venv/bin/python benchmarks/memory.py --device {preset or 'cpu'}")
    f = result["figures"]
    cuda = preset is not None
    rows = [[name, f"{m['peak_rss_mb']:.0f}", ratio(m["peak_rss_mb"], f["variants"]["plain torch loop"]["peak_rss_mb"]),
             *([f"{m['peak_cuda_mb']:.0f}", f"{m['cuda_ratio']:.2f}"] if cuda else []),
             f"{m['step_seconds']:.2f}", f"{m['speed_ratio']:.2f}"] for name, m in f["variants"].items()]
    header = ["training loop", "peak RSS (MB)", "ratio", *(["peak CUDA (MB)", "ratio"] if cuda else []),
              "s / step (median)", "speed ratio to plain loop"]
    plain = f["variants"]["plain torch loop"]
    note = (f"{plain['params'] / 1e6:.0f} M parameters ({plain['model_mb']:.0f} MB in float32), Adam, batch "
            f"{f['batch']}, {f['steps']} steps on {f['device']}; each loop in a fresh process.")
    return provenance(result) + "\n\n" + table(header, rows) + "\n\n" + note


def megabytes(count: int) -> str:
    """`count` bytes in MB: three significant digits, no exponent."""
    value = count / 1e6
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def powersgd(results: Results) -> str:
    result = results("powersgd", None)
    if result is None:
        return missing(".venv/bin/python benchmarks/powersgd.py")
    f = result["figures"]
    parts = [provenance(result)]
    for name, model in f["models"].items():
        columns = list(next(iter(model["bytes"].values())))
        rows = [[codec, *(f"{megabytes(b)} MB ({model['float32_bytes'] / b:.1f}×)" for b in row.values())]
                for codec, row in model["bytes"].items()]
        parts.append(f"{name}, {model['params']:,} parameters:\n\n" + table(["codec", *columns], rows))
    parts.append(f"Bytes one peer sends and receives per epoch in a group of {f['group']} (× fewer than "
                 f"uncompressed float32 in brackets); PowerSGD compresses tensors of {f['min_size']} elements or more.")
    return "\n\n".join(parts)


def hivemind_memory(memory: dict[str, Any], nodes: int) -> str:
    """hivemind's DHT memory: a p2pd daemon per node, plus the one Python process of all nodes."""
    p2pd_rss, _ = memory["by_name"].get("p2pd", [float("nan"), 0])
    p2pd_count = memory["names"].get("p2pd", 1)
    this_rss, _ = memory["by_name"]["this process"]
    return (f"{p2pd_rss / p2pd_count:.0f} MB RSS per node's p2pd daemon, plus {this_rss:.0f} MB for the Python "
            f"process of all {nodes} nodes (with torch)")


def hivemind(results: Results) -> str:
    """apiary's DHT and averaging figures beside hivemind's, each part where both were measured."""
    theirs_dht, theirs_averaging = results("hivemind", "dht"), results("hivemind", "averaging")
    ours_dht, ours_averaging = results("dht", None), results("averaging", None)
    rows, notes, version = [], [], None
    if theirs_dht is None or ours_dht is None:
        notes.append(missing("/tmp/hivemind-venv/bin/python benchmarks/hivemind_reference.py dht --mode node "
                             "--nodes 64 --rounds 3"))
    else:
        theirs, ours, version = theirs_dht["figures"], ours_dht["figures"]["all"], theirs_dht["figures"]["version"]
        notes.append(f"_hivemind DHT {measured(theirs_dht)}: `{' '.join(theirs_dht['command'])}`._")
        rows += [
            ["DHT: store p50 / p99", f"{ours['store_p50_ms']:.0f} / {ours['store_p99_ms']:.0f} ms",
             f"{theirs['store_p50_ms']:.0f} / {theirs['store_p99_ms']:.0f} ms"],
            ["DHT: get p50 / p99", f"{ours['get_p50_ms']:.0f} / {ours['get_p99_ms']:.0f} ms",
             f"{theirs['get_p50_ms']:.0f} / {theirs['get_p99_ms']:.0f} ms"],
            ["DHT: gets found", f"{percent(ours['gets_ok'])} of {ours['gets']}",
             f"{percent(theirs['gets_ok'])} of {theirs['gets']}"],
            ["DHT: memory", f"{ours_dht['figures']['cli_rss_mb']['peak']:.0f} MB RSS per standalone node "
             "(`apiary dht`, no torch)", hivemind_memory(theirs["memory_mb"]["stored"], theirs["nodes"])],
        ]
    if theirs_averaging is None or ours_averaging is None:
        notes.append(missing("/tmp/hivemind-venv/bin/python benchmarks/hivemind_reference.py averaging "
                             "--numel 100000000"))
    else:
        mine, other = ours_averaging["figures"], theirs_averaging["figures"]
        version = other["version"]
        notes.append(f"_hivemind averaging {measured(theirs_averaging)}: `{' '.join(theirs_averaging['command'])}`._")
        for codec in ("none", "float16"):
            if codec in mine["round_seconds"] and codec in other["codecs"]:
                them = other["codecs"][codec]
                ours_seconds = mine["round_seconds"][codec]
                rows.append([f"all-reduce, 4 peers, codec {codec}: seconds (raw bound / round, same run)",
                             f"{ours_seconds:.2f} s ({ratio(mine['raw_seconds'], ours_seconds)})",
                             f"{them['trigger']:.2f} s after trigger ({ratio(other['raw_seconds'], them['trigger'])}), "
                             f"{them['step']:.2f} s per `step()` ({ratio(other['raw_seconds'], them['step'])})"])
    theirs_moe = results("hivemind", "moe")
    if theirs_moe is None:
        notes.append(missing("/tmp/hivemind-venv/bin/python benchmarks/hivemind_reference.py moe"))
    else:
        m = theirs_moe["figures"]
        version = m["version"]
        notes.append(f"_hivemind and apiary MoE layers {measured(theirs_moe)}: `{' '.join(theirs_moe['command'])}`._")
        rows.append([f"MoE layer, {m['servers']} servers, {m['grid'][0]}×{m['grid'][1]} ffn experts of {m['hidden']}, "
                     f"k {m['k']}, batch {m['batch']}: forward + backward samples/s (same run)",
                     f"{m['apiary_samples_per_second']:.0f}",
                     f"{m['hivemind_samples_per_second']:.0f} "
                     f"({ratio(m['hivemind_samples_per_second'], m['apiary_samples_per_second'])} × apiary's)"])
    text = "\n".join(notes)
    return text if not rows else text + "\n\n" + table(["", "apiary", f"hivemind {version}"], rows)


def flagship(results: Results, preset: str | None = "quick") -> str:
    """moe_lm across trainer and expert-server processes against local references, and under faults."""
    result = results("flagship", preset)
    if result is None:
        return missing(".venv/bin/python benchmarks/flagship.py" + (" --quick" if preset else ""))
    f = result["figures"]
    swarm, local, dense = f["swarm"], f["local"], f["dense"]
    sequences = swarm["sequences_before_faults"]
    bound = 2 * f["timeout"] + 1
    rows = [
        [f"held-out loss after {sequences} sequences", f"{swarm['loss_before_faults']:.3f}", f"{local['loss']:.3f}",
         f"{dense['loss']:.3f}",
         f"swarm / local {ratio(swarm['loss_before_faults'], local['loss'])} (target: within 5%); MoE (local) "
         f"{'lower' if local['loss'] < dense['loss'] else 'not lower'} than dense"],
        ["tokens/s", f"{swarm['tokens_per_second']:.0f}", f"{local['tokens_per_second']:.0f}",
         f"{dense['tokens_per_second']:.0f}", f"swarm / local {ratio(swarm['tokens_per_second'], local['tokens_per_second'])}"],
        [f"after one expert server killed and one paused: {swarm['steps_after_faults']} steps",
         f"loss {swarm['loss_before_faults']:.3f} → {swarm['loss_end']:.3f}", "", "",
         f"loss {'falls' if swarm['loss_end'] < swarm['loss_before_faults'] else 'does not fall'}"],
        ["step (forward + backward), median before / after the faults, longest after",
         f"{swarm['step_seconds_median']:.2f} / {swarm['step_seconds_median_after_faults']:.2f} / "
         f"{swarm['step_seconds_max_after_faults']:.2f} s", "", "",
         f"longest ≤ MoE timeouts + 1 s = {bound:g} s: {'met' if swarm['step_seconds_max_after_faults'] <= bound else 'not met'}"],
    ]
    header = [f"{f['preset']}: {f['peers']} trainers, {f['servers']} expert servers", "swarm (remote experts)",
              "one process, local experts", "one process, dense", "verdict"]
    return provenance(result) + "\n\n" + table(header, rows)


FUZZ_LABELS = {
    "noop": "noop (reference)",
    "rpc_request": "rpc_request (every public request type + DHT checks and signatures)",
    "tensor_message": "tensor_message (single-message tensors, as experts get them)",
    "chunk_stream": "chunk_stream (chunked tensors under a byte budget)",
    "bulk_frame": "bulk_frame (bulk request frames and headers)",
    "codec_part": "codec_part (averaging parts through every codec)",
}


def fuzz(results: Results) -> str:
    result = results("fuzz", None)
    if result is None:
        return missing(".venv/bin/python benchmarks/fuzz.py --seconds 60")
    targets = result["figures"]["targets"]
    reference = targets["noop"]["executions"] / targets["noop"]["seconds"]
    rows = [[FUZZ_LABELS.get(name, name), f"{t['executions']:,}", f"{t['executions'] / t['seconds']:,.0f}",
             f"{t['executions'] / t['seconds'] / reference:.3f}", str(t["findings"])] for name, t in targets.items()]
    header = ["target (`fuzz/targets.py`)", "executions", "exec/s", "ratio to noop", "findings"]
    return provenance(result) + f" Engine: {result['figures']['engine']}.\n\n" + table(header, rows)


def allreduce_wan(results: Results) -> str:
    result = results("allreduce_wan", "allreduce")
    if result is None:
        return missing("sudo .venv/bin/python benchmarks/allreduce_wan.py --parts allreduce")
    rows = [[f"{r['mbit_per_s'] / 1000:g} Gbit/s" if r["mbit_per_s"] >= 1000 else f"{r['mbit_per_s']:g} Mbit/s",
             f"{r['round_seconds']:.2f} s", f"{r['bound_seconds']:.2f} s", ratio(r["bound_seconds"], r["round_seconds"])]
            for r in result["figures"]["rates"]]
    return provenance(result) + "\n\n" + table(["links", "round time", "bound 2·S·(n−1)/(n·B)", "bound / round"], rows)


def allreduce_wan_training(results: Results) -> str:
    result = results("allreduce_wan", "training")
    if result is None:
        return missing("sudo .venv/bin/python benchmarks/allreduce_wan.py --parts training")
    f = result["figures"]
    modes = f["modes"]
    rows = [[label, f"{m['epochs']:g}", str(m["samples"]), f"{m['seconds']:.1f} s", f"{m['seconds'] / m['epochs']:.2f} s",
             f"{m['bytes'] / m['epochs'] / 1e6:.2f}", f"{m['bytes'] / 1e6:.1f}", f"{m['loss']:.2f}"]
            for label, m in (("gradient averaging", modes["gradients"]), (f"DiLoCo (H = {f['diloco_h']})", modes["diloco"]))]
    gradients, diloco = modes["gradients"], modes["diloco"]
    rows.append(["gradients / DiLoCo", "", "", f"{gradients['seconds'] / diloco['seconds']:.1f}×", "",
                 f"{(gradients['bytes'] / gradients['epochs']) / (diloco['bytes'] / diloco['epochs']):.1f}×",
                 f"{gradients['bytes'] / diloco['bytes']:.1f}×", ""])
    header = ["mode", "epochs", "samples trained", "wall time", "per epoch", "MB per epoch per peer", "MB per peer",
              "held-out loss"]
    return provenance(result) + "\n\n" + table(header, rows)


RELAY_LABELS = ["veth both ends (reference)", "relay on the receiver's link, no delay",
                "relay on both links, 20 ms RTT each", "same, TAP offloads off (as every link with loss runs)"]


def relay_ceiling(results: Results) -> str:
    result = results("relay_ceiling", None)
    if result is None:
        return missing("sudo .venv/bin/python benchmarks/relay_ceiling.py")
    rates = list(result["figures"]["mbit_per_s"].values())
    rows = [[label, f"{rate:.0f}", ratio(rate, rates[0])] for label, rate in zip(RELAY_LABELS, rates)]
    return provenance(result) + "\n\n" + table(["link", "Mbit/s", "ratio to veth"], rows)


TRUST_LABELS = {"open": "open plaintext (reference)", "private": "private (token + signed call)", "tls": "TLS",
                "private+tls": "private + TLS"}


def trust(results: Results) -> str:
    result = results("trust", None)
    if result is None:
        return missing(".venv/bin/python benchmarks/trust.py")
    runs = result["figures"]["runs"]
    reference = runs["open"]
    rows = [[TRUST_LABELS[kind], f"{r['ping_ms']:.2f}", ratio(r["ping_ms"], reference["ping_ms"]),
             f"{r['bulk_mb_per_s']:.0f}", ratio(r["bulk_mb_per_s"], reference["bulk_mb_per_s"])]
            for kind, r in runs.items()]
    return provenance(result) + "\n\n" + table(["run", "Ping median ms", "ratio", "bulk MB/s", "ratio"], rows)


def rate(value: float) -> str:
    """Bytes per second in kB/s or MB/s."""
    return f"{value / 1e6:.1f} MB/s" if value >= 1e6 else f"{value / 1e3:.0f} kB/s"


def scale(results: Results) -> str:
    result = results("scale", None)
    if result is None:
        return missing(".venv/bin/python benchmarks/scale.py")
    rows = []
    labels = {"before": "one key", "sharded": "sharded, read to the end", "after": "sharded"}
    for row in result["figures"]["rows"]:
        for mode, label in labels.items():
            f = row.get(mode)
            if f is None:
                if mode == "before":
                    rows.append([f"{row['peers']:,}", label, "—", "—", "one key cannot hold them (max_subkeys)", "—",
                                 "—", "—", "—"])
                continue
            by_method = f["by_method_bytes_per_second"]
            ends = f.get("epoch_end_over_target")
            rows.append([f"{row['peers']:,}", label, str(f.get("shards", 1)), f"{f['period_seconds'] * 1000:.0f} ms",
                         rate(f["peer_bytes_per_second"]), rate(f["busiest_bytes_per_second"]),
                         rate(by_method.get("Find", 0)), rate(by_method.get("Store", 0)),
                         " / ".join(f"{end:.2f}×" for end in ends) if ends else "exact"])
    header = ["peers", "progress", "shards", "refresh period", "per peer", "busiest node", "Find per peer",
              "Store per peer", "epoch ends at (first reader / median / last)"]
    return provenance(result) + "\n\n" + table(header, rows)


def scale_sockets(results: Results) -> str:
    """One progress round on real sockets and in the simulator (scale_sockets.py)."""
    result = results("scale-sockets", None)
    if result is None:
        return missing(".venv/bin/python benchmarks/scale_sockets.py")
    f = result["figures"]

    def side(label: str, g: dict[str, Any]) -> list[str]:
        by_method, calls, counted = g["served_per_peer_by_method"], g["calls_per_peer_by_method"], g["counted_peers"]
        return [label, f"{g['served_per_peer'] / 1e3:.1f} kB", f"{by_method.get('Find', 0) / 1e3:.1f} kB",
                f"{calls.get('Find', 0):.1f}", f"{by_method.get('Store', 0) / 1e3:.1f} kB",
                f"{g['served_busiest'] / 1e3:.1f} kB", str(g["aggregators"]),
                f"{counted[0]:g}" if counted[0] == counted[2] else f"{counted[0]:g}–{counted[2]:g}", str(g["shards"])]

    ratios = f["sockets_over_simulator"]
    rows = [side(f"{f['peers']} real nodes, {f['workers']} processes", f["sockets"]), side("the simulator", f["simulator"]),
            ["real / simulator", f"{ratios['served_per_peer']:.2f}", "", "", "", f"{ratios['served_busiest']:.2f}", "", "", ""]]
    return provenance(result) + "\n\n" + table(
        ["peers", "served per peer", "Find", "Find calls", "Store", "busiest node", "aggregators", "swarm counted",
         "shards"], rows)


def scale_moshpit(results: Results) -> str:
    """Rounds of Moshpit averaging to 1e-6 of the initial spread (scale.py --moshpit)."""
    result = results("scale", "moshpit")
    if result is None:
        return missing(".venv/bin/python benchmarks/scale.py --moshpit 1000 10000")
    rows = [[f"{row['peers']:,}", f"{row['dims']}-D, side {row['side']}", f"{row['failures_per_round']:.0%}",
             "not within 80 rounds" if row["rounds"] is None else str(row["rounds"]), f"{row['survivors']:,}",
             f"{row['spreads'][-1]:.1e}"] for row in result["figures"]["rows"]]
    return provenance(result) + "\n\n" + table(
        ["peers", "grid (groups of 16)", "failing per round", "rounds to 1e-6", "survivors", "spread then"], rows)


def meets(value: float, target: str, ok: bool) -> str:
    return f"{target}: {'met' if ok else 'not met'} ({value:.2f})"


def relay(results: Results, preset: str | None) -> str:
    """Bulk and all-reduce through a relay against direct (relay.py; relay_netns.py)."""
    result = results("relay", preset)
    if result is None:
        return missing("sudo .venv/bin/python benchmarks/relay_netns.py" if preset else ".venv/bin/python "
                       "benchmarks/relay.py")
    f = result["figures"]
    rates, pings = f["mb_per_s"], f["ping_ms"]
    rows = [[f"bulk, one {f['mib']} MiB tensor (MB/s, median of {f['repeats']})", f"{rates['direct']:.1f}",
             f"{rates['relayed']:.1f}", meets(f["ratio"], "≥ 0.8 of direct", f["ratio"] >= 0.8)]]
    for a in f.get("allreduce", []):
        rows.append([f"all-reduce, {a['peers']} workers × {a['mib']} MiB float32 (s per round, median of "
                     f"{f['repeats']})", f"{a['round_s']['direct']:.2f}", f"{a['round_s']['relayed']:.2f}",
                     meets(a["ratio"], "≥ 0.8 of direct (direct s / relayed s)", a["ratio"] >= 0.8)])
    rows.append(["Ping (ms, median of 20)", f"{pings['direct']:.2f}", f"{pings['relayed']:.2f}", ""])
    figures = table(["measure", "direct", "through the relay", "target"], rows)
    times = [["relay CPU, s per Gbit relayed", f"{f['relay_cpu_s_per_gbit']:.3f}", ""],
             ["a reservation held, s from the target's start", f"{f['reservation_s']:.2f}", ""],
             ["a usable reservation (its own Ping answered through the relay), s from its start",
              f"{f['usable_reservation_s']:.2f}", meets(f["usable_reservation_s"], "< 5 s",
                                                         f["usable_reservation_s"] < 5)]]
    if "verdict" in f:
        v = f["verdict"]
        started = v["started_s"]
        times += [["NATed `apiary dht`: started (admin line printed), s from its launch", f"{started:.2f}", ""],
                  [f"its verdict (`{v['verdict']}`), s from its launch / from its start",
                   f"{v['verdict_s']:.2f} / {v['verdict_s'] - started:.2f}",
                   meets(v["verdict_s"] - started, "< 5 s from its start", v["verdict_s"] - started < 5)],
                  ["its relayed address announced, s from its launch / from its start",
                   f"{v['relayed_s']:.2f} / {v['relayed_s'] - started:.2f}", ""],
                  ["that address answering a Ping from another host, s from its launch / from its start",
                   f"{v['usable_s']:.2f} / {v['usable_s'] - started:.2f}",
                   meets(v["usable_s"] - started, "< 5 s from its start", v["usable_s"] - started < 5)]]
    return (provenance(result) + "\n\n" + figures + "\n\n" + table(["measure", "value", "target"], times))


TABLES: dict[str, Callable[[Results], str]] = {
    "wire": wire, "dht": dht, "averaging": averaging, "averaging-verify": averaging_verify,
    "moshpit_churn": moshpit_churn, "moe": moe, "moe-cuda-float32": lambda results: moe(results, "cuda-float32"),
    "moe-cuda-bfloat16": lambda results: moe(results, "cuda-bfloat16"), "training": training, "hivemind": hivemind, "fuzz": fuzz,
    "allreduce_wan": allreduce_wan, "allreduce_wan-training": allreduce_wan_training,
    "relay_ceiling": relay_ceiling, "trust": trust, "memory": lambda results: memory(results, None),
    "memory-cuda": lambda results: memory(results, "cuda"), "powersgd": powersgd,
    "relay": lambda results: relay(results, None), "relay-netns": lambda results: relay(results, "netns"), "scale": scale,
    "scale-moshpit": scale_moshpit, "scale-sockets": scale_sockets, "flagship": flagship,
    "flagship-full": lambda results: flagship(results, None),
}


def render(name: str, folder: Path = RESULTS) -> str:
    """The markdown of table `name` from the results in `folder`."""
    return TABLES[name](lambda benchmark, preset: load(benchmark, preset, folder))
