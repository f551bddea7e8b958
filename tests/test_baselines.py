"""The paper's baselines (issue 3): each transform checked against a direct computation, then
the methods end to end on a tiny model through the normal quantize -> save -> load path."""
import pytest
import torch

from arcquant import arc, baselines
from arcquant.checkpoint import load_quantized, save_quantized
from arcquant.config import METHODS, CalibConfig, QuantConfig
from arcquant.formats import get_format
from arcquant.qlinear import QuantLinear
from arcquant.quantize import quantize_model
from conftest import tiny_folder, tiny_llama

CAL = CalibConfig(nsamples=2, seqlen=64)
IDS = torch.arange(3, 40).reshape(1, -1)


def test_hadamard_is_the_sylvester_matrix_and_orthonormal():
    h = baselines.hadamard(4) * 2
    want = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)
    assert torch.equal(h, want)
    with pytest.raises(ValueError, match="power-of-two"):
        baselines.hadamard(12)


@pytest.mark.parametrize("k,block", [(576, 0), (1536, 0), (512, 0), (576, 16), (576, 64), (640, 128)])
def test_rotation_leaves_the_unquantized_product_unchanged(k, block):
    r = baselines.rotation_matrix(k, block, seed=3)
    n = block or k
    torch.testing.assert_close(r.double() @ r.double().t(), torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(k + block)
    x, w = torch.randn(5, k, generator=g), torch.randn(7, k, generator=g)
    y = baselines.rotate(x, r).double() @ baselines.rotate(w, r).double().t()
    torch.testing.assert_close(y, x.double() @ w.double().t(), atol=1e-4, rtol=1e-5)
    if block:                                                  # block-diagonal: blocks stay isolated
        x2 = torch.zeros(1, k)
        x2[0, :block] = torch.randn(block, generator=g)
        assert baselines.rotate(x2, r)[0, block:].abs().max() == 0


def test_full_rotation_mixes_all_channels_and_is_seeded():
    r = baselines.rotation_matrix(576, 0, seed=0)
    e = torch.zeros(1, 576)
    e[0, 7] = 1.0
    assert (baselines.rotate(e, r).abs() > 0).sum() == 576     # one outlier spread over every channel
    assert torch.equal(r, baselines.rotation_matrix(576, 0, seed=0))
    assert not torch.equal(r, baselines.rotation_matrix(576, 0, seed=1))


def test_rotation_matrix_is_kept_per_device():
    """The online rotation's matrix is copied to a device once, not on every layer call (the
    full-width one of K = 4,864 is 95 MB): the same object comes back for the same device."""
    r = baselines.rotation_matrix(4864, 0, seed=0)
    assert baselines.rotation_matrix(4864, 0, 0, device=torch.device("cpu")) is r
    meta = baselines.rotation_matrix(4864, 0, 0, device=torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == r.shape == (4864, 4864)
    assert baselines.rotation_matrix(4864, 0, 0, device=torch.device("meta")) is meta


def test_smoothing_leaves_the_product_unchanged_and_flattens_outliers():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 32, generator=g), torch.randn(16, 32, generator=g)
    x[:, 3] *= 100
    s = baselines.smooth_scales(x.abs().amax(0), w.abs().amax(0), 0.5)
    torch.testing.assert_close((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-5, atol=1e-4)
    assert (x / s).abs().amax(0)[3] < x.abs().amax(0)[3] / 5
    s0 = baselines.smooth_scales(torch.zeros(32), w.abs().amax(0), 0.5)
    assert torch.equal(s0, torch.ones(32))                     # channels never seen keep scale 1
    with pytest.raises(ValueError, match="alpha=1.5"):
        baselines.smooth_scales(x.abs().amax(0), w.abs().amax(0), 1.5)


def _layer(act, s, w, absmax):
    plan = arc.make_plan(_stats(absmax), w.shape[1], s, "sorted", 16)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    gs = get_format("nvfp4").global_scale(w.abs().max())
    return QuantLinear.from_linear(lin, "nvfp4", act, "token", plan, gs)


def _stats(absmax):
    st = arc.ChannelStats(absmax.numel(), 0.125, get_format("nvfp4"))
    st.absmax = absmax
    return st


def test_atom_with_an_empty_8bit_branch_is_rtn_and_its_branch_is_fp8():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, 64, generator=g), torch.randn(5, 64, generator=g)
    x[:, [3, 40]] *= 50
    absmax = x.abs().amax(0)
    torch.testing.assert_close(_layer("mixed", 0, w, absmax)(x), _layer("fp4", 0, w, absmax)(x), rtol=0, atol=0)
    atom = _layer("mixed", 16, w, absmax)
    tail = atom.plan.tail
    assert {3, 40} <= set(tail.tolist())                       # the outlier channels go to FP8
    from arcquant.formats import fp8
    xq = atom.quantize_input(x)
    torch.testing.assert_close(xq[:, -16:], fp8.fake_quantize_per_row(x[:, tail]), rtol=0, atol=0)
    err = lambda q: ((q(x) - x @ w.t()).norm() / (x @ w.t()).norm()).item()
    assert err(atom) < err(_layer("fp4", 0, w, absmax))


def test_weight_residual_is_the_depth_k_plus_2s_product():
    """arc+wres computed directly: X_aug = [Q1, Q2, Q1_tail], W_aug = [Q(W), Q(W)_tail, R_W] with
    R_W = NVFP4(W_tail - dequant(Q(W)_tail)); one GEMM of depth K+2s."""
    F = get_format("nvfp4")
    torch.manual_seed(3)
    n, k, s = 24, 64, 16
    w = torch.randn(n, k)
    absmax = torch.rand(k) + torch.arange(k).eq(7) * 20                   # one outlier channel
    plan = arc.make_plan(_stats(absmax), k, s, "sorted", 16)
    lin = torch.nn.Linear(k, n, bias=True)
    lin.weight.data = w
    gs = F.global_scale(w.abs().max())
    q = QuantLinear.from_linear(lin, "nvfp4", "fp4", "token", plan, gs, weight_residual=True)
    x = torch.randn(5, k) * (1 + torch.arange(k).eq(7) * 20)
    gsx = F.global_scale(x.abs().amax(-1, keepdim=True))
    xa = F.dequantize(*arc.quantize_activation(x, plan, F, gsx), gsx)               # [Q1 | Q2] (M, K+s)
    codes, scales = F.quantize(w[:, plan.perm], gs)                                  # Q(W) in plan order
    wq = F.dequantize(codes, scales, gs)
    r = F.dequantize(*F.quantize(w[:, plan.tail] - wq[:, k - s:], gs), gs)          # R_W (N, s)
    x3 = torch.cat([xa, xa[:, k - s: k]], 1)                                         # (M, K+2s)
    w3 = torch.cat([wq, wq[:, k - s:], r], 1)                                        # (N, K+2s)
    ref = x3.double() @ w3.double().t() + lin.bias.double()
    assert ((q(x).double() - ref).norm() / ref.norm()).item() < 1e-6
    tail_err = lambda extra: (w[:, plan.tail] - wq[:, k - s:] - extra).norm().item()
    assert tail_err(r) < 0.3 * tail_err(0)                                           # ~8-bit tail weights
    assert q.weight_residual and q.avg_bits == 4.5 * (k + 2 * s) / k
    plain = QuantLinear.from_linear(lin, "nvfp4", "fp4", "token", plan, gs)
    exact = x @ w.t() + lin.bias
    assert (q(x) - exact).norm() < (plain(x) - exact).norm()


def test_weight_residual_budget_counts_both_tails(tokenizer):
    """arc+wres at a 5.5-bit budget spends the extra bits of arc at 5.0 bits twice (each s costs
    2 columns): its layers carry 4.5 (K+2s)/K bits, 5.0 < average <= 5.5. (Which layers get s
    differs: its gain also counts the weight error the residual removes.)"""
    reports = {}
    for method, bits in (("arc+wres", 5.5), ("arc", 5.0)):
        model = tiny_llama(hidden=64, inter=128)
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 5] *= 30.0
        reports[method] = quantize_model(model, tokenizer, QuantConfig(method=method, target_bits=bits), CAL,
                                         progress=False)
    wres, plain = reports["arc+wres"]["layers"], reports["arc"]["layers"]
    assert any(r["s"] for r in wres) and any(r["s"] for r in plain)
    assert all(r["avg_bits"] == 4.5 * (r["in"] + 2 * r["s"]) / r["in"] for r in wres)
    assert 5.0 < reports["arc+wres"]["avg_bits"] <= 5.5 and reports["arc"]["avg_bits"] <= 5.0


