"""GPU path pieces that can be checked on the CPU: the engine's static-cache greedy decoding
against transformers' generate, the kernel path of a real quantized layer through the Triton
interpreter against the reference product, and the backend's refusals."""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported: CPU interpreter
pytest.importorskip("triton", reason="triton is a test dependency (pip install -e .[test])")

from arcquant.config import CalibConfig, QuantConfig    # noqa: E402
from arcquant.engine import Engine, kv_bytes             # noqa: E402
from arcquant.gpu import KernelPath, gemv_config, use_kernels   # noqa: E402
from arcquant.kernels.ops import backend                        # noqa: E402
from arcquant.quantize import quantize_model            # noqa: E402


def test_engine_greedy_equals_transformers_generate(fresh_smollm):
    model, tok = fresh_smollm
    for prompt in ["The capital of France is", "def add(a, b):"]:
        ids = tok(prompt, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        got = Engine(model, 1, ids.shape[1] + 13, graphs=False).generate(ids, 12)
        assert got[0].tolist() == ref[0, ids.shape[1]:].tolist()
    e = Engine(model, 1, 64, graphs=False, prefill_graphs=True)
    assert e.prefill_mode == "eager"                          # CUDA graphs only on a CUDA device
    with torch.no_grad():
        torch.testing.assert_close(e.prefill(ids), model(ids).logits[:, -1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="built for batch 1, got 2"):
        e.prefill(ids.repeat(2, 1))
    with pytest.raises(ValueError, match="exceed max_len=64"):
        e.generate(ids, 64)


def test_engine_names_non_finite_logits():
    """A NaN that reaches the logits (here through an embedding row) is an error naming NaN / Inf,
    raised once after generation (the kernel path does not check each layer's input)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[3, 5, 7, 9]])
    e = Engine(model, 1, 16, graphs=False)
    assert e.generate(ids, 3).shape == (1, 3)                          # finite: tokens as usual
    with torch.no_grad():
        model.model.embed_tokens.weight[7, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in the logits within the 3 generated steps"):
        e.generate(ids, 3)


def test_kv_cache_size():
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32)
    assert kv_bytes(cfg, 1, 1024, torch.bfloat16) == 2 * 32 * 1024 * 8 * 128 * 2      # 128 MiB


@pytest.fixture(scope="module")
def quantized(smollm):
    from arcquant.modeling import load_model
    model, tok = load_model("smollm2-135m")
    quantize_model(model, tok, QuantConfig(), CalibConfig(nsamples=4, seqlen=64), progress=False)
    return model


@pytest.mark.parametrize("m", [1, 6, 20])                  # CUDA-core GEMV, tensor-core GEMV, prefill
def test_kernel_path_equals_reference_up_to_bf16_rounding(quantized, m):
    q = quantized.model.layers[2].self_attn.q_proj
    x = (torch.randn(m, q.in_features, generator=torch.Generator().manual_seed(m)) * 3).bfloat16()
    with torch.no_grad():
        ref = q(x.float())                                     # reference backend, float32
        q.kernel = KernelPath(q)
        try:
            with backend("triton"):                            # the Triton kernels through the interpreter
                got = q(x)
        finally:
            q.kernel = None
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    err = (got.float() - ref).norm() / ref.norm()
    assert err < 4e-3, err                                     # bf16 output rounding (~2^-9)


@pytest.mark.parametrize("m,path", [(1, "int8"), (2, "int8"), (11, "mma"), (32, "mma")])
def test_cuda_kernel_plumbing_equals_reference(quantized, m, path):
    """gpu.KernelPath's CUDA route (activations from the Triton kernel with the per-token scale
    computed in it, q/k/v sharing one quantized input, the integer GEMV for M <= 2 and the
    tensor-core one above) with the CUDA kernels replaced by their float64 oracles: this runs
    on CPU; the CUDA kernels themselves are checked against the same oracles on the GPU
    (scripts/bench_cuda_gemv.py)."""
    from types import SimpleNamespace

    from arcquant.kernels.cuda_gemv import fp16_gemm_reference, int8_gemv_reference
    from arcquant.kernels.ops import OPS
    attn = quantized.model.layers[2].self_attn
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = (torch.randn(1, m, attn.q_proj.in_features, generator=torch.Generator().manual_seed(m)) * 3).bfloat16()
    calls, acts = [], []

    def act(*args):
        acts.append(args[-1])
        return OPS.quantize_act(*args)

    def int8(xi, xs, gs, wc, ws, wgs, bias, s, out_dtype, nr, kw, u=1, residual=None):
        calls.append("int8")
        e4m3 = lambda b: b.view(torch.float8_e4m3fn)          # scales cross the ops as their bits
        return epilogue(int8_gemv_reference(xi, e4m3(xs), gs, wc, e4m3(ws), wgs, s, bias).to(out_dtype), residual)

    def mma(xd, gs, wc, ws, wgs, bias, s, out_dtype, kw, occ, residual=None):
        calls.append("mma")
        return epilogue(fp16_gemm_reference(xd, gs, wc, ws.view(torch.float8_e4m3fn), wgs, s, bias).to(out_dtype),
                        residual)
    fake_ops = SimpleNamespace(quantize_act=act, gemv_int8=int8, gemm_mma=mma)
    with torch.no_grad():
        refs = [p(x.float()) for p in projs]
        for p in projs:
            p.kernel = KernelPath(p)
            assert p.kernel.cuda_reason == "the CUDA GEMV needs a CUDA device, got cpu"
            p.kernel.cuda_reason, p.kernel.int8_max_m = None, 2
            p.kernel.ops = fake_ops
        try:
            with backend("triton"):                            # the activation kernel through the interpreter
                got = [p(x) for p in projs]
        finally:
            for p in projs:
                p.kernel = None
    assert calls == [path] * 3
    assert acts == [path]     # q, k and v share one quantized input
    for g, r in zip(got, refs):
        assert g.dtype == torch.bfloat16 and g.shape == r.shape
        assert ((g.float() - r).norm() / r.norm()) < 4e-3


def epilogue(y, residual):
    """The CUDA GEMVs' residual epilogue as the fakes here apply it: torch's add (the kernels'
    bits against it: scripts/check_residual_epilogue.py on the GPU)."""
    return y if residual is None else residual + y


@pytest.mark.parametrize("m,path", [(1, "int8"), (11, "mma"), (40, "prefill")])
def test_residual_goes_into_the_gemv_epilogue(quantized, m, path):
    """QuantLinear(x, residual=r), as engine_fusion.linear_residual calls o_proj / down_proj: r +
    the layer's output, bit for bit; on the CUDA GEMVs the residual is handed to the op (one kernel,
    no add), at prefill sizes torch adds it afterwards, in a stacked group too; the reference
    backend adds it; a residual of another shape or dtype is refused."""
    from types import SimpleNamespace

    from arcquant.gpu import stack_groups
    from arcquant.kernels.cuda_gemv import fp16_gemm_reference, int8_gemv_reference
    from arcquant.kernels.ops import OPS
    attn = quantized.model.layers[2].self_attn
    o, q = attn.o_proj, attn.q_proj
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(1, m, o.in_features, generator=g) * 3).bfloat16()
    r = (torch.randn(1, m, o.out_features, generator=g) * 2).bfloat16()
    calls, e4m3 = [], lambda b: b.view(torch.float8_e4m3fn)

    def int8(xi, xs, gs, wc, ws, wgs, bias, s, out_dtype, nr, kw, u=1, residual=None):
        calls.append(("int8", residual is not None))
        return epilogue(int8_gemv_reference(xi, e4m3(xs), gs, wc, e4m3(ws), wgs, s, bias).to(out_dtype), residual)

    def mma(xd, gs, wc, ws, wgs, bias, s, out_dtype, kw, occ, residual=None, **pipe):
        calls.append(("mma", residual is not None))
        return epilogue(fp16_gemm_reference(xd, gs, wc, e4m3(ws), wgs, s, bias).to(out_dtype), residual)
    fake_ops = SimpleNamespace(quantize_act=OPS.quantize_act, gemv_int8=int8, gemm_mma=mma,
                               prefill=fast_prefill(calls, lambda wc: ("prefill", False)))
    with torch.no_grad():
        assert torch.equal(o(x, residual=r), r + o(x))                     # the reference backend
        for p in (o, attn.q_proj, attn.k_proj, attn.v_proj):
            p.kernel = KernelPath(p)
            p.kernel.cuda_reason, p.kernel.int8_max_m, p.kernel.ops = None, 2, fake_ops
        try:
            plain = o(x)
            calls.clear()
            fused = o(x, residual=r)
            assert calls == [(path, path != "prefill")]                     # the GEMVs take it into the op
            assert fused.dtype == torch.bfloat16 and torch.equal(fused, r + plain)
            rq = torch.randn(1, m, q.out_features, generator=g).bfloat16()
            assert stack_groups(quantized)["stacked"] >= 1 and q.kernel.group is not None
            calls.clear()
            assert torch.equal(q(x[..., :q.in_features], residual=rq), rq + q(x[..., :q.in_features]))
            assert calls[0][1] is False                                      # a group's launch: added after
            with pytest.raises(ValueError, match=r"residual torch.float32 .* does not match .* torch.bfloat16"):
                o(x, residual=r.float())
            with pytest.raises(ValueError, match="does not match this layer's output"):
                o(x, residual=r[..., :-1])
        finally:
            stack_groups(quantized, False)
            for p in (o, attn.q_proj, attn.k_proj, attn.v_proj):
                p.kernel = None


@pytest.mark.parametrize("m,path", [(1, "int8"), (8, "mma"), (40, "prefill")])
def test_fused_rmsnorm_hands_its_operand_to_the_group(quantized, m, path):
    """gpu.FusedNormQuant: the layer's RMSNorm output is transformers' (bit for bit, the op's CPU
    reference), and q/k/v take the quantized operand it left in their SharedInput instead of
    quantizing again (CUDA GEMVs replaced by their oracles, as above). The CUDA kernel itself is
    checked on the GPU by scripts/check_norm_kernel.py."""
    from types import SimpleNamespace

    from arcquant.gpu import FusedNormQuant, fuse_norms
    from arcquant.kernels.cuda_gemv import fp16_gemm_reference, int8_gemv_reference
    from arcquant.kernels.ops import OPS
    layer = quantized.model.layers[2]
    norm, attn = layer.input_layernorm, layer.self_attn
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = (torch.randn(1, m, norm.weight.numel(), generator=torch.Generator().manual_seed(m)) * 3).bfloat16()
    calls = []
    e4m3 = lambda b: b.view(torch.float8_e4m3fn)
    fake_ops = SimpleNamespace(
        quantize_act=lambda *a: calls.append("act") or OPS.quantize_act(*a),
        rmsnorm_quantize_act=lambda *a: calls.append("norm+act") or OPS.rmsnorm_quantize_act(*a),
        gemv_int8=lambda xi, xs, gs, wc, ws, wgs, bias, s, out_dtype, nr, kw, u=1, residual=None: calls.append("int8") or
        int8_gemv_reference(xi, e4m3(xs), gs, wc, e4m3(ws), wgs, s, bias).to(out_dtype),
        gemm_mma=lambda xd, gs, wc, ws, wgs, bias, s, out_dtype, kw, occ, **pipe: calls.append("mma") or
        fp16_gemm_reference(xd, gs, wc, e4m3(ws), wgs, s, bias).to(out_dtype),
        prefill=lambda xd, gs, wc, ws, wgs, bias, s, out_dtype: calls.append("prefill") or
        fp16_gemm_reference(xd, gs, wc, e4m3(ws), wgs, s, bias, mma_order=False).to(out_dtype))
    norm_b = norm.to(torch.bfloat16)
    with torch.no_grad():
        want_y = norm_b(x)
        refs = [p(want_y.float()) for p in projs]
        assert fuse_norms(quantized)["fused"] == 0                    # CPU layers: nothing swapped
        for p in projs:
            p.kernel = KernelPath(p)
            p.kernel.cuda_reason, p.kernel.int8_max_m, p.kernel.ops = None, 2, fake_ops
        try:
            fused = FusedNormQuant(norm_b, attn.q_proj)
            assert list(fused.state_dict()) == list(norm_b.state_dict())   # checkpoints keep their keys
            y = fused(x)
            got = [p(y) for p in projs]
        finally:
            for p in projs:
                p.kernel = None
            norm.float()
    assert torch.equal(y, want_y)
    assert calls == ["norm+act"] + [path] * 3                       # no second activation quantization
    for g, r in zip(got, refs):
        assert ((g.float() - r).norm() / r.norm()) < 4e-3


@pytest.mark.parametrize("m,stack", [(40, False), (40, True), (8, False)])
def test_fused_mlp_prefill_equals_the_unfused_layers(quantized, m, stack):
    """gpu.fused_mlp_forward: at a prefill size (M = 40, the cuBLAS path) gate and up's unscaled
    products go to silu_mul_quantize_act (their tensor scales, SiLU * up, down_proj's operand) and
    then down_proj's product; with the GPU's fast prefill (bf16 GEMM output, then scale_rows)
    emulated on the CPU references, the output equals the unfused layers' bit for bit. At a
    decode size (M = 8) gate, up and down run as before and SiLU(gate) * up is one op (silu_mul).
    stack: gate and up stacked (gpu.stack_groups) - one unscaled product for both, the kernel
    reading its two halves. The CUDA kernels themselves are checked on the GPU by
    scripts/check_mlp_fusion.py."""
    from types import SimpleNamespace

    from arcquant.gpu import fuse_mlps, stack_groups
    from arcquant.kernels.cuda_gemv import fp16_gemm_reference
    from arcquant.kernels.ops import OPS
    mlp = quantized.model.layers[3].mlp
    x = (torch.randn(1, m, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(m)) * 2).bfloat16()
    calls = []
    spy = lambda name: lambda *a, **k: calls.append(name) or getattr(OPS, name)(*a, **k)

    fake_ops = SimpleNamespace(quantize_act=spy("quantize_act"), prefill_unscaled=spy("prefill_unscaled"),
                               silu_mul_quantize_act=spy("silu_mul_quantize_act"), silu_mul=spy("silu_mul"),
                               prefill=fast_prefill(calls),
                               gemm_mma=lambda xd, gs, wc, ws, wgs, bias, s, out_dtype, kw, occ, **pipe:
                               calls.append("mma") or epilogue(fp16_gemm_reference(
                                   xd, gs, wc, ws.view(torch.float8_e4m3fn), wgs, s, bias).to(out_dtype),
                                   pipe.get("residual")))
    projs = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    with torch.no_grad():
        for p in projs:
            p.kernel = KernelPath(p)
            p.kernel.cuda_reason, p.kernel.ops = None, fake_ops
        try:
            want = mlp(x)
            unfused_calls, keys = calls[:], list(mlp.state_dict())
            if stack:
                assert stack_groups(quantized)["stacked"] == 1 and mlp.gate_proj.kernel.group is not None
            counts = fuse_mlps(quantized)
            assert counts["fused"] == 1 and counts["reasons"] == {"a projection is not on the kernel path":
                                                                 len(quantized.model.layers) - 1}
            assert "forward" in vars(mlp) and list(mlp.state_dict()) == keys        # checkpoints keep their keys
            del calls[:]
            got = mlp(x.clone())                                          # a new input: no cached operand
            fused_calls = calls[:]
            r = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).bfloat16()
            with_residual = mlp(x.clone(), residual=r)                    # engine_fusion.mlp_residual's call
        finally:
            fuse_mlps(quantized, False)
            stack_groups(quantized, False)
            for p in projs:
                p.kernel = None
    assert "forward" not in vars(mlp)
    if m == 40:
        assert unfused_calls == ["quantize_act", "prefill", "prefill", "quantize_act", "prefill"]
        unscaled = ["prefill_unscaled"] * (1 if stack else 2)                  # stacked: one product for both
        assert fused_calls == ["quantize_act", *unscaled, "silu_mul_quantize_act", "prefill"]
    else:
        assert unfused_calls == ["quantize_act", "mma", "mma", "quantize_act", "mma"]
        assert fused_calls == ["quantize_act", "mma", "mma", "silu_mul", "quantize_act", "mma"]   # SiLU * up: one op
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(with_residual, r + got)


def test_mlp_fusion_refusals_name_the_reason(quantized):
    """gpu._mlp_fusable: an MLP whose prefill cannot run the fused kernel says why, and fuse_mlps
    leaves it unfused (its own forward)."""
    from arcquant.gpu import _mlp_fusable, fuse_mlps
    mlp = quantized.model.layers[1].mlp
    projs = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    assert _mlp_fusable(mlp) == "a projection is not on the kernel path"
    scale, bias = mlp.down_proj.act_scale, mlp.gate_proj.bias
    assert scale == "token" and bias is None                        # the fixture's defaults
    with torch.no_grad():
        for p in projs:
            p.kernel = KernelPath(p)
        try:
            assert _mlp_fusable(mlp) == "the fused kernel is CUDA: the CUDA GEMV needs a CUDA device, got cpu"
            for p in projs:
                p.kernel.cuda_reason = None
            assert _mlp_fusable(mlp) is None
            mlp.down_proj.act_scale = "dynamic"
            assert _mlp_fusable(mlp) == "down_proj's activation scale 'dynamic' needs the whole batch's amax"
            assert fuse_mlps(quantized)["fused"] == 0 and "forward" not in vars(mlp)
            mlp.down_proj.act_scale = scale
            mlp.gate_proj.bias = torch.nn.Parameter(torch.zeros(mlp.gate_proj.out_features))
            assert _mlp_fusable(mlp) == "gate_proj / up_proj carry a bias"
        finally:
            mlp.gate_proj.bias, mlp.down_proj.act_scale = bias, scale
            for p in projs:
                p.kernel = None


def fast_prefill(calls, record=lambda wc: "prefill"):
    """The GPU's fast prefill (bf16 GEMM output, then the scale_rows epilogue) on the CPU oracles."""
    from arcquant.kernels.ops import OPS
    from arcquant.kernels.prefill import scale_rows

    def prefill(xd, xgs, wc, ws, wgs, bias, s, out_dtype):
        calls.append(record(wc))
        y = OPS.prefill_unscaled(xd, wc, ws, s)
        return scale_rows(y, xgs, wgs, None if bias is None else bias.to(y.dtype), cuda=False).to(out_dtype)
    return prefill


@pytest.mark.parametrize("m,path", [(1, "int8"), (8, "mma"), (40, "prefill")])
def test_stacked_group_is_one_launch_with_the_same_outputs(quantized, m, path):
    """gpu.stack_groups: q/k/v as one stacked weight (row views, per-row tensor scales, biases
    concatenated with zeros where a layer has none) - one GEMV launch for the group, or at prefill
    one dequantization + GEMM + epilogue (its weight scale per column), each layer's output equal to
    its own product's; state-dict values unchanged; enable=False gives each layer its own storage
    back. CUDA GEMVs replaced by their float64 oracles, as above."""
    from types import SimpleNamespace

    from arcquant.gpu import stack_groups
    from arcquant.kernels.cuda_gemv import fp16_gemm_reference, int8_gemv_reference
    from arcquant.kernels.ops import OPS
    attn = quantized.model.layers[3].self_attn
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    calls, e4m3 = [], lambda b: b.view(torch.float8_e4m3fn)
    fake_ops = SimpleNamespace(
        quantize_act=OPS.quantize_act,
        gemv_int8=lambda xi, xs, gs, wc, ws, wgs, bias, s, out_dtype, nr, kw, u=1, residual=None: calls.append(wc.shape[0]) or
        int8_gemv_reference(xi, e4m3(xs), gs, wc, e4m3(ws), wgs, s, bias).to(out_dtype),
        gemm_mma=lambda xd, gs, wc, ws, wgs, bias, s, out_dtype, kw, occ, **pipe: calls.append(wc.shape[0]) or
        fp16_gemm_reference(xd, gs, wc, e4m3(ws), wgs, s, bias).to(out_dtype),
        prefill=fast_prefill(calls, lambda wc: wc.shape[0]))
    x = (torch.randn(1, m, attn.q_proj.in_features, generator=torch.Generator().manual_seed(m)) * 3).bfloat16()
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    attn.k_proj.bias = torch.nn.Parameter(torch.randn(attn.k_proj.out_features), requires_grad=False)
    try:
        with torch.no_grad():
            for p in projs:
                p.kernel = KernelPath(p)
                p.kernel.cuda_reason, p.kernel.int8_max_m, p.kernel.ops = None, 2, fake_ops
            alone = [p(x) for p in projs]
            assert stack_groups(quantized)["stacked"] == 1
            assert len({p.weight_packed.untyped_storage().data_ptr() for p in projs}) == 1   # row views
            calls.clear()
            stacked = [p(x) for p in projs]
            assert calls == [sum(p.out_features for p in projs)]         # one launch for q, k and v
            assert projs[0].kernel.group.product._value is None          # every layer took its columns: let go
            for a, b in zip(alone, stacked):
                assert torch.equal(a, b) and b.shape == a.shape
            attn.k_proj.bias = None
            state = attn.state_dict()
            assert all(torch.equal(state[k], v) for k, v in before.items())
            stack_groups(quantized, enable=False)
            assert len({p.weight_packed.untyped_storage().data_ptr() for p in projs}) == 3
    finally:
        attn.k_proj.bias = None
        stack_groups(quantized, enable=False)
        for p in projs:
            p.kernel = None


def test_kernel_launch_settings():
    from arcquant.gpu import cuda_gemv_config, mma_config
    assert cuda_gemv_config(1, 4096) == dict(nr=2, kw=1, u=1) and cuda_gemv_config(2, 14336) == dict(nr=4, kw=2, u=1)
    # chain sweep (v38): layers of N <= 4096 (o_proj, down_proj) with 2 rows a block and 2 warps along K;
    # two tokens of q/k/v with 2 rows a block
    assert cuda_gemv_config(1, 4096, 4096) == dict(nr=2, kw=2, u=1) == cuda_gemv_config(2, 3584, 3584)
    assert cuda_gemv_config(1, 14336, 4096) == dict(nr=2, kw=2, u=1) == cuda_gemv_config(2, 18944, 3584)
    assert cuda_gemv_config(1, 4096, 6144) == dict(nr=2, kw=1, u=1) == cuda_gemv_config(2, 3584, 4608)
    assert cuda_gemv_config(2, 4096, 28672) == dict(nr=4, kw=1, u=1)
    pipe = lambda kw, st, xs: dict(kw=kw, occ=False, st=st, xs=xs)                  # the cp.async-pipelined kernel
    # up to 8 tokens, K % 512 == 0: pipelined; wide (gate/up) from L2, the others with staged activations
    assert mma_config(8, 28672, 4096) == pipe(4, 2, False) and mma_config(8, 37888, 3584) == pipe(4, 2, False)
    assert mma_config(8, 4096, 14336) == pipe(8, 3, True) and mma_config(4, 3584, 18944) == pipe(4, 3, True)
    assert mma_config(4, 4096, 4096) == pipe(4, 3, True) and mma_config(8, 3584, 3584) == pipe(4, 3, True)
    # q/k/v-sized (4096 < N < 16384, K < 8192): 8 warps along K, pipelined from L2 where K % 1024 == 0
    assert mma_config(3, 6144, 4096) == pipe(8, 2, False) and mma_config(8, 4608, 3584) == dict(kw=8, occ=False)
    # 9 - 16 tokens: pipelined only very wide (Qwen gate/up) and deep with K % 1024 == 0 (Llama down)
    assert mma_config(16, 37888, 3584) == pipe(4, 3, True) and mma_config(12, 4096, 14336) == pipe(4, 4, True)
    assert mma_config(16, 28672, 4096) == dict(kw=1, occ=False) and mma_config(16, 3584, 18944) == dict(kw=8, occ=False)
    assert mma_config(16, 6144, 4096) == dict(kw=4, occ=False) and mma_config(16, 4096, 4096) == dict(kw=8, occ=False)
    # 17 - 32 tokens: the register-bounded entry, many warps along K for few output rows
    assert mma_config(32, 4096, 4096) == dict(kw=8, occ=True) and mma_config(32, 28672, 4096) == dict(kw=4, occ=True)
    assert mma_config(32, 6144, 4096) == dict(kw=4, occ=True) and mma_config(32, 3584, 18944) == dict(kw=8, occ=True)
    # pipelined=False (gpu.pipelined_gemv(False), the e2e A/B): the unpipelined kernel's settings
    assert mma_config(8, 28672, 4096, False) == dict(kw=4, occ=False) and mma_config(8, 4096, 14336, False) == dict(
        kw=8, occ=False)
    assert mma_config(16, 37888, 3584, False) == dict(kw=4, occ=True) and mma_config(16, 4096, 14336, False) == dict(
        kw=8, occ=False)
    assert mma_config(8, 28672, 3840) == dict(kw=4, occ=False)                       # K % 512 != 0: not pipelined
    assert gemv_config(1, 4096)["fma"] and gemv_config(4, 14336)["block_n"] == 2
    assert not gemv_config(8, 4096)["fma"]


def test_launch_settings_follow_the_chain_sweep():
    """Every decode GEMV setting the model picks is within 10 % of the fastest one measured for
    that layer and token count in the chain sweep (results/sweep-chain-h200.json: H200, each setting
    back to back on weights not in L2, as the model runs them), on both model shapes."""
    import json
    from pathlib import Path
    from arcquant.gpu import cuda_gemv_config, mma_config
    rows = json.loads((Path(__file__).resolve().parents[1] / "results" / "sweep-chain-h200.json").read_text())["rows"]
    key = lambda cfg: ",".join(f"{k}={int(v)}" for k, v in sorted(cfg.items()))
    assert {r["model"] for r in rows} == {"llama-3.1-8b", "qwen2.5-7b"} and {r["M"] for r in rows} == {1, 2, 8, 16}
    for r in rows:
        m, k, n = r["M"], r["K"], r["N"]
        cfg = cuda_gemv_config(m, k, n) if m <= 2 else dict(dict(st=0, xs=False), **mma_config(m, n, k))
        picked = r["times"][key(cfg)]
        assert picked <= 1.10 * min(r["times"].values()), (r["model"], r["layer"], m, key(cfg), picked)


def test_cpu_model_stays_on_the_reference_backend(quantized, caplog):
    with caplog.at_level("INFO", logger="arcquant"):
        counts = use_kernels(quantized)
    assert counts["kernels"] == 0 and counts["reference"] == 210
    assert counts["reasons"] == {"the layer is not on a CUDA device": 210}
    assert "kernels for 0 layers (decode GEMV in CUDA for 0), reference for 210" in caplog.text
    assert "programmatic dependent launch off (needs a CUDA GPU of compute capability >= 9.0, model on cpu)" \
        in caplog.text


def test_compiled_decode_step_equals_eager():
    """Engine(compile=True): the decode step through torch.compile (inductor on CPU), with every
    quantized layer on the kernel path as custom ops (reference backend on CPU), gives the same
    greedy tokens and logits as the eager step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from arcquant.modeling import load_model
    from arcquant.qlinear import QuantLinear
    _, tok = load_model("smollm2-135m")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    quantize_model(model, tok, QuantConfig(), CalibConfig(nsamples=2, seqlen=32), progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for q in layers:
        q.kernel = KernelPath(q)
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    eager = Engine(model, 1, 16, graphs=False)
    compiled = Engine(model, 1, 16, graphs=False, compile=True)
    torch._dynamo.reset()
    try:
        assert torch.equal(eager.generate(ids, 5), compiled.generate(ids, 5))
        le, lc = eager.step(ids[:, -1:], 8), compiled.step(ids[:, -1:], 8)
    finally:
        torch._dynamo.reset()
    assert ((lc - le).norm() / le.norm()) < 1e-4
    assert len(layers) == 14


def test_bench_table_ratios_and_graph_prefill_column():
    """arcquant bench's table: ratios to the first (BF16) row, the graph prefill column only when
    every row has it."""
    from arcquant.bench import table
    base = {"model": "bf16", "decode_tok_s_b1": 100.0, "prefill_ms_2048": 80.0, "prefill_ms_2048_graph": 75.0,
            "linear_bytes": 13 * 2**30, "total_bytes": 15 * 2**30, "peak_gpu_bytes": 17 * 2**30}
    arc = dict(base, model="arc", decode_tok_s_b1=150.0, prefill_ms_2048=120.0, prefill_ms_2048_graph=97.5,
               linear_bytes=3.25 * 2**30)
    head, _, _, row = table([base, arc], [1], 2048).splitlines()
    assert "prefill 2048 ms, graph" in head
    assert row.split(" | ")[1:5] == ["150.0 (1.50x)", "120.0 (1.50x)", "97.5 (1.30x)", "3.25 (4.00x smaller)"]
    del arc["prefill_ms_2048_graph"]
    assert "graph" not in table([base, arc], [1], 2048).splitlines()[0]
    stacked = dict(base, model="bf16-stacked", decode_tok_s_b1=120.0, prefill_ms_2048_graph=78.0)
    arc["prefill_ms_2048_graph"] = 97.5
    lines = table([base, stacked, arc], [1], 2048).splitlines()
    assert lines[-1] == "arc vs bf16-stacked: decode b1 1.25x, prefill 2048 graph 1.25x the latency"
    arc8 = dict(arc, decode_tok_s_b8=1150.0, decode_tok_s_b8_unpipelined=1100.0)   # the pipelined GEMV's A/B
    last = table([dict(base, decode_tok_s_b8=880.0), arc8], [1, 8], 2048).splitlines()[-1]
    assert last == "arc decode b8 with the pipelined GEMV off: 1100.0 tok/s (1.25x BF16; on: 1150.0)"
    res = lambda r, b1, b8, p, d: dict(r, decode_tok_s_b1_no_residual=b1, decode_tok_s_b8_no_residual=b8,  # noqa: E731
                                       prefill_ms_2048_graph_no_residual=p, no_residual_logits_max_abs_diff=d)
    last = table([res(dict(base, decode_tok_s_b8=880.0), 90.0, 800.0, 76.0, 1.5), res(arc8, 135.0, 1000.0, 98.0, 0.0)],
                 [1, 8], 2048).splitlines()[-1]                          # the residual fusion's A/B
    assert last == ("Residual adds as separate kernels (engine_fusion.linear_residual off; tok/s): bf16 b1 90.0, b8 "
                    "800.0, prefill graph 76.0 ms, teacher-forced logits vs fused: max |diff| 1.5; arc b1 135.0 (1.50x), "
                    "b8 1000.0 (1.25x), prefill graph 98.0 ms, teacher-forced logits vs fused: max |diff| 0")


def test_bench_refuses_an_unknown_ab():
    from arcquant.bench import AB, run_bench
    with pytest.raises(ValueError, match=r"unknown A/B \['speed'\]: choose from \['fusion', 'pdl', 'residual'"):
        run_bench("bf16-folder", "arc-folder", ab=("pdl", "speed"))
    assert set(AB) == {"fusion", "pdl", "residual", "pipeline", "prefill"}


def test_teacher_forced_logits_feed_the_given_tokens_and_compare_step_by_step(fresh_smollm):
    """bench.greedy_logits on the real SmolLM2 (CPU engine, no graphs): greedy feeds each step's
    argmax; given tokens it feeds those (teacher forcing), so the same setting fed its own greedy
    tokens reproduces its logits, and other tokens give other logits. logit_difference's figures
    against hand-computed ones, and the table's sentence in both the new and the old form."""
    from arcquant.bench import engine_fusion_logits, greedy_logits, logit_difference
    model, _ = fresh_smollm
    vocab = model.config.vocab_size
    logits, fed = greedy_logits(model, 4, vocab, graphs=False)
    assert logits.shape == (4, vocab) and fed.shape == (4,)
    assert torch.equal(fed[1:], logits[:-1].argmax(-1))                  # greedy: the previous argmax
    same, fed2 = greedy_logits(model, 4, vocab, graphs=False, tokens=fed)
    assert torch.equal(fed2, fed) and torch.equal(same, logits)
    other = (fed + 1) % vocab
    moved, fed3 = greedy_logits(model, 4, vocab, graphs=False, tokens=other)
    assert torch.equal(fed3, other) and not torch.equal(moved, logits)
    want = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    got = torch.tensor([[1.5, 2.0, 0.0], [0.0, 4.0, 3.0]])                 # row 2's argmax flips
    d = logit_difference(got, want, "x")
    assert d["x_logits_max_abs_diff"] == 4.0 and d["x_top1_agree"] == 0.5
    assert abs(d["x_logits_rel_diff"] - (0.25 + 16) ** 0.5 / 14 ** 0.5) < 1e-6
    rows = [{"model": "bf16", "unfused_engine_logits_max_abs_diff": 0.5, "unfused_engine_logits_rel_diff": 1e-3,
             "unfused_engine_top1_agree": 1.0}]
    assert engine_fusion_logits(rows) == ("teacher-forced logits of 32 decode steps vs fused: bf16 max |diff| 0.5, "
                                          "relative 1.00e-03, top-1 agree 100 %")
    del rows[0]["unfused_engine_logits_rel_diff"]                         # a result file from before
    assert engine_fusion_logits(rows) == "logits of 32 greedy steps vs fused: max |diff| bf16 0.5"


def test_layer_benchmark_tables_state_the_measured_ranges():
    """scripts/bench_layers.py --md on the committed H200 result: the three target lines give the
    min / max computed here from its rows (the GPU run itself needs CUDA)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    res = root / "results" / "bench-layers-v23-h200.json"
    md = subprocess.run([sys.executable, str(root / "scripts" / "bench_layers.py"), "--md", str(res)],
                        capture_output=True, text=True, check=True).stdout
    d = json.loads(res.read_text())
    dec = [r["speedup_both_vs_bf16"] for r in d["rows"] if r["M"] <= 16 and r["model"].startswith("llama")]
    assert f"{min(dec):.2f}x - {max(dec):.2f}x" in md
    pct = [100 * r["act_GBps"] / d["header"]["copy_GBps"] for r in d["rows"] if r["M"] == 4096]
    assert f"{min(pct):.0f} - {max(pct):.0f} %" in md
    assert md.count("\n| ") == len(d["rows"]) + 1                 # header row + one per measured row
    bad = subprocess.run([sys.executable, str(root / "scripts" / "bench_layers.py")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--out FILE" in bad.stderr


def test_gpu_checks_report_and_fail_on_a_bad_case(tmp_path, monkeypatch, capsys):
    """scripts/bench_hopper_paths.finish_check, how every GPU exactness check ends: the record with
    the case and failure counts written, each failed row printed, exit status 1 if any failed."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_hopper_paths
    monkeypatch.setattr(bench_hopper_paths, "run_header", lambda **extra: {"card": "test"})
    rows = [{"K": 64, "equal": True}, {"K": 96, "equal": False}]
    for bad, code in (([rows[1]], 1), ([], 0)):
        with pytest.raises(SystemExit) as exit_:
            bench_hopper_paths.finish_check(str(tmp_path / "sub" / "out.json"), rows, bad, settings=[1, 2])
        assert exit_.value.code == code
        record = json.loads((tmp_path / "sub" / "out.json").read_text())
        assert record == {"header": {"card": "test"}, "settings": [1, 2], "cases": 2, "failed": len(bad), "rows": rows}
        assert ('FAILED {"K": 96, "equal": false}' in capsys.readouterr().out) == bool(bad)
