"""Engine-level fusions, given to every model the engine runs: BF16 and quantized alike.

A decode step of an eager transformers model spends much of its time in tiny kernels that
are the same for the BF16 and the quantized model; leaving them in makes both slower and the
quantized model's ratio to BF16 look better than against a good BF16 engine. Three of them
are replaced here by one kernel each:
- attention (ROPE_ATTENTION classes): rotary + static KV-cache write, ~15 kernels -> 1
  (kernels/rope_cache.py; bit-exact with the eager ops); then, for up to 16 new tokens with the
  SDPA or eager attention and a boolean mask, grouped-query attention over the cache in one
  kernel (kernels/decode_attention.py: no repeat_kv copies of the cache; to the dtype's rounding,
  DECODE_ATTENTION = False keeps the model's attention function), else that function as before;
- RMSNorm (RMS_NORMS classes, wherever the norm is not already fused with an activation
  quantization): ~7 kernels -> 1 (kernels/rmsnorm.py; a value may move by one ulp);
- the two residual adds of a decoder layer (RESIDUAL_LAYERS classes, with the attention above):
  into the o_proj and down_proj products (linear_residual: a QuantLinear's CUDA GEMV adds the
  residual in its epilogue, the same bits as the add; a BF16 nn.Linear on CUDA runs cuBLAS addmm,
  one rounding instead of two), 2 kernels a layer fewer.
Each is installed as an instance `forward` (module names and state dicts unchanged) and falls
back to the class's forward whenever a call does not fit: CPU tensors on the reference
backend, torch.compile tracing, training, no static cache layer (or a sliding-window one),
rotary tables of another size or dtype.
"""
import sys
import types

import torch

from .gpu import GATED_MLPS, fused_mlp_forward
from .gpu import NORMS as RMS_NORMS          # the classes whose forward is transformers' Llama RMSNorm
from .kernels.decode_attention import decode_attention, decode_attention_reason
from .kernels.ops import runs_kernels
from .kernels.rmsnorm import rmsnorm, rmsnorm_reason
from .kernels.rope_cache import DTYPES, rope_cache

# classes whose forward is transformers' Llama attention (q/k/v -> rotate-half rotary -> cache
# update -> attention function -> o_proj); the Qwen2 / Mistral ones pass sliding_window on too
ROPE_ATTENTION = {"LlamaAttention", "Qwen2Attention", "MistralAttention", "MixtralAttention", "Qwen2MoeAttention"}
DECODE_ATTENTION = True
# decoder layers whose forward is transformers' Llama one: x + attn(norm(x)), then h + mlp(norm(h))
RESIDUAL_LAYERS = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer", "Qwen3DecoderLayer"}
BF16_ADDMM = True                            # nn.Linear + residual as one cuBLAS addmm (CUDA)


def _static_layer(cache, idx: int):
    """The cache's full-length static layer idx, or None (no cache, a dynamic or sliding one)."""
    from transformers.cache_utils import StaticLayer
    layers = getattr(cache, "layers", None)
    if layers is None or idx is None or idx >= len(layers):
        return None
    layer = layers[idx]
    return layer if isinstance(layer, StaticLayer) and not getattr(layer, "is_sliding", True) else None


def rope_reason(attn, x: torch.Tensor, position_embeddings, layer) -> str | None:
    """Why this attention call cannot take the fused rotary + cache kernel (None: it can)."""
    if torch.compiler.is_compiling() or attn.training:
        return "torch.compile tracing or training"
    if not runs_kernels(x) or x.dtype not in DTYPES:
        return f"{x.dtype} on {x.device} (the kernel: {DTYPES} on CUDA, or the Triton interpreter)"
    if layer is None or position_embeddings is None:
        return "no full-length static cache layer or no rotary tables"
    cos = position_embeddings[0]
    if cos.dtype != x.dtype or cos.dim() != 3 or cos.shape[-1] != attn.head_dim or cos.shape[0] not in (1, x.shape[0]) \
            or cos.shape[1] != x.shape[1]:
        return f"rotary tables {tuple(cos.shape)} {cos.dtype} for {tuple(x.shape[:2])} tokens, head size " \
               f"{attn.head_dim}, {x.dtype}"
    return None


