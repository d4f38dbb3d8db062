"""Compression codecs: round-trip error within the stated bound, bounds that mean something,
wire sizes, strict decoding of what peers send, lookup by name, adaptive choice, codec settings by role."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from apiary.averaging.averager import GRADIENTS, STATE, AveragerSettings
from apiary.averaging.compression import (
    CODECS,
    AdaptiveCodec,
    Blockwise8Bit,
    Codec,
    Float16,
    NoCompression,
    Quantile8Bit,
    ScaledFloat16,
    Uniform8Bit,
    codec_by_name,
)
from apiary.averaging.compression.selection import ADAPTIVE_THRESHOLD, codec_names, codec_selection
from apiary.wire.tensors import deserialize_tensor, serialize_tensor

NAMES = ["none", "float16", "scaled_float16", "uniform8", "blockwise8", "quantile8"]
LOSSY = [name for name in NAMES if name != "none"]
EIGHT_BIT = ["uniform8", "blockwise8"]
SIZES = [0, 1, 7, 4097, 1_000_003]


def sample(numel: int, seed: int = 0, scale: float = 3.0, shift: float = 0.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=generator) * scale + shift


def roundtrip(codec: Codec, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(decoded, max elementwise error against x as float32), checking the decoded form."""
    decoded = codec.decode(codec.encode(x), x.numel())
    assert decoded.dtype == torch.float32 and tuple(decoded.shape) == (x.numel(),)
    if x.numel() == 0:
        return decoded, 0.0
    return decoded, (decoded.double() - x.to(torch.float32).double()).abs().max().item()


def test_registry_lists_every_codec():
    assert sorted(CODECS) == sorted(NAMES)
    for name in NAMES:
        codec = codec_by_name(name)
        assert isinstance(codec, Codec) and codec.name == name
        assert codec_by_name(name) is not codec  # a fresh instance each time


@pytest.mark.parametrize("name", ["gzip", "", "Float16", None])
def test_codec_by_name_rejects_unknown_names_listing_known_ones(name):
    with pytest.raises(ValueError, match="unknown codec") as info:
        codec_by_name(name)
    assert all(known in str(info.value) for known in NAMES)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_normal_data_round_trip_is_within_a_meaningful_bound(name, numel):
    codec = codec_by_name(name)
    x = sample(numel, seed=numel)
    decoded, error = roundtrip(codec, x)
    bound = codec.error_bound(x)
    assert error <= bound
    if numel == 0:
        assert bound == 0.0
        return
    peak = x.abs().max().item()
    low, high = x.min().item(), x.max().item()
    if name == "none":
        assert bound == 0.0 and torch.equal(decoded, x)
    elif name == "float16":
        assert bound <= max(peak * 2.0**-11, 2.0**-25)
    elif name == "scaled_float16":
        spread = (x.double() - x.double().mean()).abs().max().item()
        assert bound <= spread * 2.0**-11 * 1.01 + 8 * 2.0**-24 * peak
    elif name == "quantile8":  # exact, and within one of 129 even steps of the range
        assert bound == error and bound <= (high - low) / 129 + 2.0**-23 * peak
    else:  # 8-bit: half a level of 255 across the range, well under 1% of it
        assert bound <= (high - low) / 255 * 0.5 * 1.001 + 2.0**-22 * peak
        if numel > 1:
            assert bound < 0.01 * (high - low)
    if name != "none" and numel >= 4097:  # and the bound is not wildly loose
        assert error >= bound / 4


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [0.0, 3.25, -1e-3, 12345.678, 2.0**-140])
@pytest.mark.parametrize("numel", [1, 4097, 30_000])
def test_constant_parts(name, value, numel):
    codec = codec_by_name(name)
    x = torch.full((numel,), value)
    decoded, error = roundtrip(codec, x)
    assert error <= codec.error_bound(x)
    assert torch.isfinite(decoded).all()
    if name in ("none", *EIGHT_BIT, "quantile8"):  # min + 0 * 0, or the mean of equal values: exact
        assert torch.equal(decoded, x)
    elif name == "float16":
        assert torch.equal(decoded, x.half().float())
    else:
        assert error <= abs(value) * 2.0**-20 + 2.0**-100


