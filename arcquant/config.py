"""Quantization and calibration settings: frozen dataclasses validated on construction."""
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .arc import ORDERS
from .formats import FORMATS

METHODS = ("fp", "w4a16", "w4a8", "rtn", "arc", "hadamard", "smoothquant", "atom", "arc+hadamard", "gptq",
           "arc+gptq", "arc+wres", "arc+gptq+wres")
GPTQ = ("gptq", "arc+gptq", "arc+gptq+wres")         # GPTQ-rounded weights (arcquant/gptq.py)
ROTATED = ("hadamard", "arc+hadamard")
WITH_S = ("arc", "arc+hadamard", "atom", "arc+gptq", "arc+wres", "arc+gptq+wres")   # layers get s outlier channels
WEIGHT_RESIDUAL = ("arc+wres", "arc+gptq+wres")      # a second weight tail: the outlier weights' rounding error
ROTATE_BLOCKS = (0, 16, 32, 64, 128)
ACT_SCALES = ("dynamic", "static", "token")
CALIB_SOURCES = ("c4", "wiki-train")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class QuantConfig:
    """What to do to every quantized linear layer.

    method     fp (none) | w4a16 (weights only) | w4a8 (+ FP8 E4M3 per-token activations)
               | rtn (W4A4 round-to-nearest) | arc (W4A4 with augmented residual channels)
               | hadamard (rotation, then rtn) | smoothquant (smoothing, then rtn)
               | atom (top-s channels in FP8, the rest W4A4) | arc+hadamard (rotation, then arc)
               | gptq (rtn with GPTQ-rounded weights) | arc+gptq (arc with GPTQ-rounded weights)
               | arc+wres (arc whose s outlier channels also get their weights' rounding error
               as s more columns: GEMM depth K+2s; the bit budget counts both tails)
               | arc+gptq+wres (both: GPTQ-rounded weights, then the tail's rounding error)
    rotate     rotation block for hadamard methods: 0 = full width, or 16/32/64/128
               (None: the method's default, full for hadamard and 16 for arc+hadamard)
    alpha      SmoothQuant migration strength
    fmt        4-bit format of weights (and activations for rtn/arc)
    act_scale  activation tensor scale: dynamic (amax of the whole batch, the paper),
               static (amax seen in calibration), token (one scale per token)
    order      ARC channel order: sorted (the paper), blocks (keep 16-blocks, move the
               worst whole blocks to the residual tail), none (no reorder; residual of the
               top-s channels, weight tail stored separately)
    threshold  a channel is an outlier of a token when |x| > threshold * the token's max
    s_multiple s is rounded up to a multiple of this (a multiple of the format's block)
    wres_skip  arc+wres / arc+gptq+wres only: linear names (e.g. "down_proj") whose groups get
               plain arc (one tail, depth K+s) instead of the weight-residual tail
    """
    method: str = "arc"
    fmt: str = "nvfp4"
    act_scale: str = "token"
    order: str = "blocks"
    threshold: float = 2.0 ** -3
    s_multiple: int = 64
    residual: bool = True
    target_bits: float | None = 5.5
    rotate: int | None = None
    alpha: float = 0.5
    wres_skip: tuple = ()

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        if self.rotate is not None and self.method not in ROTATED:
            raise ValueError(f"rotate={self.rotate} applies to {' and '.join(ROTATED)}, not to method {self.method!r}")
        if self.rotate is not None and self.rotate not in ROTATE_BLOCKS:
            raise ValueError(f"rotate={self.rotate}; valid: {', '.join(map(str, ROTATE_BLOCKS))} (0 = full width)")
        if self.method == "atom" and not self.residual:
            raise ValueError("atom with s = 0 is rtn: atom needs outlier channels (residual=True)")
        if self.method in GPTQ and (self.fmt != "nvfp4" or self.order == "none"):
            raise ValueError(f"{self.method} rounds NVFP4 weights whose residual tail reuses the main part: it "
                             f"needs fmt nvfp4 and order blocks or sorted (got fmt {self.fmt!r}, order {self.order!r})")
        if self.method in WEIGHT_RESIDUAL and (self.order == "none" or not self.residual):
            raise ValueError(f"{self.method} adds the rounding error of the residual tail's weights: it needs a tail "
                             f"(residual=True) that reuses the main part (order blocks or sorted), got order "
                             f"{self.order!r}, residual={self.residual}")
        object.__setattr__(self, "wres_skip", tuple(self.wres_skip))       # JSON gives a list
        if self.wres_skip and self.method not in WEIGHT_RESIDUAL:
            raise ValueError(f"wres_skip={list(self.wres_skip)} applies to {' and '.join(WEIGHT_RESIDUAL)}, "
                             f"not to method {self.method!r}")
        if not all(isinstance(n, str) and n and "." not in n for n in self.wres_skip):
            raise ValueError(f"wres_skip={list(self.wres_skip)}: give linear names without dots, e.g. down_proj")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]; SmoothQuant uses 0.5")
        _choice("fmt", self.fmt, tuple(FORMATS))
        _choice("act_scale", self.act_scale, ACT_SCALES)
        _choice("order", self.order, ORDERS)
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]; the paper uses 0.125")
        block = FORMATS[self.fmt].block
        if self.s_multiple <= 0 or self.s_multiple % block:
            raise ValueError(f"s_multiple={self.s_multiple} must be a positive multiple of the "
                             f"{self.fmt} block size {block}")

        base = FORMATS[self.fmt].bits_per_element
        if self.target_bits is not None and not base < self.target_bits <= 2 * base:
            raise ValueError(f"target_bits={self.target_bits} must be in ({base}, {2 * base}] for "
                             f"{self.fmt} (s between 0 and K)")

    @classmethod
    def paper(cls, **overrides) -> "QuantConfig":
        """The published recipe: channels sorted by max, dynamic per-batch tensor scale, s by
        the threshold rule."""
        return cls(**{"method": "arc", "order": "sorted", "act_scale": "dynamic", "target_bits": None,
                      **overrides})

    def wres_for(self, names) -> bool:
        """Whether the group of linears `names` (leader first) gets the weight-residual tail."""
        return self.method in WEIGHT_RESIDUAL and not any(n.split(".")[-1] in self.wres_skip for n in names)

    @property
    def rotate_block(self) -> int | None:
        """The rotation block actually used (None: no rotation)."""
        if self.method not in ROTATED:
            return None
        return self.rotate if self.rotate is not None else (0 if self.method == "hadamard" else 16)

    def to_dict(self) -> dict:
        """JSON-ready (wres_skip as a list, left out when empty: files written before it existed
        compare equal)."""
        d = asdict(self)
        d["wres_skip"] = list(self.wres_skip)
        if not d["wres_skip"]:
            del d["wres_skip"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown quantization settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration text: `nsamples` windows of `seqlen` tokens drawn (seeded) from `source`
    (c4, wiki-train, or the path of a UTF-8 text file)."""
    source: str = "c4"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.source not in CALIB_SOURCES and not Path(self.source).is_file():
            raise ValueError(f"source={self.source!r} is neither one of {', '.join(CALIB_SOURCES)} "
                             "nor an existing text file")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError(f"nsamples={self.nsamples} and seqlen={self.seqlen} must be >= 1 and >= 2")
