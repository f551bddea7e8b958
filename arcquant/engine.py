"""A small greedy generation engine: static KV cache, explicit attention masks, CUDA graphs.

The same engine runs a BF16 model and a quantized one, so their speed is compared on equal
terms. The KV cache is transformers' StaticCache (BF16); the attention mask is passed as a
4-D boolean tensor built on the device from the position, so a decode step does no host
synchronisation and is captured once in a CUDA graph (graphs=True, CUDA only) and replayed
for every token. Prefill runs eagerly, or (prefill_graphs=True) from a CUDA graph captured once
per prompt shape (B, T), as a server bucketing prompt lengths would: that removes the host time
of a few hundred eager kernel launches, which a quantized model (several kernels per linear)
pays more than a BF16 one. A capture that fails falls back to eager, with the reason logged.
Both models get the same engine-level fusions (engine_fusion.py: the rotary with the cache
write, decode attention over the cache, RMSNorm, one kernel each; the residual adds into the
o_proj / down_proj products); fusions=False runs the eager
modules, None leaves them as set.
"""
import logging

import torch

log = logging.getLogger("arcquant")


def kv_bytes(config, batch: int, max_len: int, dtype) -> int:
    """Bytes of a static BF16 KV cache for batch x max_len tokens."""
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * max_len * kv * head * torch.tensor([], dtype=dtype).element_size()


def check_fits(config, batch: int, max_len: int, dtype, device) -> None:
    """Refuse a cache the GPU cannot hold, saying which batch would fit."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    need = kv_bytes(config, batch, max_len, dtype)
    if need > 0.9 * free:
        per = kv_bytes(config, 1, max_len, dtype)
        raise ValueError(f"a KV cache for batch {batch} x {max_len} tokens needs {need / 2**30:.2f} GiB but "
                         f"{free / 2**30:.2f} GiB are free; at {max_len} tokens at most batch "
                         f"{int(0.9 * free // per)} fits")


def set_fusions(model, enable: bool) -> None:
    """The engine-level fusions (engine_fusion.py) on or off for this model; logged on a change.
    enable=None: the model's modules are left as they are (e.g. fused by hand, one kind only)."""
    from .engine_fusion import fuse_engine
    if enable is None or getattr(model, "_arcquant_fusions", None) == enable:
        return
    c = fuse_engine(model, enable)
    model._arcquant_fusions = enable
    log.info("engine fusions %s: rotary + KV-cache write and decode attention in %d attention modules, "
             "RMSNorm kernel in %d norms, residual adds into o_proj / down_proj in %d decoder layers%s",
             "on" if enable else "off", c["attention"], c["norms"], c["layers"],
             f"; attention classes left eager: {c['other_attention']}" if c["other_attention"] else "")


