"""The monitor's HTML, rendered on the server from the JSON of `apiary.monitor.view`.

`page()` is the whole document; `sections()` the part the page's script fetches again at each
refresh (`/sections`) and swaps in. The only chart, each run's throughput and loss over time, is
drawn by the script with the vendored uPlot from `/api/runs`.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

import apiary

SHORT_ID = 10  # characters of a peer id shown


def _short(peer_id: str | None) -> str:
    if not peer_id:
        return "—"
    return f'<span class="id" title="{escape(peer_id)}">{escape(peer_id[:SHORT_ID])}</span>'


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _number(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else escape(str(value))


def _bytes(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _table(headers: list[str], rows: list[list[str]], *, css: str = "", empty: str = "none") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td class="empty" colspan="{len(headers)}">{escape(empty)}</td></tr>'
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _peers(peers: dict[str, Any]) -> str:
    kinds = " ".join(f'<span class="chip">{escape(kind)} <b>{n}</b></span>' for kind, n in peers["by_kind"].items())
    rows = [[_short(p["peer_id"]), escape(p["kind"]), escape(p["version"]), escape(p["run"] or "—"),
             f'<span class="reach reach-{escape(p["reachability"])}">{escape(p["reachability"])}</span>',
             _duration(p["uptime_seconds"]), escape(p["device"]), _number(p["load"], 2),
             escape(", ".join(p["addresses"][:2]))] for p in peers["peers"]]
    return (f'<h2>Peers <span class="count" id="peer-count">{peers["count"]}</span></h2><p>{kinds}</p>'
            '<div class="scroll">'
            + _table(["peer", "kind", "version", "run", "reachability", "uptime", "device", "load", "address"], rows,
                     css="peers", empty="no peer records yet") + '</div>')


def _runs(runs: dict[str, Any]) -> str:
    parts = ['<h2>Runs</h2>']
    if not runs["runs"]:
        parts.append('<p class="empty">no run publishes progress yet</p>')
    for run in runs["runs"]:
        name = escape(run["run"])
        leaders = [[str(i + 1), _short(e["peer_id"]), _number(e["contributed"]), str(e["epoch"]),
                    _number(e["samples_per_second"]), "client" if e["client"] else ""]
                   for i, e in enumerate(run["leaderboard"])]
        events = [[time.strftime("%H:%M:%S", time.gmtime(e["time"])), escape(e["event"]), escape(e["kind"]),
                   _short(e["peer_id"])] for e in reversed(run["events"][-10:])]
        parts.append(
            f'<section class="run" data-run="{name}"><h3>{name}</h3>'
            f'<p class="figures">epoch <b class="epoch">{run["epoch"]}</b> · '
            f'<b class="sps">{_number(run["samples_per_second"])}</b> samples/s · loss <b>{_number(run["loss"], 4)}</b>'
            f' · {run["peers"]} peers</p>'
            f'<div class="plot" data-run="{name}"></div>'
            f'<div class="columns"><div><h4>Contributions</h4>'
            + _table(["#", "peer", "samples", "epoch", "samples/s", ""], leaders, css="leaderboard")
            + '</div><div><h4>Joining and leaving</h4>'
            + _table(["time (UTC)", "", "kind", "peer"], events, empty="no change seen yet")
            + '</div></div></section>')
    return "".join(parts)


def _experts(experts: dict[str, Any]) -> str:
    parts = ['<h2>Experts</h2>']
    if not experts["grids"]:
        parts.append('<p class="empty">no expert server publishes experts</p>')
    for grid in experts["grids"]:
        cells: dict[int, dict[str, str]] = {}
        for expert in grid["experts"]:
            row, column = expert["coordinates"][0], ".".join(map(str, expert["coordinates"][1:])) or "-"
            state = "declared" if expert["declared"] else "missing"
            title = escape(f'{expert["name"]} @ {expert["address"] or "not declared"} · load {expert["load"]} · '
                           f'forward {_ms(expert["forward_seconds"])}, backward {_ms(expert["backward_seconds"])}')
            cells.setdefault(row, {})[column] = (
                f'<span class="expert {state}" title="{title}" data-name="{escape(expert["name"])}">'
                f'{escape(expert["server"][:6]) if expert["server"] else "×"}</span>')
        columns = sorted({c for row in cells.values() for c in row}, key=lambda c: [int(x) for x in c.split(".") if x.isdigit()])
        rows = [[str(i)] + [row.get(c, "") for c in columns] for i, row in sorted(cells.items())]
        servers: dict[str, list[Any]] = {}
        for expert in grid["experts"]:
            if expert["server"]:
                servers.setdefault(expert["server"], [0, expert["load"], expert["forward_seconds"],
                                                      expert["backward_seconds"]])[0] += 1
        latency = [[_short(peer_id), str(count), _number(load, 2), _ms(forward), _ms(backward)]
                   for peer_id, (count, load, forward, backward) in sorted(servers.items())]
        parts.append(f'<h3>{escape(grid["prefix"])} <span class="muted">{grid["declared"]} of '
                     f'{len(grid["experts"])} declared, {grid["servers"]} servers</span></h3>'
                     + _table([grid["prefix"], *columns], rows, css="grid")
                     + _table(["server", "experts", "load", "forward", "backward"], latency, css="servers"))
    return "".join(parts)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _rounds(rounds: dict[str, Any]) -> str:
    parts = ['<h2>Averaging rounds</h2>']
    if not rounds["runs"]:
        parts.append('<p class="empty">no averager has published rounds yet</p>')
    for run in rounds["runs"]:
        results = ", ".join(f"{escape(k)} {v}" for k, v in sorted(run["results"].items()))
        rows = [[time.strftime("%H:%M:%S", time.gmtime(r["finished_at"])), _short(r["peer_id"]),
                 f'<span class="result-{escape(r["result"])}">{escape(r["result"])}</span>', str(r["group_size"]),
                 _number(r["seconds"], 2), _bytes(r["bytes"])] for r in run["rounds"][:20]]
        parts.append(f'<h3>{escape(run["run"])} <span class="muted">{run["averagers"]} averagers; {results}</span></h3>'
                     + _table(["finished (UTC)", "averager", "result", "group", "seconds", "bytes"], rows, css="rounds"))
    return "".join(parts)


def sections(swarm: dict[str, Any]) -> str:
    """The live part of the page, from `SwarmWatch.api()`."""
    if not swarm.get("ready"):
        error = f": {escape(swarm['error'])}" if swarm.get("error") else ""
        return f'<p class="empty" id="waiting">reading the swarm{error}…</p>'
    updated = time.strftime("%H:%M:%S", time.gmtime(swarm["time"]))
    error = f' · <span class="error">last reading failed: {escape(swarm["error"])}</span>' if swarm.get("error") else ""
    return (f'<p class="updated" data-time="{swarm["time"]}">read at {updated} UTC{error}</p>'
            + _peers(swarm["peers"]) + _runs(swarm["runs"]) + _experts(swarm["experts"]) + _rounds(swarm["rounds"]))


def page(swarm: dict[str, Any], refresh: float) -> str:
    """The whole page; its script refreshes it every `refresh` seconds."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>apiary monitor</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="static/uplot/uPlot.min.css"><link rel="stylesheet" href="static/monitor.css">
</head><body data-refresh="{refresh}">
<header><h1>apiary swarm</h1><span class="muted">monitor {escape(apiary.__version__)}</span></header>
<main id="live">{sections(swarm)}</main>
<script src="static/uplot/uPlot.iife.min.js"></script><script src="static/monitor.js"></script>
</body></html>"""
