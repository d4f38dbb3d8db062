"""Tests for apiary.telemetry: the admin endpoint, registries and tracing setup."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pydantic
import pytest
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

import apiary
from apiary.telemetry import (
    AdminServer,
    TracingSettings,
    configure_tracing,
    metric_prefix,
    new_registry,
    shutdown_tracing,
)


class FakeService:
    """Stands in for a service: a readiness flag, status fields and one counter."""

    def __init__(self) -> None:
        self.is_ready = True
        self.status_error: Exception | None = None
        self.ready_error: Exception | None = None
        self.registry = new_registry()
        self.things = Counter(
            f"{metric_prefix('test')}_things", "Things done by the test.", registry=self.registry
        )

    def status(self) -> dict[str, Any]:
        if self.status_error is not None:
            raise self.status_error
        return {"peers": 4, "experts": ["ffn.0", "ffn.1"]}

    def ready(self) -> bool:
        if self.ready_error is not None:
            raise self.ready_error
        return self.is_ready


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
async def admin(service: FakeService) -> AsyncIterator[AdminServer]:
    server = AdminServer(
        "test", registry=service.registry, status=service.status, ready=service.ready
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client(admin: AdminServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=admin.url, timeout=5.0) as client:
        yield client


# --- metrics helpers -------------------------------------------------------------------


def test_metric_prefix_turns_dashes_into_underscores() -> None:
    assert metric_prefix("expert-server") == "apiary_expert_server"
    assert metric_prefix("dht") == "apiary_dht"
    with pytest.raises(ValueError, match="bad name"):
        metric_prefix("bad name")


def test_new_registry_is_fresh_and_has_process_metrics() -> None:
    first, second = new_registry(), new_registry()
    assert first is not second
    # The same metric name can live in two registries (two services in one process).
    Counter("apiary_dup_total", "x", registry=first)
    Counter("apiary_dup_total", "x", registry=second)
    assert first.get_sample_value("process_cpu_seconds_total") is not None
    assert any(family.name == "python_info" for family in first.collect())  # platform


# --- admin server ----------------------------------------------------------------------


async def test_start_binds_a_free_port(admin: AdminServer) -> None:
    assert admin.port > 0
    assert admin.url == f"http://127.0.0.1:{admin.port}"


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_follows_ready_callable(
    client: httpx.AsyncClient, service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    response = await client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"ready": True})

    service.is_ready = False
    response = await client.get("/readyz")
    assert (response.status_code, response.json()) == (503, {"ready": False})

    service.is_ready = True
    service.ready_error = RuntimeError("dht unreachable")
    response = await client.get("/readyz")
    assert (response.status_code, response.json()) == (503, {"ready": False})
    assert "dht unreachable" in caplog.text


async def test_readyz_defaults_to_ready(service: FakeService) -> None:
    async with AdminServer("plain", registry=service.registry) as admin:
        async with httpx.AsyncClient(base_url=admin.url, timeout=5.0) as client:
            response = await client.get("/readyz")
            assert (response.status_code, response.json()) == (200, {"ready": True})
            status = (await client.get("/status")).json()
            assert set(status) == {"service", "version", "uptime_seconds"}


async def test_status_reports_service_version_uptime_and_fields(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/status")
    assert response.status_code == 200
    body = response.json()
    assert body["service"] == "test"
    assert body["version"] == apiary.__version__
    assert isinstance(body["uptime_seconds"], float) and body["uptime_seconds"] >= 0
    assert body["peers"] == 4
    assert body["experts"] == ["ffn.0", "ffn.1"]

    await asyncio.sleep(0.05)
    later = (await client.get("/status")).json()
    assert later["uptime_seconds"] > body["uptime_seconds"]


async def test_status_error_gives_500_and_server_keeps_serving(
    client: httpx.AsyncClient, service: FakeService
) -> None:
    service.status_error = KeyError("expert table")
    response = await client.get("/status")
    assert response.status_code == 500
    assert "KeyError" in response.json()["error"]
    assert "expert table" in response.json()["error"]

    assert (await client.get("/healthz")).status_code == 200
    service.status_error = None
    assert (await client.get("/status")).json()["peers"] == 4


async def test_status_not_json_serializable_gives_500(service: FakeService) -> None:
    async with AdminServer(
        "test", registry=service.registry, status=lambda: {"when": object()}
    ) as admin, httpx.AsyncClient(base_url=admin.url, timeout=5.0) as client:
        response = await client.get("/status")
        assert response.status_code == 500
        assert "TypeError" in response.json()["error"]
        assert (await client.get("/healthz")).status_code == 200


async def test_metrics_exposes_registry(client: httpx.AsyncClient, service: FakeService) -> None:
    service.things.inc(3)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")

    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    assert samples["apiary_test_things_total"] == 3.0
    assert "process_cpu_seconds_total" in samples
    assert "process_resident_memory_bytes" in samples

    service.things.inc()
    response = await client.get("/metrics")
    assert "apiary_test_things_total 4.0" in response.text


async def test_two_servers_run_at_once() -> None:
    one, two = FakeService(), FakeService()
    one.things.inc(1)
    two.things.inc(2)
    async with AdminServer("dht", registry=one.registry) as a, AdminServer(
        "averager", registry=two.registry
    ) as b:
        assert a.port != b.port
        async with httpx.AsyncClient(timeout=5.0) as client:
            status_a = (await client.get(f"{a.url}/status")).json()
            status_b = (await client.get(f"{b.url}/status")).json()
            assert (status_a["service"], status_b["service"]) == ("dht", "averager")
            metrics_b = (await client.get(f"{b.url}/metrics")).text
            assert "apiary_test_things_total 2.0" in metrics_b


async def test_port_in_use_raises_clear_error(admin: AdminServer, service: FakeService) -> None:
    tasks_before = asyncio.all_tasks()
    second = AdminServer("other", port=admin.port, registry=service.registry)
    with pytest.raises(OSError) as info:
        await second.start()
    message = str(info.value)
    assert f"127.0.0.1:{admin.port}" in message
    assert "in use" in message.lower()
    assert asyncio.all_tasks() == tasks_before
    await second.stop()  # never started: a no-op


async def test_stop_frees_port_and_leaves_no_tasks(service: FakeService) -> None:
    tasks_before = asyncio.all_tasks()
    admin = AdminServer("test", registry=service.registry)
    await admin.start()
    assert len(asyncio.all_tasks()) > len(tasks_before)  # the server task is running
    async with httpx.AsyncClient(base_url=admin.url, timeout=5.0) as client:
        assert (await client.get("/healthz")).status_code == 200
        await admin.stop()
        assert asyncio.all_tasks() == tasks_before
        with pytest.raises(httpx.ConnectError):
            await client.get("/healthz")
    await admin.stop()  # idempotent

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", admin.port), timeout=1.0).close()


async def test_stop_with_open_keepalive_connection(service: FakeService) -> None:
    tasks_before = asyncio.all_tasks()
    client = httpx.AsyncClient(timeout=5.0)
    try:
        async with AdminServer("test", registry=service.registry) as admin:
            assert (await client.get(f"{admin.url}/healthz")).status_code == 200
        # the keep-alive connection did not keep the server from stopping
        assert asyncio.all_tasks() == tasks_before
    finally:
        await client.aclose()


async def test_host_signal_handlers_are_left_alone(service: FakeService) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    async with AdminServer("test", registry=service.registry):
        assert {sig: signal.getsignal(sig) for sig in before} == before


async def test_start_twice_is_an_error(admin: AdminServer) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        await admin.start()


# --- tracing ---------------------------------------------------------------------------


@pytest.fixture
def clean_tracing() -> Any:
    yield
    shutdown_tracing()


def test_otlp_without_endpoint_is_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="otlp_endpoint"):
        TracingSettings(exporter="otlp")
    settings = TracingSettings(exporter="otlp", otlp_endpoint="http://collector:4317")
    assert settings.otlp_endpoint == "http://collector:4317"
    assert TracingSettings().exporter == "none"
    with pytest.raises(pydantic.ValidationError, match="exporter"):
        TracingSettings(exporter="jaeger")  # type: ignore[arg-type]


def _span_lines(text: str, name: str) -> list[dict[str, Any]]:
    """Spans printed by the console exporter (pretty-printed JSON objects) named ``name``."""
    decoder, spans, index = json.JSONDecoder(), [], 0
    while (start := text.find("{", index)) != -1:
        obj, index = decoder.raw_decode(text, start)
        if obj.get("name") == name:
            spans.append(obj)
    return spans


def test_console_tracing_prints_spans(capsys: pytest.CaptureFixture[str], clean_tracing: Any) -> None:
    provider = configure_tracing("test", TracingSettings(exporter="console"))
    assert isinstance(provider, TracerProvider)
    assert trace.get_tracer_provider() is provider
    assert provider.resource.attributes["service.name"].startswith("apiary-")

    again = configure_tracing("test", TracingSettings(exporter="console"))
    assert again is provider

    with provider.get_tracer("apiary.test").start_as_current_span("apiary-test-span") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
    provider.force_flush()

    spans = _span_lines(capsys.readouterr().out, "apiary-test-span")
    assert len(spans) == 1  # configuring twice did not add a second console exporter
    assert spans[0]["context"]["trace_id"] == f"0x{trace_id}"

    shutdown_tracing()
    shutdown_tracing()  # idempotent
    with provider.get_tracer("apiary.test").start_as_current_span("after-shutdown"):
        pass
    provider.force_flush()
    assert _span_lines(capsys.readouterr().out, "after-shutdown") == []


def test_none_exporter_still_propagates_context(clean_tracing: Any) -> None:
    provider = configure_tracing("test", TracingSettings())
    assert trace.get_tracer_provider() is provider
    with trace.get_tracer("apiary.test").start_as_current_span("rpc") as span:
        context = span.get_span_context()
        assert context.is_valid
        headers: dict[str, str] = {}
        inject(headers)
    assert headers["traceparent"].split("-")[1] == format(context.trace_id, "032x")


def test_otlp_exporter_reuses_provider(clean_tracing: Any) -> None:
    first = configure_tracing("dht", TracingSettings())
    otlp = configure_tracing(
        "averager", TracingSettings(exporter="otlp", otlp_endpoint="http://127.0.0.1:4317")
    )
    assert otlp is first
