"""ARC identities on small tensors, against direct computations."""
import pytest
import torch

from arcquant import arc
from arcquant.config import QuantConfig
from arcquant.formats import get_format, nvfp4
from arcquant.qlinear import QuantLinear, SharedInput

F = get_format("nvfp4")


def outlier_input(m=64, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, [5, 40, 77, 100]] *= torch.tensor([30.0, 12.0, 50.0, 8.0])      # outlier channels
    return x


def stats_of(x, threshold=0.125):
    st = arc.ChannelStats(x.shape[1], threshold, F)
    st.update(x)
    return st


def test_num_augmented_rule():
    # 10 tokens, 25 outlier hits -> 2.5 per token -> one multiple of 64
    assert arc.num_augmented(25, 10, 4096, 64) == 64
    assert arc.num_augmented(640, 10, 4096, 64) == 64        # exactly 64 per token
    assert arc.num_augmented(641, 10, 4096, 64) == 128
    assert arc.num_augmented(10 ** 9, 10, 256, 64) == 256      # capped at K
    with pytest.raises(ValueError, match="no calibration tokens"):
        arc.num_augmented(0, 0, 64, 64)


def test_stats_count_matches_direct_count():
    x = outlier_input()
    st = stats_of(x)
    a = x.abs()
    assert st.outliers == int((a > 0.125 * a.amax(1, keepdim=True)).sum())
    assert torch.equal(st.absmax, a.amax(0))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        st.update(torch.full((2, 128), float("inf")))


@pytest.mark.parametrize("order", ["sorted", "blocks", "none"])
def test_plan_is_a_permutation_with_outliers_in_tail(order):
    x = outlier_input()
    plan = arc.make_plan(stats_of(x), 128, 48, order, 16)       # 3 outlier blocks
    assert torch.equal(torch.sort(plan.perm).values, torch.arange(128))
    assert plan.s == 48
    assert {5, 40, 77}.issubset(set(plan.tail.tolist()))
    assert plan.tail_reuses_weight() == (order != "none")
    if order == "blocks":  # whole 16-blocks stay together
        assert all(int(b[0]) % 16 == 0 and torch.equal(b, b[0] + torch.arange(16))
                   for b in plan.perm.view(-1, 16))


def test_sorted_plan_is_ascending_by_absmax():
    x = outlier_input()
    st = stats_of(x)
    plan = arc.make_plan(st, 128, 64, "sorted", 16)
    assert torch.all(st.absmax[plan.perm][1:] >= st.absmax[plan.perm][:-1])


def test_s0_equals_rtn():
    x, w = outlier_input(), torch.randn(48, 128)
    plan = arc.ArcPlan.identity(128)
    gsx, gsw = nvfp4.global_scale_from_amax(x.abs().max()), nvfp4.global_scale_from_amax(w.abs().max())
    xa = F.dequantize(*arc.quantize_activation(x, plan, F, gsx), gsx)
    qw = arc.quantize_weight(w, plan, F, gsw)
    wa = F.dequantize(*arc.augmented_weight(qw, plan, 16), gsw)
    y = arc.augmented_matmul(xa, wa)
    ref = nvfp4.fake_quantize(x, gsx) @ nvfp4.fake_quantize(w, gsw).t()
    assert torch.equal(y, ref)


