"""The monitor's web app: the page, its live sections and the JSON API, over a `SwarmWatch`.

Routes (relative to where the app is mounted: `/` of `apiary monitor`, `/monitor/` of an
`apiary dht --monitor`):
    GET /             the page (HTML; its script refreshes it)
    GET /sections     the page's live part (HTML)
    GET /api/swarm    everything below in one object
    GET /api/peers    {"time", "count", "by_kind", "peers": [...]}
    GET /api/runs     {"time", "runs": [{"run", "epoch", "samples_per_second", "loss", "leaderboard", "history", "events"}]}
    GET /api/experts  {"time", "grids": [{"prefix", "experts": [...], "servers", "declared"}]}
    GET /api/rounds   {"time", "runs": [{"run", "averagers", "results", "rounds": [...]}]}
The API answers 503 `{"ready": false, "error"}` until the first reading of the swarm.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from apiary.monitor.page import page, sections
from apiary.monitor.view import SwarmWatch

STATIC = Path(__file__).parent / "static"
PARTS = ("peers", "runs", "experts", "rounds")


def monitor_app(watch: SwarmWatch) -> FastAPI:
    """The app serving `watch`'s readings."""
    app = FastAPI(title="apiary monitor", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page(watch.api(), watch.refresh))

    @app.get("/sections", response_class=HTMLResponse)
    async def live() -> HTMLResponse:
        return HTMLResponse(sections(watch.api()), headers={"Cache-Control": "no-store"})

    @app.get("/api/swarm")
    async def swarm() -> JSONResponse:
        data = watch.api()
        return JSONResponse(data, status_code=200 if data["ready"] else 503)

    def part(name: str) -> None:
        async def answer() -> JSONResponse:
            data = watch.api()
            if not data["ready"]:
                return JSONResponse(data, status_code=503)
            return JSONResponse({"time": data["time"], **data[name]})

        app.add_api_route(f"/api/{name}", answer, methods=["GET"], name=name)

    for name in PARTS:
        part(name)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def mount_monitor(app: FastAPI, watch: SwarmWatch, path: str = "/monitor") -> None:
    """Serves the monitor under `path` of another app (e.g. a dht service's admin endpoint)."""
    app.add_api_route(path, lambda: RedirectResponse(f"{path}/"), methods=["GET"], include_in_schema=False)
    app.mount(path, monitor_app(watch))
