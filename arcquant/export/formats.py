"""Per-layer tensors and config blocks of each export format (spec/checkpoints.md).

    compressed-tensors  NAME.weight_packed (N, K/2) u8, NAME.weight_scale (N, K/16) e4m3,
                        NAME.weight_global_scale (1,) f32 = 448*6/amax,
                        [NAME.input_global_scale (1,) f32 = 448*6/amax(x), W4A4 only]
    modelopt-nvfp4      NAME.weight (N, K/2) u8, NAME.weight_scale (N, K/16) e4m3,
                        NAME.weight_scale_2 () f32 = amax/(6*448), NAME.input_scale () f32
    trtllm-arc          as modelopt, but weight (N, (K+s)/2) and weight_scale (N, (K+s)/16) in
                        the NVFP4_ARC interleaved layout (layout.py), plus
                        NAME.reorder_index (K,) int16: the engine computes X[:, reorder_index]
"""
import torch

from .. import __version__
from ..config import WEIGHT_RESIDUAL
from ..formats import nvfp4
from . import layout

EXPORT_FORMATS = ("trtllm-arc", "compressed-tensors", "modelopt-nvfp4")
ARC_EXPORT_VERSION = 1
TRT_MAX_K = 16384          # fp4_quantize_with_reorder_residual refuses KQ > 16384


class ExportError(ValueError):
    pass


def input_amax(q, name: str) -> torch.Tensor:
    """The calibrated max |x| of a W4A4 layer (a static scale is exact when it was used)."""
    if q.act_scale == "static":
        return torch.full((), nvfp4.E4M3_MAX * 6.0) / q.input_global_scale
    if q.input_amax is None:
        raise ExportError(f"{name}: the checkpoint has no calibrated input range (written by an older "
                          "arcquant); quantize it again to export W4A4")
    return torch.tensor(q.input_amax, dtype=torch.float32)


def _input_gs(q, name):
    return q.input_global_scale.reshape(1) if q.act_scale == "static" else \
        nvfp4.global_scale_from_amax(input_amax(q, name)).reshape(1)


def _input_scale(q, name):
    """ModelOpt input_scale: the float32 whose reciprocal is our global scale (when one exists),
    so that an engine computing 1/input_scale quantizes activations as compressed-tensors does."""
    return layout.reciprocal_scale(_input_gs(q, name))


def layer_tensors(fmt: str, q, name: str) -> tuple[dict, bool]:
    """-> ({suffix: tensor}, exact) for one QuantLinear; exact: the engine computes our product
    (False for the plain-NVFP4 fallback of an ARC layer, or a re-quantized weight)."""
    qw = q.quantized_weight()
    if fmt == "trtllm-arc":
        codes, scales = layout.to_trt_arc(qw.codes, qw.scales, q.s)
        out = {"weight": nvfp4.pack(codes), "weight_scale": scales,
               "weight_scale_2": layout.reciprocal_scale(q.weight_global_scale),
               "input_scale": _input_scale(q, name), "reorder_index": q.perm.to(torch.int16)}
        return out, True
    codes, scales, same = layout.plain_nvfp4(qw.codes, qw.scales, q.plan, q.weight_global_scale)
    exact = same and q.s == 0
    if fmt == "compressed-tensors":
        out = {"weight_packed": nvfp4.pack(codes), "weight_scale": scales,
               "weight_global_scale": q.weight_global_scale.reshape(1)}
        if q.act == "fp4":
            out["input_global_scale"] = _input_gs(q, name)
        return out, exact
    out = {"weight": nvfp4.pack(codes), "weight_scale": scales,
           "weight_scale_2": layout.reciprocal_scale(q.weight_global_scale), "input_scale": _input_scale(q, name)}
    return out, exact


