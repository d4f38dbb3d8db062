"""Trace context crosses the wire: a server span is the child of the client span that called it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from wire_helpers.services import TROUBLE, Trouble, eventually
from wire_helpers.tensors import as_stream

from apiary.wire import PROBE, ChannelPool, Endpoint, Identity, RemoteFailure, RpcClient, RpcServer, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingRequest, SinkRequest
from apiary.wire.tensors import tensor_payload, tensors_to_chunks


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter on the process's SDK tracer provider (installed here if there is none;
    OpenTelemetry allows one global provider per process, and other tests may have set it)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        pytest.skip(f"a non-SDK tracer provider ({type(provider).__name__}) is already global")
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()  # later spans are no longer collected


@pytest.fixture
async def server() -> AsyncIterator[RpcServer]:
    server = RpcServer(WireSettings(listen_host="127.0.0.1"), Identity.generate())
    server.add_service(TROUBLE, Trouble())
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture
async def pool() -> AsyncIterator[ChannelPool]:
    async with ChannelPool(WireSettings(default_timeout=10)) as pool:
        yield pool


def spans_of_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.context.trace_id == trace_id]


def one(spans: list[ReadableSpan], name: str, kind: trace.SpanKind) -> ReadableSpan:
    matching = [span for span in spans if span.name == name and span.kind == kind]
    assert len(matching) == 1, f"expected one {kind.name} span {name!r}, got {[(s.name, s.kind) for s in spans]}"
    return matching[0]


def assert_parent_chain(
    spans: list[ReadableSpan], name: str, parent: ReadableSpan
) -> tuple[ReadableSpan, ReadableSpan]:
    client = one(spans, name, trace.SpanKind.CLIENT)
    served = one(spans, name, trace.SpanKind.SERVER)
    assert client.parent is not None and client.parent.span_id == parent.context.span_id
    assert served.parent is not None
    assert served.parent.span_id == client.context.span_id  # the server's parent is the caller's span
    assert served.parent.is_remote
    assert {span.context.trace_id for span in (parent, client, served)} == {parent.context.trace_id}
    return client, served


async def test_grpc_call_continues_the_callers_trace(
    spans: InMemorySpanExporter, server: RpcServer, pool: ChannelPool
) -> None:
    test_tracer = trace.get_tracer("apiary.tests")
    with test_tracer.start_as_current_span("train-step") as parent:
        await RpcClient(pool, PROBE, server.local_endpoint).call("Ping", PingRequest())
        await RpcClient(pool, PROBE, server.local_endpoint).call(
            "Sink", as_stream(tensors_to_chunks([torch.ones(10)], 1024))
        )
    trace_spans = spans_of_trace(spans, parent.get_span_context().trace_id)
    root = one(trace_spans, "train-step", trace.SpanKind.INTERNAL)
    _, served = assert_parent_chain(trace_spans, "apiary.wire.Probe/Ping", root)
    assert served.attributes is not None and served.attributes["rpc.method"] == "Ping"
    assert_parent_chain(trace_spans, "apiary.wire.Probe/Sink", root)


async def test_failed_call_marks_both_spans(spans: InMemorySpanExporter, server: RpcServer, pool: ChannelPool) -> None:
    with trace.get_tracer("apiary.tests").start_as_current_span("step") as parent:
        with pytest.raises(RemoteFailure):
            await RpcClient(pool, TROUBLE, server.local_endpoint).call("Crash", PingRequest())
    trace_id = parent.get_span_context().trace_id
    await eventually(lambda: any(span.kind == trace.SpanKind.SERVER for span in spans_of_trace(spans, trace_id)))
    trace_spans = spans_of_trace(spans, trace_id)
    root = one(trace_spans, "step", trace.SpanKind.INTERNAL)
    client, served = assert_parent_chain(trace_spans, "apiary.test.Trouble/Crash", root)
    assert served.status.status_code == trace.StatusCode.ERROR
    assert "the disk is on fire" in (served.status.description or "")
    assert client.status.status_code == trace.StatusCode.ERROR


async def test_bulk_call_continues_the_callers_trace(spans: InMemorySpanExporter, server: RpcServer) -> None:
    assert server.bulk is not None
    client = BulkClient(WireSettings(default_timeout=10))
    try:
        with trace.get_tracer("apiary.tests").start_as_current_span("average") as parent:
            await client.call(Endpoint("127.0.0.1", server.bulk.port), SINK_ROUTE,
                              body=SinkRequest(digest=True).SerializeToString(),
                              tensors=[tensor_payload(torch.arange(100))])
    finally:
        await client.close()
    trace_spans = spans_of_trace(spans, parent.get_span_context().trace_id)
    assert_parent_chain(trace_spans, f"bulk {SINK_ROUTE}", one(trace_spans, "average", trace.SpanKind.INTERNAL))