def linear_residual(linear, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """residual + linear(x) (linear(x) when residual is None), fused where the layer can: a
    QuantLinear adds it in its GEMV epilogue (the same bits), a bias-free BF16/FP16 nn.Linear on
    CUDA (BF16_ADDMM) is one addmm (cuBLAS rounds once: may differ from the add by one ulp)."""
    from .qlinear import QuantLinear
    if residual is None:
        return linear(x)
    if isinstance(linear, QuantLinear):
        return linear(x, residual=residual)
    if _addmm_fits(linear, x, residual):
        w = linear.weight                                                # (N, K)
        return torch.addmm(residual.reshape(-1, w.shape[0]), x.reshape(-1, w.shape[1]), w.t()).view(residual.shape)
    return residual + linear(x)


def _addmm_fits(linear, x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether linear_residual runs residual + linear(x) as one addmm (BF16_ADDMM, CUDA)."""
    return BF16_ADDMM and type(linear) is torch.nn.Linear and linear.bias is None and x.is_cuda and \
        x.dtype == residual.dtype == linear.weight.dtype and residual.is_contiguous() and \
        not torch.compiler.is_compiling()


def mlp_residual(mlp, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + mlp(x), the add fused into down_proj where the MLP's forward is known."""
    forward = vars(mlp).get("forward")
    if forward is not None and getattr(forward, "func", None) is fused_mlp_forward:
        return mlp(x, residual=residual)
    if forward is None and type(mlp).__name__ in GATED_MLPS:
        return linear_residual(mlp.down_proj, mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), residual)
    return residual + mlp(x)


def _layer_forward(self, hidden_states, *args, **kwargs):
    """RESIDUAL_LAYERS' forward with its residual adds handed to o_proj and down_proj (the class's
    forward when the attention is not the fused one, or for positional arguments)."""
    if args or self.training or torch.compiler.is_compiling() or \
            getattr(vars(self.self_attn).get("forward"), "__func__", None) is not _attention_forward:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), residual=hidden_states, **kwargs)
    return mlp_residual(self.mlp, self.post_attention_layernorm(h), h)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, residual=None, **kwargs):
    """ROPE_ATTENTION's forward with the rotary and the cache write as one kernel, then the decode
    attention kernel where it fits (else the model's attention function on the cache). residual
    (_layer_forward): returns residual + the output, the add fused into o_proj where it can."""
    key = "cache" if "cache" in kwargs else "past_key_values"           # transformers >= 5.2x: `cache`
    layer = _static_layer(kwargs.get(key), self.layer_idx)
    if rope_reason(self, hidden_states, position_embeddings, layer) is not None:
        out, weights = type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                          attention_mask=attention_mask, **kwargs)
        return out if residual is None else residual + out, weights
    kwargs.pop(key)
    b, t, _ = hidden_states.shape
    q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)  # (B, T, H*D)
    if not layer.is_initialized:                                       # shapes, dtype, device of the cache
        heads = lambda y: y.view(b, t, -1, self.head_dim).transpose(1, 2)
        layer.lazy_initialization(heads(k), heads(v))
    cos, sin = (c.expand(b, t, -1) for c in position_embeddings)      # (B, T, D); batch 1 broadcast
    qh = rope_cache(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length.view(1))  # (B, HQ, T, D)
    layer.cumulative_length.add_(t)
    if DECODE_ATTENTION and self.config._attn_implementation in ("sdpa", "eager") and \
            decode_attention_reason(qh, layer.keys, layer.values, attention_mask) is None:
        out = decode_attention(qh, layer.keys, layer.values, attention_mask, self.scaling,
                               layer.cumulative_length.view(1))           # (B, T, HQ, D); keys written so far
        return linear_residual(self.o_proj, out.view(b, t, -1), residual), None
    mod = sys.modules[type(self).__module__]
    interface = mod.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, mod.eager_attention_forward)
    if type(self).__name__ == "Qwen2Attention":
        kwargs["sliding_window"] = self.sliding_window
    elif type(self).__name__ in ("MistralAttention", "MixtralAttention"):
        kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
    out, weights = interface(self, qh, layer.keys, layer.values, attention_mask, dropout=0.0,
                             scaling=self.scaling, **kwargs)
    return linear_residual(self.o_proj, out.reshape(b, t, -1).contiguous(), residual), weights


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """RMS_NORMS's forward through one kernel."""
    if torch.compiler.is_compiling() or not runs_kernels(x) or rmsnorm_reason(x, self.weight) is not None:
        return type(self).forward(self, x)
    return rmsnorm(x, self.weight, self.variance_epsilon)


def fuse_engine(model, enable: bool = True, attention: bool = True, norms: bool = True, residual: bool = True) -> dict:
    """Install (enable=False: remove) the fusions chosen on every module of a supported class.
    -> {"attention": n, "norms": n, "layers": n (residual adds), "other_attention": sorted class
    names left as they are}. The residual fusion needs the attention one (its o_proj call)."""
    counts, other = {"attention": 0, "norms": 0, "layers": 0}, set()
    kinds = {_attention_forward: "attention", _norm_forward: "norms", _layer_forward: "layers"}
    for mod in model.modules():
        name = type(mod).__name__
        forward = _attention_forward if name in ROPE_ATTENTION and attention else \
            _norm_forward if name in RMS_NORMS and norms else \
            _layer_forward if name in RESIDUAL_LAYERS and residual and attention else None
        if forward is None:
            if name.endswith("Attention"):
                other.add(name)
            if name in RESIDUAL_LAYERS:                                 # chosen off: its forward as the class's
                mod.__dict__.pop("forward", None)
            continue
        if enable:
            mod.forward = types.MethodType(forward, mod)
        else:
            mod.__dict__.pop("forward", None)
        counts[kinds[forward]] += 1
    counts["other_attention"] = sorted(other)
    return counts