def test_weight_residual_skipped_for_named_layers(tokenizer, tmp_path):
    """arc+wres with wres_skip=("down_proj",): down_proj groups get plain arc's single tail
    (4.5 (K+s)/K bits, no weight-residual buffers), the others the weight-residual tail
    (4.5 (K+2s)/K); the budget counts each at its cost; the setting survives save and load."""
    model = tiny_llama(hidden=64, inter=128)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 30.0
    qcfg = QuantConfig(method="arc+wres", wres_skip=("down_proj",), target_bits=6.0)
    report = quantize_model(model, tokenizer, qcfg, CAL, progress=False)
    rows = report["layers"]
    down = [r for r in rows if r["name"].endswith("down_proj")]
    rest = [r for r in rows if not r["name"].endswith("down_proj")]
    assert any(r["s"] for r in down) and any(r["s"] for r in rest)
    assert all(r["avg_bits"] == 4.5 * (r["in"] + r["s"]) / r["in"] for r in down)
    assert all(r["avg_bits"] == 4.5 * (r["in"] + 2 * r["s"]) / r["in"] for r in rest)
    assert report["avg_bits"] <= 6.0
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))
    assert all(q.weight_residual == (not n.endswith("down_proj") and q.s > 0) for n, q in layers.items())
    save_quantized(model, tokenizer, tmp_path / "ck", qcfg, CAL, report, "tiny")
    back, _, meta = load_quantized(tmp_path / "ck")
    assert QuantConfig.from_dict(meta["quant"]) == qcfg and meta["quant"]["wres_skip"] == ["down_proj"]
    assert "wres_skip" not in QuantConfig().to_dict()          # earlier files and fingerprints still match
    assert torch.equal(back(IDS).logits, model(IDS).logits)
    with pytest.raises(ValueError, match="wres_skip=\\['down_proj'\\] applies to arc\\+wres"):
        QuantConfig(method="arc", wres_skip=("down_proj",))
    with pytest.raises(ValueError, match="without dots"):
        QuantConfig(method="arc+wres", wres_skip=("mlp.down_proj",))


