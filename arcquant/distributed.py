"""Several GPUs (or CPU processes): data-parallel calibration through torch.distributed.

Launched by torchrun (`torchrun --nproc-per-node 2 -m arcquant.cli quantize ...`): every rank
pushes its share of the calibration samples through each layer, and the per-channel statistics
are all-reduced (max of |x|, sums of squared errors and squares, outlier and token counts, MoE
routed counts), so every rank plans exactly as one process seeing all samples would. Pass 2
(quantization) is split by layer (layer i on rank i mod world); rank 0 writes the checkpoint.
Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""
import os

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes; -> this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def shard(batches: torch.Tensor) -> torch.Tensor:
    """This rank's calibration samples (rows r, r + world, ...)."""
    return batches[rank()::world()] if world() > 1 else batches


def _all_reduce(t: torch.Tensor, op, device) -> torch.Tensor:
    buf = t.to(device)
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def reduce_stats(stats: dict, device) -> None:
    """All-reduce every ChannelStats in place (max / sums)."""
    if world() == 1:
        return
    for name in sorted(stats):
        st = stats[name]
        st.absmax = _all_reduce(st.absmax, dist.ReduceOp.MAX, device)
        st.sqerr = _all_reduce(st.sqerr, dist.ReduceOp.SUM, device)
        st.sumsq = _all_reduce(st.sumsq, dist.ReduceOp.SUM, device)
        if st.xtx is not None:
            st.xtx = _all_reduce(st.xtx, dist.ReduceOp.SUM, device)
        counts = _all_reduce(torch.tensor([st.outliers, st.tokens], dtype=torch.int64), dist.ReduceOp.SUM, device)
        st.outliers, st.tokens = int(counts[0]), int(counts[1])


def reduce_counts(t: torch.Tensor, device) -> torch.Tensor:
    return t if world() == 1 else _all_reduce(t, dist.ReduceOp.SUM, device)


def mine(i: int) -> bool:
    """Is layer i quantized by this rank (pass 2)?"""
    return i % world() == rank()


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world() > 1:
        dist.barrier()