def check_exportable(fmt: str, meta: dict) -> list[str]:
    """Refuse what the engine cannot run; -> warnings for what it runs less accurately."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"format {fmt!r} is unknown; valid formats: {', '.join(EXPORT_FORMATS)}")
    q = meta["quant"]
    method, qfmt = q["method"], q["fmt"]
    if method == "fp":
        raise ExportError("the checkpoint has no quantized layers (method fp); nothing to export")
    if qfmt != "nvfp4":
        raise ExportError(f"{method} with {qfmt} cannot be exported to {fmt}: these engines run NVFP4 only; "
                          "quantize with --fmt nvfp4")
    if method in WEIGHT_RESIDUAL:
        raise ExportError(f"{method} has a second weight tail (the outlier weights' rounding error, GEMM depth "
                          "K+2s) that no engine format carries (NVFP4_ARC holds one tail, a copy); quantize with "
                          "--method arc to export")
    if method not in ("w4a16", "w4a8", "rtn", "arc"):
        raise ExportError(f"method {method} needs an online transform (rotation, smoothing or an FP8 branch) "
                          "that these engine formats cannot express; export arc, rtn or w4a16 checkpoints")
    if method == "w4a8":
        raise ExportError("no engine format carries NVFP4 weights with FP8 activations (w4a8); "
                          "quantize with --method w4a16, rtn or arc")
    if fmt == "trtllm-arc" and method != "arc":
        raise ExportError(f"method {method} has no residual channels; NVFP4_ARC is for arc checkpoints: "
                          "export --format modelopt-nvfp4 or compressed-tensors instead")
    if fmt == "modelopt-nvfp4" and method == "w4a16":
        raise ExportError("ModelOpt NVFP4 in TensorRT-LLM quantizes activations (W4A4); a w4a16 checkpoint "
                          "exports to --format compressed-tensors (NVFP4 weights only)")
    for name, info in meta["layers"].items():
        if info["in_features"] % nvfp4.BLOCK:
            raise ExportError(f"{name}: in_features={info['in_features']} is not a multiple of 16, which "
                              f"the {fmt} format needs")
    warnings = []
    if method == "arc" and fmt != "trtllm-arc":
        warnings.append(f"{fmt} has no residual channels: the ARC model is written as plain NVFP4 in the "
                        "original column order; accuracy drops to RTN level (use trtllm-arc to keep ARC)")
    if method in ("arc", "rtn") and q["act_scale"] != "static":
        warnings.append(f"the engine uses one static input scale per layer (the calibration max); this "
                        f"checkpoint was evaluated with the {q['act_scale']} activation scale")
    if fmt == "trtllm-arc":
        wide = [n for n, i in meta["layers"].items() if i["in_features"] > TRT_MAX_K]
        if any(i["in_features"] > 32767 for i in meta["layers"].values()):
            raise ExportError("NVFP4_ARC stores the reorder index as int16: in_features above 32767 cannot be exported")
        if wide:
            warnings.append(f"{len(wide)} layers (e.g. {wide[0]}) have K > {TRT_MAX_K}, more than "
                            "TensorRT-LLM's ARC activation op accepted when this exporter was written")
    return warnings


def quant_configs(fmt: str, meta: dict, ignore: list[str]) -> tuple[dict | None, dict]:
    """-> (hf_quant_config.json or None, config.json quantization_config)."""
    w4a4 = meta["quant"]["method"] in ("rtn", "arc")
    if fmt == "compressed-tensors":
        args = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                "symmetric": True, "dynamic": False, "scale_dtype": "float8_e4m3fn"}
        group = {"targets": ["Linear"], "weights": args,
                 "input_activations": {**args, "dynamic": "local"} if w4a4 else None}
        return None, {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                      "quantization_status": "compressed", "config_groups": {"group_0": group},
                      "ignore": ignore, "producer": f"arcquant {__version__}"}
    algo = "NVFP4_ARC" if fmt == "trtllm-arc" else "NVFP4"
    quant = {"quant_algo": algo, "group_size": 16, "kv_cache_quant_algo": None, "exclude_modules": ignore}
    if fmt == "trtllm-arc":
        quant["arc"] = {"format_version": ARC_EXPORT_VERSION,
                        "reorder_index": "int16 (K,) per layer: the engine gathers X[:, reorder_index]",
                        "layout": "[K-s main | (outlier block i, residual block i) for i < s/16], blocks of 16",
                        "num_residual_channels": {n: i["s"] for n, i in meta["layers"].items()}}
    hf = {"producer": {"name": "arcquant", "version": __version__}, "quantization": quant}
    return hf, {"quant_method": "modelopt", **quant}