def cauchy(numel: int, seed: int) -> torch.Tensor:
    """Cauchy values (a ratio of normals): mostly small, a few enormous."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(2, numel, generator=generator, dtype=torch.float64)
    return (normal[0] / normal[1]).float()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("outlier", [1e4, 1e6, -3e9])
def test_parts_with_a_few_huge_outliers(name, outlier):
    codec = codec_by_name(name)
    x = sample(50_000, seed=1)
    x[[7, 20_000, 49_999]] = torch.tensor([outlier, -outlier / 2, outlier * 0.9])
    decoded, error = roundtrip(codec, x)
    assert error <= codec.error_bound(x)


@pytest.mark.parametrize("name", NAMES)
def test_cauchy_parts(name):
    codec = codec_by_name(name)
    x = cauchy(200_000, seed=2)
    assert x.abs().max() > 65504  # beyond float16: the clamp is exercised
    decoded, error = roundtrip(codec, x)
    assert error <= codec.error_bound(x)


def test_float16_clamps_beyond_its_range_and_says_so():
    codec = Float16()
    x = torch.tensor([1e6, -7e5, 1.0, 65504.0, -65519.0])
    decoded, error = roundtrip(codec, x)
    assert decoded.tolist() == [65504.0, -65504.0, 1.0, 65504.0, -65504.0]
    assert error == codec.error_bound(x) == 1e6 - 65504


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_8bit_bound_counts_float32_rounding_of_a_large_offset(name):
    codec = codec_by_name(name)
    x = 1000.0 + sample(10_000, seed=14, scale=3e-3, shift=0.0)  # a level is ~1.4 float32 ulps
    _, error = roundtrip(codec, x)
    half_level = (x.max() - x.min()).item() / 255 / 2
    assert half_level * 1.2 < error <= codec.error_bound(x)  # decoding rounds to float32's grid


def test_scaled_float16_keeps_precision_of_small_deviations_from_a_large_mean():
    x = 1000.0 + sample(10_000, seed=3, scale=1e-3, shift=0.0)
    _, plain = roundtrip(Float16(), x)
    _, scaled = roundtrip(ScaledFloat16(), x)
    deviation = (x - 1000.0).abs().max().item()
    assert plain == pytest.approx(deviation, rel=1e-3)  # float16 ulp at 1000 is 0.5: deviations lost
    assert scaled < deviation / 50 and scaled <= ScaledFloat16().error_bound(x)


def test_blockwise_confines_an_outlier_to_its_block():
    blocks, size, bad = 16, 4096, 5
    x = sample(blocks * size, seed=4, scale=1.0, shift=0.0)
    x[bad * size + 17] = 1000.0
    uniform, blockwise = Uniform8Bit(), Blockwise8Bit(size)
    u_decoded, u_error = roundtrip(uniform, x)
    b_decoded, b_error = roundtrip(blockwise, x)
    assert b_error <= blockwise.error_bound(x) and u_error <= uniform.error_bound(x)
    outside = torch.ones(x.numel(), dtype=torch.bool)
    outside[bad * size : (bad + 1) * size] = False
    b_outside = (b_decoded - x)[outside].abs().max().item()
    u_outside = (u_decoded - x)[outside].abs().max().item()
    # The clean blocks keep the precision they would have alone.
    clean_bound = max(blockwise.error_bound(x[: bad * size]), blockwise.error_bound(x[(bad + 1) * size :]))
    assert b_outside <= clean_bound < 0.01 * (x[outside].max() - x[outside].min()).item()
    assert u_outside > 20 * b_outside
    assert (b_decoded - x)[outside].abs().mean() * 20 < (u_decoded - x)[outside].abs().mean()


@pytest.mark.parametrize("block_size", [1, 3, 4096, 10_000])
def test_blockwise_block_sizes_and_ragged_last_block(block_size):
    codec = Blockwise8Bit(block_size)
    x = sample(4097, seed=block_size)
    encoded = codec.encode(x)
    assert encoded[1].shape == (2, math.ceil(4097 / block_size))
    assert encoded[2].tolist() == [block_size]
    decoded, error = roundtrip(codec, x)
    assert error <= codec.error_bound(x)
    if block_size == 1:  # every block is constant: exact
        assert torch.equal(decoded, x)


def test_blockwise_receiver_decodes_any_sender_block_size():
    x = sample(1000, seed=5)
    encoded = Blockwise8Bit(block_size=100).encode(x)
    received = codec_by_name("blockwise8").decode(encoded, 1000)
    assert torch.equal(received, Blockwise8Bit(block_size=100).decode(encoded, 1000))
    assert (received - x).abs().max() <= Blockwise8Bit(block_size=100).error_bound(x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes_are_compared_after_conversion_to_float32(name, dtype):
    codec = codec_by_name(name)
    x = sample(5000, seed=6).to(dtype)
    decoded, error = roundtrip(codec, x)
    assert error <= codec.error_bound(x)
    if name == "none":
        assert torch.equal(decoded, x.float())


@pytest.mark.parametrize("name", NAMES)
def test_encode_leaves_the_part_alone_and_returns_contiguous_cpu_tensors(name):
    codec = codec_by_name(name)
    base = sample(3 * 4097, seed=7)
    part = base[::3]  # a strided view
    before = part.clone()
    encoded = codec.encode(part)
    assert torch.equal(part, before)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in encoded)
    decoded, error = roundtrip(codec, part)
    assert error <= codec.error_bound(part)


@pytest.mark.parametrize("name", NAMES)
def test_encoded_tensors_survive_the_wire(name):
    codec = codec_by_name(name)
    x = sample(4097, seed=8)
    encoded = codec.encode(x)
    received = [deserialize_tensor(serialize_tensor(t), max_tensor_bytes=1 << 20) for t in encoded]
    assert torch.equal(codec.decode(received, x.numel()), codec.decode(encoded, x.numel()))


AWKWARD = [0.0, 1000.0, 1e-45, -3e-39, 1e-20, 7.0, -1e30, 65504.0, -65519.0, 1e6, 1000.001]
finite32 = st.floats(min_value=-(2.0**122), max_value=2.0**122, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(finite32, max_size=40) | st.lists(st.sampled_from(AWKWARD), max_size=40),
    name=st.sampled_from(NAMES),
    block_size=st.integers(1, 9),
)
def test_any_finite_part_round_trips_within_its_bound(values, name, block_size):
    codec = Blockwise8Bit(block_size) if name == "blockwise8" else codec_by_name(name)
    x = torch.tensor(values, dtype=torch.float32)
    decoded, error = roundtrip(codec, x)
    assert torch.isfinite(decoded).all()
    assert error <= codec.error_bound(x)


# ---------------------------------------------------------------- wire sizes

EXPECTED_RATIO = {  # bytes on the wire / float32 bytes, for 1_000_003 elements
    "none": (1.0, 1.0),
    "float16": (0.5, 0.5),
    "scaled_float16": (0.5, 0.50001),
    "uniform8": (0.25, 0.25001),
    "blockwise8": (0.25, 0.2505),
    "quantile8": (0.25, 0.2503),
}


@pytest.mark.parametrize("name", NAMES)
def test_wire_bytes_match_the_encoded_tensors(name):
    codec = codec_by_name(name)
    for numel in [0, 1, 4096, 4097, 1_000_003]:
        encoded = codec.encode(sample(numel, seed=9))
        assert sum(t.nbytes for t in encoded) == codec.wire_bytes(numel)
    low, high = EXPECTED_RATIO[name]
    ratio = codec.wire_bytes(1_000_003) / (4 * 1_000_003)
    assert low <= ratio <= high


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "part, problem",
    [
        (torch.zeros(3, 4), "1-D"),
        (torch.tensor(1.0), "1-D"),
        (torch.arange(5), "floating"),
        (torch.ones(4, dtype=torch.bool), "floating"),
        (torch.ones(4, dtype=torch.complex64), "floating"),
        ([1.0, 2.0], "torch.Tensor"),
    ],
)
def test_encode_rejects_parts_that_are_not_1d_float_tensors(name, part, problem):
    codec = codec_by_name(name)
    with pytest.raises(ValueError, match=problem):
        codec.encode(part)
    with pytest.raises(ValueError, match=problem):
        codec.error_bound(part)


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_lossy_codecs_reject_non_finite_parts(name, bad):
    codec = codec_by_name(name)
    x = sample(5000, seed=10)
    x[1234] = bad
    with pytest.raises(ValueError, match="inf or NaN"):
        codec.encode(x)
    with pytest.raises(ValueError, match="inf or NaN"):
        codec.error_bound(x)


def test_codecs_reject_spreads_beyond_float32():
    x = torch.tensor([-3e38, 3e38])
    for codec in [Uniform8Bit(), Blockwise8Bit()]:  # max - min overflows
        with pytest.raises(ValueError, match="span"):
            codec.encode(x)
    decoded, error = roundtrip(ScaledFloat16(), x)  # x - mean does not
    assert error <= ScaledFloat16().error_bound(x) < 3e38 * 2.0**-10
    lopsided = torch.tensor([-3e38] + [3e38] * 99)  # the mean is near 3e38: x - mean overflows
    with pytest.raises(ValueError, match="span"):
        ScaledFloat16().encode(lopsided)


def _other_dtype(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float64) if tensor.is_floating_point() else tensor.to(torch.int32)


GENERIC_DAMAGE = {
    "missing tensor": (lambda enc: enc[:-1], "expected"),
    "extra tensor": (lambda enc: [*enc, torch.zeros(1)], "expected"),
    "no tensors": (lambda enc: [], "expected"),
    "wrong dtype": (lambda enc: [_other_dtype(enc[0]), *enc[1:]], "must be torch"),
    "2-D values": (lambda enc: [enc[0].view(1, -1), *enc[1:]], "shape"),
    "a list in place of a tensor": (lambda enc: [enc[0].tolist(), *enc[1:]], "must be a tensor"),
    "a bare tensor": (lambda enc: enc[0], "sequence of tensors"),
}


@pytest.mark.parametrize("damage", list(GENERIC_DAMAGE))
@pytest.mark.parametrize("name", NAMES)
def test_decode_rejects_malformed_tensor_lists(name, damage):
    codec = codec_by_name(name)
    encoded = codec.encode(sample(4097, seed=11))
    change, problem = GENERIC_DAMAGE[damage]
    with pytest.raises(ValueError, match=problem):
        codec.decode(change(list(encoded)), 4097)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("numel", [4096, 4098, 0, -1, 4097.0, "4097", None])
def test_decode_rejects_sizes_inconsistent_with_numel(name, numel):
    codec = codec_by_name(name)
    encoded = codec.encode(sample(4097, seed=12))
    with pytest.raises(ValueError, match="numel|shape"):
        codec.decode(encoded, numel)


def _set(tensor: torch.Tensor, index, value) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


PARAM_DAMAGE = {
    "scaled_float16": [
        (lambda enc: [enc[0], _set(enc[1], 1, 0.0)], "std"),
        (lambda enc: [enc[0], _set(enc[1], 1, -2.0)], "std"),
        (lambda enc: [enc[0], _set(enc[1], 0, math.nan)], "mean"),
        (lambda enc: [enc[0], _set(enc[1], 1, math.inf)], "std"),
        (lambda enc: [enc[0], enc[1][:1]], "shape"),
    ],
    "uniform8": [
        (lambda enc: [enc[0], _set(enc[1], 1, -0.5)], "non-negative"),
        (lambda enc: [enc[0], _set(enc[1], 0, math.inf)], "finite"),
        (lambda enc: [enc[0], _set(enc[1], 1, math.nan)], "finite"),
        (lambda enc: [enc[0], torch.tensor([3e38, 1e37])], "overflows"),
        (lambda enc: [enc[0], torch.zeros(3)], "shape"),
    ],
    "blockwise8": [
        (lambda enc: [*enc[:2], torch.tensor([0])], "block_size must be positive"),
        (lambda enc: [*enc[:2], torch.tensor([-4096])], "block_size must be positive"),
        (lambda enc: [*enc[:2], torch.tensor([2048])], r"shape \[2, 3\]"),
        (lambda enc: [*enc[:2], torch.tensor([4096], dtype=torch.int32)], "int64"),
        (lambda enc: [*enc[:2], torch.tensor([4096, 1])], "shape"),
        (lambda enc: [enc[0], enc[1][:, :1], enc[2]], r"shape \[2, 2\]"),
        (lambda enc: [enc[0], enc[1].reshape(-1), enc[2]], r"shape \[2, 2\]"),
        (lambda enc: [enc[0], _set(enc[1], (1, 1), -1.0), enc[2]], "non-negative"),
        (lambda enc: [enc[0], _set(enc[1], (0, 0), -math.inf), enc[2]], "finite"),
        (lambda enc: [enc[0], _set(enc[1], (1, 1), 1e37), enc[2]], "overflows"),
    ],
    "quantile8": [
        (lambda enc: [enc[0], _set(enc[1], 3, math.nan)], "finite"),
        (lambda enc: [enc[0], _set(enc[1], 255, -math.inf)], "finite"),
        (lambda enc: [enc[0], enc[1][:255]], "shape"),
    ],
}


@pytest.mark.parametrize(
    "name, index", [(name, index) for name, cases in PARAM_DAMAGE.items() for index in range(len(cases))]
)
def test_decode_rejects_bad_parameters(name, index):
    codec = codec_by_name(name)
    encoded = codec.encode(sample(4097, seed=13))
    codec.decode(encoded, 4097)  # the undamaged form decodes
    change, problem = PARAM_DAMAGE[name][index]
    with pytest.raises(ValueError, match=problem):
        codec.decode(change(list(encoded)), 4097)


@pytest.mark.parametrize("name", NAMES)
def test_decode_rejects_a_bool_numel(name):
    codec = codec_by_name(name)
    encoded = codec.encode(torch.ones(1))
    assert codec.decode(encoded, 1).tolist() == [1.0]
    with pytest.raises(ValueError, match="numel"):
        codec.decode(encoded, True)


def test_empty_parts_decode_only_as_empty():
    for name in NAMES:
        codec = codec_by_name(name)
        encoded = codec.encode(torch.zeros(0))
        assert codec.decode(encoded, 0).shape == (0,)
        with pytest.raises(ValueError):
            codec.decode(encoded, 1)


def test_blockwise_block_size_must_be_positive():
    for block_size in [0, -1, 2.5, True]:
        with pytest.raises(ValueError, match="block_size"):
            Blockwise8Bit(block_size)


# ---------------------------------------------------------------- quantile8


def student_t(numel: int, seed: int, df: int = 3) -> torch.Tensor:
    """Student-t values: a normal over the root of a chi-square per df, heavy tails."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(numel, generator=generator, dtype=torch.float64)
    chi2 = torch.randn(df, numel, generator=generator, dtype=torch.float64).pow(2).sum(0)
    return (normal / (chi2 / df).sqrt()).float()


