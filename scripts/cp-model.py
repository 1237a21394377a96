#!/usr/bin/env python3
"""The cost model of all-gather-KV context parallelism for one NSA layer (docs/distributed.md).

For W ranks and a sequence of T tokens split zig-zag: the bytes each rank receives (the
forward's all-gather of k, v and the backward's reduce-scatter of their gradients), the time
that takes at a given link bandwidth, each rank's share of the layer's FLOPs and the time it
takes at a given rate, and what one layer keeps per rank between forward and backward, from
nsagen.costmodel. The rate defaults to what `nsa-d128` forward+backward reached at 64k on an
H200 (README: 154.0 ms); the link bandwidth is an assumption (a flag), not a measurement.

    python scripts/cp-model.py [--spec nsa-d128] [--seq-len 1048576] [--ranks 1 2 4 8]
"""
from __future__ import annotations

import argparse

import nsagen
from nsagen import costmodel as cm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="nsa-d128")
    p.add_argument("--seq-len", type=int, default=1 << 20)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--link-GBps", type=float, default=400.0,
                   help="all-gather / reduce-scatter bus bandwidth per rank (assumed)")
    p.add_argument("--rate-ref-ms", type=float, default=154.0,
                   help="measured forward+backward ms at --rate-ref-len (sets the FLOP rate)")
    p.add_argument("--rate-ref-len", type=int, default=65536)
    p.add_argument("--memory-GiB", type=float, default=120.0,
                   help="per-GPU memory for the layers' saved tensors (largest-T column)")
    p.add_argument("--layers", type=int, default=32)
    a = p.parse_args()
    spec = nsagen.load_spec(a.spec)
    flops = cm.fwd_flops(spec) + cm.bwd_flops(spec)
    rate = cm.evaluate(flops, T=a.rate_ref_len, B=1) / (a.rate_ref_ms * 1e-3)
    comm = cm.cp_bytes(spec)
    mem = cm.cp_memory_bytes(spec)
    T = a.seq_len
    print(f"{spec.name}, T = {T}, rate {rate / 1e12:.0f} TFLOP/s (from {a.rate_ref_ms} ms at "
          f"{a.rate_ref_len}), links {a.link_GBps:.0f} GB/s, {a.layers} layers in "
          f"{a.memory_GiB:.0f} GiB\n")
    print("| ranks | all-gather GB / rank | reduce-scatter GB / rank | comm ms | compute ms / rank "
          "| comm / compute | saved GiB / rank / layer | largest T |")
    print("|---|---|---|---|---|---|---|---|")
    for w in a.ranks:
        ag = cm.evaluate(comm["all_gather"], T=T, B=1, W=w)
        rs = cm.evaluate(comm["reduce_scatter"], T=T, B=1, W=w)
        comm_ms = (ag + rs) / (a.link_GBps * 1e9) * 1e3
        compute_ms = cm.evaluate(flops, T=T, B=1) / w / rate * 1e3
        saved = cm.evaluate(mem, T=T, B=1, W=w) / 2 ** 30
        lo, hi = 1024, 1 << 28          # largest multiple of 1024 whose layers fit
        budget = a.memory_GiB * 2 ** 30
        while hi - lo > 1024:
            mid = (lo + hi) // 2 // 1024 * 1024
            if a.layers * cm.evaluate(mem, T=mid, B=1, W=w) <= budget:
                lo = mid
            else:
                hi = mid
        ratio = comm_ms / compute_ms if w > 1 else 0.0
        print(f"| {w} | {ag / 1e9:.2f} | {rs / 1e9:.2f} | {comm_ms:.1f} | {compute_ms:.0f} | "
              f"{ratio:.3f} | {saved:.1f} | {lo // 1024}k |")


if __name__ == "__main__":
    main()