@pytest.mark.parametrize("kw", [dict(method="hadamard"), dict(method="hadamard", rotate=32),
                                dict(method="smoothquant"), dict(method="atom"),
                                dict(method="atom", act_scale="static"), dict(method="arc+hadamard"),
                                dict(method="arc+wres"), dict(method="arc+gptq+wres")])
def test_baseline_methods_end_to_end(tokenizer, tmp_path, kw):
    model = tiny_llama(hidden=64, inter=128)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 30.0
    ref = model(IDS).logits
    qcfg = QuantConfig(**kw)
    report = quantize_model(model, tokenizer, qcfg, CAL, progress=False)
    out = model(IDS).logits
    assert torch.isfinite(out).all() and 0 < ((out - ref).norm() / ref.norm()).item() < 0.5
    save_quantized(model, tokenizer, tmp_path / "ck", qcfg, CAL, report, "tiny")
    back, _, meta = load_quantized(tmp_path / "ck")
    assert meta["quant"]["method"] == kw["method"]
    assert torch.equal(back(IDS).logits, out)                  # transforms rebuilt exactly on load
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if "hadamard" in kw["method"]:
        assert all(q.rotate == (qcfg.rotate_block, 0) for q in layers)
    if kw["method"] == "atom":
        assert any(q.s > 0 for q in layers) and all(q.act == "mixed" for q in layers)
    if "wres" in kw["method"]:                                 # the residual tail is saved and rebuilt
        assert all(q.weight_residual == (q.s > 0) for q in layers) and any(q.s for q in layers)
        assert all(meta["layers"][n]["weight_residual"] == (q.s > 0) for n, q in back.named_modules()
                   if isinstance(q, QuantLinear))


