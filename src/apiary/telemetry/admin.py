"""The admin HTTP endpoint every apiary service exposes: health, readiness, status, metrics.

:class:`AdminServer` runs a small FastAPI app with uvicorn inside the caller's asyncio loop,
so ``status()`` and ``ready()`` callbacks can read the service's state without locks. They
are called on the event loop and must be quick and non-blocking.

Routes:
    GET /healthz  200 ``{"status": "ok"}`` while the process serves requests (liveness); 503
                  ``{"status": "unhealthy", "problems": [...]}`` when the service's own
                  ``problems()`` callback names any (e.g. a gRPC server that stopped for good).
    GET /readyz   200 ``{"ready": true}`` or 503 ``{"ready": false}`` (readiness), with the
                  service's own ``detail()`` fields beside (e.g. its reachability).
    GET /status   service, version, uptime and the service's own ``status()`` fields.
    GET /metrics  Prometheus text exposition of the service's registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import apiary

__all__ = ["AdminServer"]

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 5.0


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host and reports when it is up."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the host process owns SIGINT/SIGTERM

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.up.set()


def _bind(host: str, port: int, service: str) -> socket.socket:
    """Bind a TCP socket to host:port, raising an OSError that names the address on failure."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(
            exc.errno, f"{service} admin server cannot listen on {host}:{port}: {exc}"
        ) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise OSError(
            exc.errno, f"{service} admin server cannot listen on {host}:{port}: {reason}"
        ) from exc
    return sock


class AdminServer:
    """Serves a service's admin endpoints on ``host:port`` (port 0 picks a free port)."""

    def __init__(
        self,
        service: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        registry: CollectorRegistry,
        status: Callable[[], Mapping[str, Any]] | None = None,
        ready: Callable[[], bool] | None = None,
        problems: Callable[[], list[str]] | None = None,
        detail: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.service = service
        self.host = host
        self._port = port
        self.registry = registry
        self._status = status
        self._ready = ready
        self._problems = problems
        self._detail = detail
        self._started_at = time.monotonic()
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = self._make_app()

    @property
    def port(self) -> int:
        """The bound port once started; the requested port before that."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the admin endpoint, e.g. ``http://127.0.0.1:9100``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def _make_app(self) -> FastAPI:
        app = FastAPI(
            title=f"apiary {self.service} admin",
            version=apiary.__version__,
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
        )

        @app.get("/healthz")
        async def healthz() -> JSONResponse:
            problems = self._current_problems()
            if problems:
                return JSONResponse({"status": "unhealthy", "problems": problems}, status_code=503)
            return JSONResponse({"status": "ok"})

        @app.get("/readyz")
        async def readyz() -> JSONResponse:
            ready = self._is_ready()
            return JSONResponse({"ready": ready, **self._readiness_detail()}, status_code=200 if ready else 503)

        @app.get("/status")
        async def status() -> JSONResponse:
            body: dict[str, Any] = {
                "service": self.service,
                "version": apiary.__version__,
                "uptime_seconds": time.monotonic() - self._started_at,
            }
            try:
                if self._status is not None:
                    body.update(self._status())
                return JSONResponse(body)
            except Exception as exc:  # a broken status() must not take the endpoint down
                logger.exception("%s admin: status() failed", self.service)
                return JSONResponse(
                    {"error": f"status() failed: {type(exc).__name__}: {exc}"}, status_code=500
                )

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return app

    def _current_problems(self) -> list[str]:
        if self._problems is None:
            return []
        try:
            return list(self._problems())
        except Exception as exc:
            logger.exception("%s admin: problems() failed; reporting unhealthy", self.service)
            return [f"problems() failed: {type(exc).__name__}: {exc}"]

    def _readiness_detail(self) -> Mapping[str, Any]:
        if self._detail is None:
            return {}
        try:
            return self._detail()
        except Exception:
            logger.exception("%s admin: detail() failed", self.service)
            return {}

    def _is_ready(self) -> bool:
        if self._ready is None:
            return True
        try:
            return bool(self._ready())
        except Exception:
            logger.exception("%s admin: ready() failed; reporting not ready", self.service)
            return False

    async def start(self) -> None:
        """Bind the socket and start serving; returns once requests can be accepted."""
        if self._task is not None:
            raise RuntimeError(f"{self.service} admin server is already running at {self.url}")
        sock = _bind(self.host, self._port, self.service)
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self._port,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(_STOP_TIMEOUT_S),
        )
        server = _EmbeddedServer(config)
        task = asyncio.create_task(
            server.serve(sockets=[sock]), name=f"apiary-{self.service}-admin"
        )
        up = asyncio.create_task(server.up.wait())
        try:
            await asyncio.wait({task, up}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while starting: leave nothing behind
            up.cancel()
            task.cancel()
            sock.close()
            raise
        if not server.up.is_set():
            up.cancel()
            sock.close()
            exc = None if task.cancelled() else task.exception()
            raise RuntimeError(
                f"{self.service} admin server on {self.host}:{self._port} failed to start"
            ) from exc
        await up
        self._server, self._task = server, task
        task.add_done_callback(self._on_server_exit)
        logger.info("%s admin endpoint at %s", self.service, self.url)

    def _on_server_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "%s admin server stopped unexpectedly", self.service, exc_info=task.exception()
            )

    async def stop(self) -> None:
        """Stop serving and wait for the server task to finish; safe to call repeatedly."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            async with asyncio.timeout(2 * _STOP_TIMEOUT_S):
                await asyncio.shield(task)
        except asyncio.TimeoutError:
            logger.warning("%s admin server did not stop in time; cancelling it", self.service)
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except asyncio.CancelledError:
            task.cancel()
            raise
        except Exception:
            pass  # already logged by _on_server_exit

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