@pytest.mark.parametrize("numel", [5000, 1_000_003])
def test_quantile8_beats_uniform8_on_heavy_tails(numel):
    x = student_t(numel, seed=numel)
    quantile, uniform = Quantile8Bit(), Uniform8Bit()
    q, _ = roundtrip(quantile, x)
    u, _ = roundtrip(uniform, x)
    q_mse, u_mse = ((q - x) ** 2).mean().item(), ((u - x) ** 2).mean().item()
    assert q_mse < u_mse / 3


def test_quantile8_error_is_within_the_spread_of_each_bucket():
    x = student_t(300_000, seed=5)
    encoded = Quantile8Bit().encode(x)
    codes = encoded[0].long()
    decoded = Quantile8Bit().decode(encoded, x.numel())
    low = torch.full((256,), math.inf).scatter_reduce(0, codes, x, "amin")
    high = torch.full((256,), -math.inf).scatter_reduce(0, codes, x, "amax")
    error = (decoded.double() - x.double()).abs()
    assert bool((error <= (high - low).double()[codes]).all())  # the stated bound, element by element
    assert error.max().item() == Quantile8Bit().error_bound(x)
    assert error.max().item() <= (x.max() - x.min()).item() / 129 + 2.0**-23 * x.abs().max().item()
    counts = torch.bincount(codes, minlength=256)  # quantile cuts from a sample: under n/128 per bucket
    assert counts.max().item() < 1.2 * x.numel() / 128


