"""Compare two arcquant checkpoints tensor by tensor: prints how many tensors differ (exit 1 if any).

    python scripts/same_checkpoint.py A B
"""
import sys
from pathlib import Path

import torch

from arcquant.checkpoint import read_meta, read_tensors


def main(a, b) -> int:
    ma, mb = read_meta(Path(a)), read_meta(Path(b))
    ta, tb = read_tensors(Path(a), ma), read_tensors(Path(b), mb)
    names = set(ta) | set(tb)
    diff = sorted(k for k in names if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]))
    plans = ma["layers"] == mb["layers"]
    print(f"{len(names)} tensors, {len(diff)} differ {diff[:5]}; layer plans equal: {plans}")
    return 0 if not diff and plans else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