class Engine:
    def __init__(self, model, batch: int, max_len: int, graphs: bool = True, compile: bool = False,
                 prefill_graphs: bool = False, fusions: bool | None = True):
        from transformers import StaticCache
        set_fusions(model, fusions)
        self.model, self.batch, self.max_len = model, batch, max_len
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        check_fits(model.config, batch, max_len, self.dtype, self.device)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.graphs = graphs and self.device.type == "cuda"
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.device)   # graph inputs
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph, self.logits = None, None
        self.prefill_graphs = prefill_graphs and self.device.type == "cuda"
        self._prefills = {}                                 # (B, T) -> (graph, ids, positions, logits)
        self.prefill_mode = "graph" if self.prefill_graphs else "eager"
        # compile=True (experimental, see docs/e2e.md): the decode step goes through torch.compile (inductor fuses norms, rotary,
        # residual adds; the arcquant kernels are custom ops, traced as single nodes), then is
        # captured in the CUDA graph like the eager one. Prefill stays eager.
        self._decode = torch.compile(self._forward, dynamic=False) if compile else self._forward

    def _mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1, q, max_len) True where key position <= query position."""
        keys = torch.arange(self.max_len, device=self.device)
        return (keys[None, :] <= positions[:, None]).expand(self.batch, 1, -1, -1)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        counts = [layer.cumulative_length for layer in getattr(self.cache, "layers", [])   # transformers >= 5.2x
                  if getattr(layer, "is_initialized", False) and hasattr(layer, "cumulative_length")]
        if counts:                                                     # tokens written: positions, device-side;
            torch._foreach_copy_(counts, [positions[0]] * len(counts))   # one launch for all layers
        out = self.model(input_ids=ids, attention_mask=self._mask(positions), past_key_values=self.cache,
                         cache_position=positions, position_ids=positions[None].expand(ids.shape[0], -1),
                         use_cache=True)
        return out.logits[:, -1]                                       # (B, V)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> next-token logits (B, V); the cache is reset first."""
        if ids.shape[0] != self.batch:
            raise ValueError(f"the engine was built for batch {self.batch}, got {ids.shape[0]} prompts")
        if ids.shape[1] >= self.max_len:
            raise ValueError(f"prompt of {ids.shape[1]} tokens does not fit max_len={self.max_len}")
        self.cache.reset()
        ids = ids.to(self.device)
        if self.prefill_graphs:
            entry = self._prefills.get(tuple(ids.shape)) or self._capture_prefill(ids)
            if entry is not None:
                graph, static_ids, _, logits = entry
                static_ids.copy_(ids)
                graph.replay()
                return logits
        return self._forward(ids, torch.arange(ids.shape[1], device=self.device))

    def _capture_prefill(self, ids: torch.Tensor):
        """Capture the prefill of prompts shaped like ids; None (and eager from now on) if it fails."""
        static_ids = ids.clone()
        positions = torch.arange(ids.shape[1], device=self.device)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                             # warm-up: allocations, lazy builds
                self._forward(static_ids, positions)
            torch.cuda.current_stream().wait_stream(side)
            self.cache.reset()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._forward(static_ids, positions)
        except RuntimeError as e:
            log.warning("prefill graph capture failed (%s); prefill runs eagerly", str(e).splitlines()[0][:200])
            self.prefill_graphs, self.prefill_mode = False, f"eager (capture failed: {str(e)[:120]})"
            torch.cuda.synchronize()
            self.cache.reset()
            return None
        self._prefills[tuple(ids.shape)] = (graph, static_ids, positions, logits)   # inputs kept alive
        return self._prefills[tuple(ids.shape)]

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        """One decode step: tok (B, 1) at position pos -> logits (B, V)."""
        self.tok.copy_(tok)
        self.pos.fill_(pos)
        if not self.graphs:
            return self._decode(self.tok, self.pos)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                                 # warm-up (allocations, autotune)
            for _ in range(2):
                self._decode(self.tok, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._decode(self.tok, self.pos)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy: ids (B, T) -> (B, new_tokens) token ids. Logits that hold NaN or Inf at any step
        are an error, raised once the tokens are made (a device-side flag, read once: no host sync
        per step). The kernel path does not check each layer's input as the reference path does
        (qlinear.FINITE: one more reduction per layer call); a NaN or Inf there reaches the logits
        through the residual stream."""
        if ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"{ids.shape[1]} prompt + {new_tokens} new tokens exceed max_len={self.max_len}")
        logits = self.prefill(ids)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        out = []
        for i in range(new_tokens):
            finite &= torch.isfinite(logits).all()
            tok = logits.argmax(-1, keepdim=True)                      # (B, 1)
            out.append(tok.clone())
            if i + 1 < new_tokens:
                logits = self.step(tok, ids.shape[1] + i)
        if not bool(finite):
            raise ValueError(f"NaN or Inf in the logits within the {new_tokens} generated steps: the model's "
                             "activations or weights hold NaN / Inf (4-bit formats cannot represent them); "
                             "check the input ids and the checkpoint's tensors")
        return torch.cat(out, 1)
