"""Number formats as pure torch functions: the oracle for every kernel.

Each 4-bit block format module offers quantize(x, global_scale) -> (codes, scales),
dequantize(codes, scales, global_scale), fake_quantize, pack and unpack. `FORMATS`
describes them for code that is generic over the format (ARC, the quantized linear).
"""
from dataclasses import dataclass
from types import ModuleType

import torch

from . import fp8, int4, mxfp4, nvfp4


@dataclass(frozen=True)
class BlockFormat:
    name: str
    module: ModuleType
    block: int               # elements per scale, along K
    scale_bits: int          # bits of one block scale as stored
    has_global_scale: bool   # NVFP4's float32 tensor scale

    @property
    def bits_per_element(self) -> float:
        return 4 + self.scale_bits / self.block

    def global_scale(self, amax: torch.Tensor) -> torch.Tensor:
        if self.has_global_scale:
            return nvfp4.global_scale_from_amax(amax)
        return torch.ones_like(amax, dtype=torch.float32)

    def quantize(self, x, gs):
        return self.module.quantize(x, gs)

    def dequantize(self, codes, scales, gs):
        return self.module.dequantize(codes, scales, gs)


FORMATS = {
    "nvfp4": BlockFormat("nvfp4", nvfp4, nvfp4.BLOCK, 8, True),
    "mxfp4": BlockFormat("mxfp4", mxfp4, mxfp4.BLOCK, 8, False),
    "int4": BlockFormat("int4", int4, int4.BLOCK, 32, False),
}


def get_format(name: str) -> BlockFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}")
    return FORMATS[name]


__all__ = ["BlockFormat", "FORMATS", "get_format", "fp8", "int4", "mxfp4", "nvfp4"]