@pytest.mark.parametrize("order", ["sorted", "blocks", "none"])
def test_augmented_product_equals_two_separate_products(order):
    x, w = outlier_input(seed=1), torch.randn(40, 128)
    plan = arc.make_plan(stats_of(x), 128, 32, order, 16)
    gsx, gsw = nvfp4.global_scale_from_amax(x.abs().max()), nvfp4.global_scale_from_amax(w.abs().max())
    codes, scales = arc.quantize_activation(x, plan, F, gsx)
    assert codes.shape == (64, 160) and scales.shape == (64, 10)
    xa = F.dequantize(codes, scales, gsx)
    wa = F.dequantize(*arc.augmented_weight(arc.quantize_weight(w, plan, F, gsw), plan, 16), gsw)
    # direct: Q1 = Q(X[:, perm]), R = X[:, tail] - Q1 at tail, Q2 = Q(R); W tail = Q(W) at tail
    q1 = nvfp4.fake_quantize(x[:, plan.perm], gsx)
    r = x[:, plan.tail] - q1[:, plan.tail_positions()]
    q2 = nvfp4.fake_quantize(r, gsx)
    qwm = nvfp4.fake_quantize(w[:, plan.perm], gsw)
    qwt = qwm[:, plan.tail_positions()] if order != "none" else nvfp4.fake_quantize(w[:, plan.tail], gsw)
    direct = q1 @ qwm.t() + q2 @ qwt.t()
    torch.testing.assert_close(arc.augmented_matmul(xa, wa), direct, rtol=1e-5, atol=1e-4)
    # the tail of the weight operand is the same codes and scales as the main part (stored once)
    if order != "none":
        wc, ws = arc.augmented_weight(arc.quantize_weight(w, plan, F, gsw), plan, 16)
        assert torch.equal(wc[:, 128:], wc[:, 96:128]) and torch.equal(ws[:, 8:], ws[:, 6:8])


def test_residual_lowers_error_of_outlier_channels():
    x = outlier_input(seed=2)
    st = stats_of(x)
    gs = nvfp4.global_scale_from_amax(x.abs().max())
    rtn = nvfp4.fake_quantize(x, gs)
    for order in ("sorted", "blocks", "none"):
        plan = arc.make_plan(st, 128, 32, order, 16)
        xa = F.dequantize(*arc.quantize_activation(x, plan, F, gs), gs)
        eff = xa[:, :128].clone()                                        # Q1 in perm order
        eff[:, plan.tail_positions()] += xa[:, 128:]                      # + Q2 at the tail
        back = torch.empty_like(eff)
        back[:, plan.perm] = eff                                          # to original order
        for c in (5, 77):                                                 # the largest outliers
            e_arc = (back[:, c] - x[:, c]).norm()
            e_rtn = (rtn[:, c] - x[:, c]).norm()
            assert e_arc < 0.2 * e_rtn, (order, c)


@pytest.mark.parametrize("act_scale", ["dynamic", "token", "static"])
def test_quant_linear_matches_functional_path(act_scale):
    torch.manual_seed(0)
    lin = torch.nn.Linear(120, 24, bias=True)                             # K=120: padded to 128
    x = outlier_input(k=120)
    st = stats_of(torch.nn.functional.pad(x, (0, 8)))
    plan = arc.make_plan(st, 128, 64, "sorted", 16)
    gsw = nvfp4.global_scale_from_amax(lin.weight.abs().max())
    gsi = nvfp4.global_scale_from_amax(x.abs().max())
    q = QuantLinear.from_linear(lin, "nvfp4", "fp4", act_scale, plan, gsw, gsi)
    y = q(x)
    xp = torch.nn.functional.pad(x, (0, 8))
    gs = {"dynamic": gsi, "static": gsi,
          "token": nvfp4.global_scale_from_amax(xp.abs().amax(1, keepdim=True))}[act_scale]
    xa = F.dequantize(*arc.quantize_activation(xp, plan, F, gs), gs)
    wp = torch.nn.functional.pad(lin.weight.detach(), (0, 8))
    wa = F.dequantize(*arc.augmented_weight(arc.quantize_weight(wp, plan, F, gsw), plan, 16), gsw)
    assert torch.equal(y, xa @ wa.t() + lin.bias.detach())
    assert q.avg_bits == pytest.approx(4.5 * 192 / 120)
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < 0.15  # W4A4 NVFP4 of a random layer: ~0.106


def test_shared_input_quantizes_once():
    calls = []
    shared = SharedInput()
    x = torch.randn(4, 16)
    f = lambda t: calls.append(1) or t * 2
    assert torch.equal(shared.get(x, f), x * 2) and torch.equal(shared.get(x, f), x * 2)
    assert len(calls) == 1
    x.add_(1)                                                            # in-place change: recompute
    shared.get(x, f)
    assert len(calls) == 2