def test_baseline_bad_input_names_the_choices():
    with pytest.raises(ValueError, match="choose one of: " + ", ".join(METHODS).replace("+", r"\+")):
        QuantConfig(method="quarot")
    with pytest.raises(ValueError, match="atom with s = 0 is rtn"):
        QuantConfig(method="atom", residual=False)
    with pytest.raises(ValueError, match="rotate=16 applies to hadamard and arc\\+hadamard"):
        QuantConfig(method="rtn", rotate=16)
    with pytest.raises(ValueError, match="rotate=24; valid: 0, 16, 32, 64, 128"):
        QuantConfig(method="hadamard", rotate=24)
    with pytest.raises(ValueError, match="arc\\+wres adds the rounding error .* got order 'none'"):
        QuantConfig(method="arc+wres", order="none")
    with pytest.raises(ValueError, match="residual=False"):
        QuantConfig(method="arc+wres", residual=False)
    with pytest.raises(ValueError, match="alpha=2"):
        QuantConfig(method="smoothquant", alpha=2)
    assert QuantConfig(method="hadamard").rotate_block == 0 and QuantConfig(method="arc+hadamard").rotate_block == 16


def test_layer_error_report_orders_the_methods(tokenizer, tmp_path):
    from arcquant.analysis import METHODS as REPORTED, layer_errors, write_report
    rep = layer_errors(tiny_folder(tokenizer, tmp_path / "tiny"), QuantConfig(), CAL, eval_samples=1)
    rows = rep["layers"]
    assert len(rows) == 14 and all(set(r["rel_err"]) == set(REPORTED) for r in rows)
    err = {m: torch.tensor([r["rel_err"][m] for r in rows]) for m in REPORTED}
    assert (err["mxfp8"] < err["rtn"]).all() and (err["w4a8"] < err["rtn"]).all()
    assert (err["arc"] <= err["rtn"] * 1.05).all() and err["arc"].mean() < err["rtn"].mean()
    assert rep["summary"]["layers"] == 14 and any(r["s"] > 0 for r in rows)
    js, png = write_report(rep, tmp_path / "report")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "summary" in js.read_text()
    with pytest.raises(ValueError, match="got method 'rtn', use one of arc, arc\\+hadamard, arc\\+gptq"):
        layer_errors("unused", QuantConfig(method="rtn"), CAL)


def test_weight_error_per_column_matches_the_quantized_layers():
    """arc+wres's budget term |W_c - Q(W_c)|^2 (quantize._col_werr2), summed over a q/k/v-like
    group with one tensor scale, equals the column error of the weights the w4a16 QuantLinears
    hold (a second path: from_linear, pack, dequantize), with K padded to the block."""
    from arcquant.quantize import _col_werr2
    F = get_format("nvfp4")
    torch.manual_seed(4)
    lins = [torch.nn.Linear(40, n, bias=False) for n in (24, 8)]             # K = 40 -> padded 48
    lins[1].weight.data *= 3                                                  # sets the group's scale
    gs = F.global_scale(torch.stack([lin.weight.abs().max() for lin in lins]).max())
    got = _col_werr2(lins, F)
    ref = torch.zeros(40, dtype=torch.float64)
    for lin in lins:
        q = QuantLinear.from_linear(lin, "nvfp4", "none", "token", arc.ArcPlan.identity(48), gs)
        ref += ((lin.weight.double() - q.dequantized_weight()[:, :40].double()) ** 2).sum(0)
    assert got.shape == (40,) and torch.allclose(got.double(), ref, rtol=1e-5)
    assert got.sum() > 0
