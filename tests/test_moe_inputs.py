"""Experts with several inputs, keyword inputs and several outputs, end to end: a worker process
hosts them, RemoteExpert(*args, **kwargs) calls them, calls off their schema are refused."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from moe_expert_worker import build_local, serving
from moe_kinds import CONTEXT

from apiary.moe import RemoteExpert
from apiary.wire import RequestRejected

HIDDEN = 16
EXPERTS = [
    ["blend.0.0", "moe_kinds:BLEND", HIDDEN, 0],
    ["block.0.0", "transformer", HIDDEN, 1],
    ["half.0.0", "moe_kinds:BLEND", HIDDEN, 0, "bfloat16"],  # blend.0.0's weights, computing in bfloat16
]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    # lr=0: backward passes leave the weights as they are, so the local copies stay exact
    with serving({"experts": EXPERTS, "max_batch_size": 64, "max_wait_seconds": 0.2, "lr": 0.0}) as address:
        yield address


def blend_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(batch, HIDDEN), torch.randn(batch, CONTEXT), torch.rand(batch, 1) + 0.5


def test_several_inputs_a_keyword_and_two_outputs_forward_and_backward_as_the_local_module(endpoint: str) -> None:
    remote, local = RemoteExpert(endpoint, "blend.0.0", timeout=10), build_local(*EXPERTS[0])
    tensors = blend_inputs(5)
    remote_in = [t.clone().requires_grad_(True) for t in tensors]
    local_in = [t.clone().requires_grad_(True) for t in tensors]
    y, gate = remote(remote_in[0], remote_in[1], scale=remote_in[2])
    y_local, gate_local = local(local_in[0], local_in[1], scale=local_in[2])
    torch.testing.assert_close(y, y_local, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gate, gate_local, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(y)
    ((y * weights).sum() + gate.pow(2).sum()).backward()
    ((y_local * weights).sum() + gate_local.pow(2).sum()).backward()
    for name, a, b in zip(("x", "context", "scale"), remote_in, local_in):
        assert a.grad is not None, f"no gradient reached the input {name}"
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    info = remote.info()
    assert [(t.name, list(t.dims), t.dtype, t.optional) for t in info.inputs] == [
        ("", [str(HIDDEN)], "float32", False), ("", [str(CONTEXT)], "float32", False), ("scale", ["1"], "float32", False)]
    assert [list(t.dims) for t in info.outputs] == [[str(HIDDEN)], ["1"]]


def test_a_bfloat16_expert_takes_every_float_input_in_bfloat16(endpoint: str) -> None:
    half = RemoteExpert(endpoint, "half.0.0", timeout=10, dtype=None)
    full = RemoteExpert(endpoint, "blend.0.0", timeout=10)
    tensors = blend_inputs(32)
    grads = []
    for remote in (half, full):
        inputs = [t.clone().requires_grad_(True) for t in tensors]
        y, gate = remote(inputs[0], inputs[1], scale=inputs[2])
        assert y.dtype == gate.dtype == torch.float32  # back in the caller's dtype
        (y.sum() + gate.sum()).backward()
        grads.append([t.grad for t in inputs])
    assert half.wire_dtype() == torch.bfloat16
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    assert half.bytes_sent < 0.55 * full.bytes_sent and half.bytes_received < 0.55 * full.bytes_received


def test_only_the_inputs_that_require_grad_get_one(endpoint: str) -> None:
    remote = RemoteExpert(endpoint, "blend.0.0", timeout=10)
    x, context, scale = blend_inputs(3)
    x.requires_grad_(True)
    y, _ = remote(x, context, scale=scale)
    y.sum().backward()
    assert x.grad is not None and context.grad is None and scale.grad is None


def test_a_transformer_block_takes_an_optional_padding_mask(endpoint: str) -> None:
    remote, local = RemoteExpert(endpoint, "block.0.0", timeout=10), build_local(*EXPERTS[1])
    x = torch.randn(3, 6, HIDDEN)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True  # the first sequence's last two positions are padding
    x_remote, x_local = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    masked = remote(x_remote, padding_mask=mask)
    expected = local(x_local, padding_mask=mask)
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        unmasked = remote(x)
        torch.testing.assert_close(unmasked, local(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked[0, :4], unmasked[0, :4])  # the padding no longer reaches the rest
    torch.testing.assert_close(masked[1:], unmasked[1:], atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(expected)
    (masked * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x_remote.grad, x_local.grad, atol=1e-5, rtol=1e-5)


def test_requests_that_cannot_share_a_batch_are_batched_apart(endpoint: str) -> None:
    """With and without the mask, and sequences of other lengths, arrive together: each caller gets its answer."""
    remote, local = RemoteExpert(endpoint, "block.0.0", timeout=10), build_local(*EXPERTS[1])
    calls = [(torch.randn(2, seq, HIDDEN), torch.rand(2, seq) < 0.3 if masked else None)
             for seq in (3, 5) for masked in (False, True) for _ in range(2)]
    for _, mask in calls:
        if mask is not None:
            mask[:, 0] = False  # no sequence is all padding
    before = remote.info()

    def call(inputs: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        x, mask = inputs
        return remote(x) if mask is None else remote(x, padding_mask=mask)

    with ThreadPoolExecutor(len(calls)) as pool, torch.no_grad():
        outputs = list(pool.map(call, calls))
        for (x, mask), y in zip(calls, outputs):
            torch.testing.assert_close(y, local(x, padding_mask=mask), atol=1e-5, rtol=1e-5)
    after = remote.info()
    assert after.forward_requests - before.forward_requests == len(calls)
    assert after.forward_batches - before.forward_batches < len(calls)  # alike requests still share batches


X, C, S = torch.randn(3, HIDDEN), torch.randn(3, CONTEXT), torch.ones(3, 1)
SEQ = torch.randn(2, 7, HIDDEN)


@pytest.mark.parametrize(
    ("name", "tensors", "keywords", "message"),
    [
        ("blend.0.0", [X], [], "takes 2 positional input tensors (float32[batch, 16], float32[batch, 4], "
                               "scale=float32[batch, 1]), got 1"),
        ("blend.0.0", [X, C, S], ["shift"], "unknown keyword input 'shift' (it takes scale)"),
        ("blend.0.0", [X, C, S, S], ["scale", "scale"], "the keyword input 'scale' is given twice"),
        ("blend.0.0", [X, C], [], "the keyword input 'scale' is missing"),
        ("blend.0.0", [X, C], ["scale"], "takes 2 positional input tensors"),
        ("blend.0.0", [X, torch.randn(3, 5), S], ["scale"], "input 1 shape is [3, 5], expected float32[batch, 4]"),
        ("blend.0.0", [X, C, S.double()], ["scale"], "keyword input 'scale' dtype is float64, expected float32"),
        ("blend.0.0", [X, torch.randn(2, CONTEXT), S], ["scale"],
         "input 1 shape is [2, 4], expected float32[batch, 4] with batch=3 as in the first input"),
        ("blend.0.0", [X, C, S.bfloat16()], ["scale"], "keyword input 'scale' dtype is bfloat16, expected float32"),
        ("block.0.0", [SEQ, torch.zeros(2, 7)], ["padding_mask"],
         "keyword input 'padding_mask' dtype is float32, expected bool"),
        ("block.0.0", [SEQ, torch.zeros(2, 6, dtype=torch.bool)], ["padding_mask"],
         "keyword input 'padding_mask' shape is [2, 6], expected bool[batch, seq] with seq=7 as in the first input"),
        ("block.0.0", [SEQ], ["padding_mask", "other"], "takes 1 positional input tensor"),
        ("half.0.0", [X, C.bfloat16(), S], ["scale"], "the float inputs come in float32 and bfloat16; send them all in one dtype"),
    ],
    ids=["count", "unknown-keyword", "twice", "missing-keyword", "keyword-for-positional", "shape", "dtype",
         "batch", "half-to-float32-expert", "mask-dtype", "mask-seq", "more-keywords-than-tensors", "mixed-dtypes"],
)
def test_calls_off_the_schema_are_refused_naming_what_and_the_server_keeps_serving(
        endpoint: str, name: str, tensors: list[torch.Tensor], keywords: list[str], message: str) -> None:
    remote = RemoteExpert(endpoint, name, timeout=10)
    with pytest.raises(RequestRejected) as raised:
        remote.call("Forward", tensors, keywords)
    assert message in str(raised.value) and f"'{name}'" in str(raised.value), str(raised.value)
    with torch.no_grad():
        y, gate = RemoteExpert(endpoint, "blend.0.0", timeout=10)(X, C, scale=S)
    assert y.shape == (3, HIDDEN) and gate.shape == (3, 1)


def test_a_backward_with_gradients_off_the_outputs_is_refused(endpoint: str) -> None:
    remote = RemoteExpert(endpoint, "blend.0.0", timeout=10)
    with pytest.raises(RequestRejected, match=r"output gradient 1 shape is \[3, 2\], expected \[3, 1\]"):
        remote.call("Backward", [X, C, S, torch.ones(3, HIDDEN), torch.ones(3, 2)], ["scale"])
    with pytest.raises(RequestRejected, match="takes the inputs, then the gradients of the 2 outputs; got 2 tensors"):
        remote.call("Backward", [X, C])