def test_config_validation_names_allowed_values():
    with pytest.raises(ValueError, match="fp, w4a16, w4a8, rtn, arc"):
        QuantConfig(method="awq")
    with pytest.raises(ValueError, match="sorted, blocks, none"):
        QuantConfig(order="random")
    with pytest.raises(ValueError, match="multiple of the int4 block size 128"):
        QuantConfig(fmt="int4", s_multiple=64)
    assert QuantConfig.paper().order == "sorted"


def test_budget_allocation_is_greedy_by_gain_per_bit_and_respects_budget():
    # two groups: K=64 (1 layer) with big gains, K=128 (3 layers) with smaller ones
    gains = [torch.tensor([0.5, 0.1, 0.0, 0.0]), torch.tensor([0.2, 0.15, 0.01, 0, 0, 0, 0, 0])]
    widths, members = [64, 128], [1, 3]
    # cost of one block: 4.5*16/64 = 1.125 (group 0), 3*4.5*16/128 = 1.6875 (group 1)
    # value per cost: g0 0.444, 0.0889; g1 0.2*3/1.6875 = 0.356, 0.267, 0.0178
    s = arc.allocate_budget(gains, widths, members, target_bits=4.5 + (1.125 + 1.6875) / 4, base_bits=4.5, block=16)
    assert s == [16, 16]
    s = arc.allocate_budget(gains, widths, members, target_bits=9.0, base_bits=4.5, block=16)
    assert s == [32, 48]                       # zero-gain blocks are never bought
    bits = (4.5 * (64 + s[0]) / 64 + 3 * 4.5 * (128 + s[1]) / 128) / 4
    assert bits <= 9.0
    # a group whose tail channels cost 2 columns (arc+wres) = every group at half the extra bits
    for target in (6.0, 7.0):
        both = arc.allocate_budget(gains, widths, members, target, 4.5, 16, [2, 2])
        assert both == arc.allocate_budget(gains, widths, members, 4.5 + (target - 4.5) / 2, 4.5, 16)
    assert both == [16, 32]
    mixed = arc.allocate_budget(gains, widths, members, 6.0, 4.5, 16, [2, 1])   # group 0 costs double
    assert mixed == [16, 32]                   # (all at single cost: [32, 32])
    bits = sum(m * 4.5 * (k + c * s) / k for m, k, c, s in zip(members, widths, [2, 1], mixed))
    assert bits <= 6.0 * sum(members)


def test_block_gains_descending_and_relative():
    x = outlier_input()
    st = stats_of(x)
    w2 = torch.ones(128)
    g = arc.block_gains(st, 128, "blocks", 16, w2)
    assert torch.all(g[:-1] >= g[1:]) and g.shape == (8,)
    # relative to the output energy: the sum is the relative squared error of plain NVFP4
    rel = (st.sqerr.sum() / st.sumsq.sum()).item()
    assert g.sum().item() == pytest.approx(rel, rel=1e-6)


def test_weight_residual_gain_counts_the_weight_error():
    """arc+wres: a residual channel also removes its weight rounding error, E[x_c^2] |W_c - Q(W_c)|^2.
    The gain is the direct sum of both terms, and a block whose weights round badly (but whose
    activations quantize well) moves into the tail."""
    torch.manual_seed(0)
    x = torch.randn(256, 128)
    st = stats_of(x)
    w2 = torch.ones(128)
    werr = torch.zeros(128)
    werr[32:48] = 50.0                                           # block 2: large weight error only
    direct = st.sqerr * w2 + st.sumsq * werr                     # float64 (K,)
    assert torch.allclose(arc.channel_errors(st, 128, w2, werr), direct)
    g = arc.block_gains(st, 128, "blocks", 16, w2, werr)
    energy = (st.sumsq * w2).sum()
    assert g[0].item() == pytest.approx((direct[32:48].sum() / energy).item(), rel=1e-9)
    assert not torch.equal(arc.make_plan(st, 128, 16, "blocks", 16, w2).tail, torch.arange(32, 48))
    assert torch.equal(arc.make_plan(st, 128, 16, "blocks", 16, w2, werr).tail, torch.arange(32, 48))