# ---------------------------------------------------------------- adaptive choice


def test_adaptive_chooses_by_size_with_the_threshold_going_to_large():
    small, large = Float16(), Blockwise8Bit()
    adaptive = AdaptiveCodec(small, large, threshold_numel=1000)
    assert adaptive.choose(0) is small
    assert adaptive.choose(999) is small
    assert adaptive.choose(1000) is large
    assert adaptive.choose(10**9) is large


def test_adaptive_role_match_wins_over_size():
    small, large, exact = Float16(), Uniform8Bit(), NoCompression()
    adaptive = AdaptiveCodec(small, large, threshold_numel=1000, by_role={"parameters": exact, "tiny": large})
    assert adaptive.choose(10**6, role="parameters") is exact
    assert adaptive.choose(1, role="parameters") is exact
    assert adaptive.choose(1, role="tiny") is large
    assert adaptive.choose(10**6, role="gradients") is large  # unknown role: by size
    assert adaptive.choose(10, role="gradients") is small
    assert adaptive.choose(10, role=None) is small


def test_adaptive_choice_is_decodable_by_name_at_the_receiver():
    adaptive = AdaptiveCodec(Float16(), Blockwise8Bit(block_size=512), threshold_numel=2000)
    for numel in [100, 5000]:
        x = sample(numel, seed=numel)
        sender = adaptive.choose(numel)
        receiver = codec_by_name(sender.name)
        decoded = receiver.decode(sender.encode(x), numel)
        assert (decoded - x).abs().max() <= sender.error_bound(x)
        assert type(receiver) is type(sender)


