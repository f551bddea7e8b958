"""Hostile input: property-based tests of the formats and ARC transforms (hypothesis), and a
fuzzed checkpoint loader - every damage gives CheckpointError with a message, never a crash,
a wrong model or an out-of-range read."""
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

from arcquant import arc
from arcquant.checkpoint import CheckpointError, file_digest, load_quantized, save_quantized
from arcquant.config import CalibConfig, QuantConfig
from arcquant.formats import FORMATS, get_format, mxfp4, nvfp4
from arcquant.formats.e2m1 import pack_nibbles, unpack_nibbles
from arcquant.quantize import quantize_model
from conftest import tiny_llama
from test_formats import slow_nvfp4_fake

SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-40, 1e-38, -3e-39, 1e-30, 6.0, -6.0, 448.0, 3e38, -3e38, 1e20]
values = st.one_of(st.floats(-1e4, 1e4, allow_nan=False, width=32), st.sampled_from(SPECIAL),
                   st.floats(-2.0 ** -20, 2.0 ** -20, allow_nan=False, width=32))


@st.composite
def matrices(draw, max_rows=3, max_blocks=3, block=16):
    rows, blocks = draw(st.integers(1, max_rows)), draw(st.integers(1, max_blocks))
    data = draw(st.lists(values, min_size=rows * blocks * block, max_size=rows * blocks * block))
    return torch.tensor(data, dtype=torch.float32).reshape(rows, blocks * block)


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(matrices(max_rows=2, max_blocks=2))
def test_nvfp4_equals_the_slow_reference_on_special_values(x):
    gs = nvfp4.global_scale_from_amax(x.abs().amax())
    assert torch.equal(nvfp4.fake_quantize(x), slow_nvfp4_fake(x, float(gs)))


@FAST
@given(matrices(max_blocks=1, block=128), st.sampled_from(sorted(FORMATS)))
def test_every_format_is_sign_symmetric_and_error_bounded(x, name):
    fmt = get_format(name)                                         # 128 columns: whole blocks of all
    if name == "mxfp4" and x.abs().max() >= mxfp4.LIMIT:
        with pytest.raises(ValueError, match="2\\^127"):          # would round to 2^128 = inf
            fmt.quantize(x, None)
        return
    gs = fmt.global_scale(x.abs().amax())
    codes, scales = fmt.quantize(x, gs)
    dq = fmt.dequantize(codes, scales, gs)
    neg = fmt.dequantize(*fmt.quantize(-x, gs), gs)
    assert torch.equal(neg, -dq) and torch.isfinite(dq).all()
    assert ((dq - x).abs() <= _block_bound(x, fmt)).all()


def _block_bound(x, fmt):
    """|x - Q(x)| <= the block's largest magnitude (a block either keeps its largest element's scale,
    or is flushed to zero when that is below the smallest scale): a loose bound that catches blow-ups."""
    amax = x.abs().unflatten(-1, (-1, fmt.block)).amax(-1, keepdim=True)
    return amax.expand(*amax.shape[:-1], fmt.block).flatten(-2) * 1.0000001


@FAST
@given(matrices())
def test_nvfp4_error_within_one_scale_step(x):
    """Each element is within scale/gs (half the widest E2M1 gap, which also covers the 6.375 ->
    6 saturation after E4M3 rounding of the block scale) or, for a flushed block, within 6*2^-10/gs."""
    gs = nvfp4.global_scale_from_amax(x.abs().amax())
    codes, scales = nvfp4.quantize(x, gs)
    dq = nvfp4.dequantize(codes, scales, gs)
    step = torch.clamp(scales.float(), min=6 * 2.0 ** -10).repeat_interleave(16, -1) / gs
    assert ((dq - x).abs() <= step * (1 + 1e-6)).all()


