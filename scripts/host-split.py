#!/usr/bin/env python
"""Where one call's host time goes: timers around a generated module's forward/backward and
each of its launch functions, for an inference forward, a training forward and a training
forward+backward (50 calls each, after 5 warm-up calls). A CUDA GPU is needed.

    python scripts/host-split.py nsa-d128 512
"""
import argparse
import collections
import time

import torch

from nsagen.ops import build
from nsagen.tune.workloads import random_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("seq_len", type=int)
    p.add_argument("--calls", type=int, default=50)
    a = p.parse_args()
    op = build(a.spec)
    mod, spec = op.module, op.spec
    spent: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()

    def timed(name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
                count[name] += 1
        return run

    for name in list(vars(mod)):
        if name.startswith("launch_") or name in ("forward", "backward"):
            setattr(mod, name, timed(name, getattr(mod, name)))
    x = random_inputs(spec, a.seq_len, 1, "cuda", torch.bfloat16)
    do = torch.randn(1, a.seq_len, spec.heads_q, spec.dim_v, dtype=torch.bfloat16,
                     device="cuda")
    leaves = [t.requires_grad_(True) for t in x.values()]

    def inference():
        with torch.no_grad():
            op(**x)

    def train_forward():
        op(**x)

    def train_step():
        torch.autograd.grad(op(**x), leaves, do)

    for label, fn in (("inference", inference), ("training forward", train_forward),
                      ("forward+backward", train_step)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        spent.clear()
        count.clear()
        t0 = time.perf_counter()
        for _ in range(a.calls):
            fn()
        host = (time.perf_counter() - t0) / a.calls
        torch.cuda.synchronize()
        print(f"{label}, T={a.seq_len}: host {1e3 * host:.3f} ms a call")
        for name in sorted(spent, key=spent.get, reverse=True):
            print(f"  {name:30s} {1e3 * spent[name] / a.calls:7.3f} ms  x{count[name] // a.calls}")


if __name__ == "__main__":
    main()
