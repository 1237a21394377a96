#!/usr/bin/env python3
"""Time the selected attention's two loop orders side by side on this GPU.

For each spec and each order (query-outer, block-outer) the IR's choice is overridden, the
module is built with its default configs, and `nsagen bench`'s forward (and, with --backward,
forward+backward) timing runs with a per-kernel breakdown. Prints one table and writes JSON:

    python scripts/loop-order.py nsa-g1 nsa-g16 --seq-len 65536 --out results.json
"""
from __future__ import annotations

import argparse
import json

import nsagen
from nsagen import bench, codegen
from nsagen.ir import passes

FORCED = {"query": {"query": 0.0, "block": 1.0}, "block": {"query": 1.0, "block": 0.0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--orders", nargs="+", default=["query", "block"])
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    model = passes.slc_loop_costs
    results = []
    for name in args.specs:
        spec = nsagen.load_spec(name)
        for order in args.orders:
            passes.slc_loop_costs = lambda s, t, c=FORCED[order]: c
            codegen._render_default.cache_clear()
            nsagen.build(spec).use_tuned_tables(False)
            doc = bench.bench_forward(spec, [args.seq_len], baselines=False, breakdown=True,
                                      backward=args.backward, progress=lambda m: None)
            row = doc["rows"][0]
            results.append(dict(spec=name, G=spec.group, order=order, ms=row["nsagen_ms"],
                                kernels_ms=row["kernels_ms"], uri=doc["uri"]))
            print(f"{name:10s} G={spec.group:<3d} {order:6s} {row['nsagen_ms']:9.3f} ms", flush=True)
            for k, ms in list(row["kernels_ms"].items())[:8]:
                print(f"      {ms:8.3f} ms  {k[:90]}", flush=True)
    passes.slc_loop_costs = model
    codegen._render_default.cache_clear()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
