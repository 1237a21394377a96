#!/usr/bin/env python3
"""Time every config of a kernel's space (no cap, no reference check) at one sequence length.

For exploring a new kernel's space on a GPU before choosing its default rule; `nsagen tune`
is the tool for tables (capped search, winners checked against the reference). Example:

    python scripts/kernel-sweep.py nsa-g1 select_blocks slc_attention_kb --seq-len 65536
"""
from __future__ import annotations

import argparse
import json

import torch

import nsagen
from nsagen.configspace import candidates
from nsagen.tune.search import sweep
from nsagen.tune.workloads import forward_pass, random_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("kernels", nargs="+")
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--out")
    args = ap.parse_args()
    op = nsagen.build(args.spec)
    base = dict(op.default_configs)
    x = random_inputs(op.spec, args.seq_len, 1, "cuda", torch.bfloat16)
    make = forward_pass(op, x)
    out = {}
    for kernel in args.kernels:
        cands = candidates(op.spec, kernel, base[kernel], limit=None)
        rows = []
        for cfg in cands:
            rep = sweep(make, [kernel], {kernel: [cfg]}, base, progress=lambda m: None)
            ms = rep[kernel]["default_ms"]
            rows.append((ms, cfg))
            print(f"{kernel} {ms:8.4f} ms {cfg}", flush=True)
        rows.sort(key=lambda r: r[0])
        print(f"== {kernel}: default {rows and [r for r in rows if r[1] == base[kernel]][0][0]:.4f}"
              f" ms, best {rows[0][0]:.4f} ms {rows[0][1]}", flush=True)
        out[kernel] = [dict(ms=ms, config=cfg) for ms, cfg in rows]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