class _Unregistered(NoCompression):
    name = "mystery"


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"threshold_numel": -1}, "threshold_numel"),
        ({"threshold_numel": 1.5}, "threshold_numel"),
        ({"small": _Unregistered()}, "not in CODECS"),
        ({"by_role": {"x": _Unregistered()}}, "by_role"),
        ({"large": "float16"}, "must be a Codec"),
    ],
)
def test_adaptive_rejects_bad_configuration(kwargs, problem):
    args = {"small": Float16(), "large": Uniform8Bit(), "threshold_numel": 10, **kwargs}
    with pytest.raises(ValueError, match=problem):
        AdaptiveCodec(**args)


def test_adaptive_rejects_negative_sizes():
    with pytest.raises(ValueError, match="numel"):
        AdaptiveCodec(Float16(), Uniform8Bit(), threshold_numel=10).choose(-1)


# ---------------------------------------------------------------- codec settings by role


def test_a_codec_setting_names_a_codec_for_every_size_or_adaptive():
    assert codec_names() == [*NAMES, "adaptive"]
    for name in NAMES:
        assert {codec_selection(name).choose(n).name for n in [0, 10, 10**8]} == {name}
    adaptive = codec_selection("adaptive")
    assert adaptive.choose(ADAPTIVE_THRESHOLD - 1).name == "float16"
    assert adaptive.choose(ADAPTIVE_THRESHOLD).name == "quantile8"


@pytest.mark.parametrize("name", ["zip", "", "Adaptive", None])
def test_a_bad_codec_setting_is_refused_listing_the_known_ones(name):
    with pytest.raises(ValueError, match="unknown codec") as info:
        codec_selection(name)
    assert all(known in str(info.value) for known in [*NAMES, "adaptive"])
    if name is not None:
        with pytest.raises(ValidationError, match="unknown codec"):
            AveragerSettings(prefix="run", state_codec=name)
        with pytest.raises(ValidationError, match="unknown codec"):
            AveragerSettings(prefix="run", codec=name)
        with pytest.raises(ValidationError, match="unknown codec"):
            AveragerSettings(prefix="run", download_codec=name)


def test_averager_settings_give_each_role_of_round_its_codec():
    same = AveragerSettings(prefix="run", codec="uniform8").codecs()
    assert same[GRADIENTS].choose(10).name == same[STATE].choose(10).name == "uniform8"  # state: as codec
    both = AveragerSettings(prefix="run", codec="adaptive", state_codec="scaled_float16").codecs()
    assert [both[GRADIENTS].choose(n).name for n in [10, 10**6]] == ["float16", "quantile8"]
    assert both[STATE].choose(10**6).name == "scaled_float16"