@FAST
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda c: len(c) % 2 == 0))
def test_pack_unpack_roundtrip(codes):
    c = torch.tensor(codes, dtype=torch.uint8).reshape(1, -1)
    assert torch.equal(unpack_nibbles(pack_nibbles(c)), c)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_non_finite_values_are_rejected(name, bad):
    fmt = get_format(name)
    x = torch.ones(2, 2 * fmt.block)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        fmt.module.fake_quantize(x)
    plan = arc.ArcPlan.identity(x.shape[1])
    with pytest.raises(ValueError, match="NaN or Inf"):
        arc.quantize_activation(x, plan, fmt, torch.tensor(1.0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        arc.quantize_weight(x, plan, fmt, torch.tensor(1.0))


@st.composite
def arc_cases(draw):
    blocks = draw(st.integers(1, 4))
    k = 16 * blocks
    s = 16 * draw(st.integers(0, blocks))
    m = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(k, generator=g) * 2)   # outlier channels
    stats = arc.ChannelStats(k, 0.125, get_format("nvfp4"))
    stats.update(x)
    order = draw(st.sampled_from(arc.ORDERS))
    return x, arc.make_plan(stats, k, s, order, 16, torch.rand(k, generator=g)), order


@FAST
@given(arc_cases())
def test_arc_plan_is_a_permutation_and_the_residual_never_hurts(case):
    x, plan, order = case
    k, s = plan.k, plan.s
    assert torch.equal(torch.sort(plan.perm).values, torch.arange(k)) and plan.tail.numel() == s
    assert len(set(plan.tail.tolist())) == s
    fmt = get_format("nvfp4")
    gs = fmt.global_scale(x.abs().amax())
    codes, scales = arc.quantize_activation(x, plan, fmt, gs)
    deq = fmt.dequantize(codes, scales, gs)                        # (M, K+s)
    main = deq[:, :k]
    torch.testing.assert_close(main, nvfp4.fake_quantize(x[:, plan.perm], gs), rtol=0, atol=0)
    if s:
        d1 = main[:, plan.tail_positions()]
        err1 = (x[:, plan.tail] - d1).abs()
        err2 = (x[:, plan.tail] - d1 - deq[:, k:]).abs()
        assert (err2 <= err1 + 1e-6 * x.abs().max()).all()         # rounding a residual never adds error


@FAST
@given(st.integers(0, 10**6), st.integers(1, 5000), st.integers(1, 64).map(lambda b: 16 * b),
       st.sampled_from([16, 32, 64]))
def test_num_augmented_is_a_capped_multiple(outliers, tokens, k, multiple):
    s = arc.num_augmented(outliers, tokens, k, multiple)
    assert 0 <= s <= k and (s == k or s % multiple == 0)
    assert arc.num_augmented(outliers + tokens, tokens, k, multiple) >= s


# ---- fuzzed checkpoint loader --------------------------------------------------------------
@pytest.fixture(scope="module")
def good(tokenizer, tmp_path_factory):
    model = tiny_llama()
    report = quantize_model(model, tokenizer, QuantConfig(), CalibConfig(nsamples=2, seqlen=64), progress=False)
    return save_quantized(model, tokenizer, tmp_path_factory.mktemp("fz") / "good", QuantConfig(),
                          CalibConfig(nsamples=2, seqlen=64), report, "tiny")


def _damaged(good, tmp_path, edit_tensors=None, edit_meta=None):
    out = tmp_path / "bad"
    shutil.copytree(good, out)
    f = out / "model.safetensors"
    meta = json.loads((out / "arcquant.json").read_text())
    if edit_tensors:
        t = load_file(str(f))
        edit_tensors(t)
        save_file(t, str(f))
        meta["files"]["model.safetensors"] = file_digest(f)       # checksums match: the loader's own checks
    if edit_meta:
        edit_meta(meta)
    (out / "arcquant.json").write_text(json.dumps(meta))
    return out


L = "model.layers.0.self_attn.q_proj"
TENSOR_DAMAGE = {
    "packed as float": lambda t: t.update({f"{L}.weight_packed": t[f"{L}.weight_packed"].float()}),
    "scale as int": lambda t: t.update({f"{L}.weight_scale": t[f"{L}.weight_scale"].view(torch.uint8)}),
    "packed cut": lambda t: t.update({f"{L}.weight_packed": t[f"{L}.weight_packed"][:, :-1].contiguous()}),
    "packed 1-d": lambda t: t.update({f"{L}.weight_packed": t[f"{L}.weight_packed"].flatten()}),
    "perm repeats": lambda t: t[f"{L}.perm"].__setitem__(0, t[f"{L}.perm"][1]),
    "perm out of range": lambda t: t[f"{L}.perm"].__setitem__(0, 10**6),
    "tail out of range": lambda t: t.update({f"{L}.tail": torch.full((t[f"{L}.tail"].numel() or 1,), -5, dtype=torch.int32)}),
    "global scale nan": lambda t: t.update({f"{L}.weight_global_scale": torch.tensor(float("nan"))}),
    "global scale vector": lambda t: t.update({f"{L}.weight_global_scale": torch.ones(3)}),
    "missing scale": lambda t: t.pop(f"{L}.weight_scale"),
    "norm wrong shape": lambda t: t.update({"model.norm.weight": torch.ones(7)}),
    "extra tensor": lambda t: t.update({"model.surprise": torch.ones(1)}),
}
META_DAMAGE = {
    "future version": lambda m: m.update(version=99),
    "layers not a dict": lambda m: m.update(layers=[1, 2]),
    "layer lacks s": lambda m: m["layers"][L].pop("s"),
    "layer s wrong": lambda m: m["layers"][L].update(s=m["layers"][L]["s"] + 16),
    "unknown format": lambda m: m["layers"][L].update(fmt="fp3"),
    "files lists a missing file": lambda m: m["files"].update({"layers/x.safetensors": {"bytes": 1, "sha256": "0"}}),
    "not an object": lambda m: m.clear() or m.update(format="arcquant", version=2),
}


@pytest.mark.parametrize("damage", sorted(TENSOR_DAMAGE))
def test_loader_names_damaged_tensors(good, tmp_path, damage):
    with pytest.raises(CheckpointError):
        load_quantized(_damaged(good, tmp_path, edit_tensors=TENSOR_DAMAGE[damage]))


@pytest.mark.parametrize("damage", sorted(META_DAMAGE))
def test_loader_names_damaged_metadata(good, tmp_path, damage):
    with pytest.raises((CheckpointError, ValueError)) as e:
        load_quantized(_damaged(good, tmp_path, edit_meta=META_DAMAGE[damage]))
    assert str(e.value)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(cut=st.floats(0.0, 0.999), flip=st.integers(0, 10**9))
def test_loader_on_random_truncation_and_bit_flips(good, tmp_path_factory, cut, flip):
    out = tmp_path_factory.mktemp("rand") / "ck"
    shutil.copytree(good, out)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[flip % len(data)] ^= 1 << (flip % 8)
    f.write_bytes(bytes(data[: max(1, int(len(data) * (1 - cut)))] if cut > 0.5 else data))
    with pytest.raises(CheckpointError, match="truncated|altered"):
        load_quantized(out)
