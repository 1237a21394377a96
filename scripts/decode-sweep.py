#!/usr/bin/env python3
"""Time the whole decode step (append + attend, from a CUDA graph) for split counts and decode
kernel configs, one variant after another in one process, with the default repeated between
them so that drift shows.

For choosing the IR's split rule and the decode kernels' defaults on a GPU without a tuned
table; `nsagen tune` is the tool for tables (capped search, winners checked against the
reference). Each variant prints the step's graph time and its five longest kernels. Example:

    python scripts/decode-sweep.py nsa-d128 --batch 8 1 --cache 65536 --json sweep.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import nsagen
from nsagen.bench import decode_steps, time_steps
from nsagen.decode import DecodeCache

# (label, split overrides, config overrides); the default first
VARIANTS: list[tuple[str, dict | None, dict | None]] = (
    [("default", None, None), ("head-major cache", None, None)]
    + [(f"cmp={n}", {"cmp": n}, None) for n in (6, 8, 12, 14, 16, 20, 24, 32)]
    + [(f"win_keys={n}", {"win_keys": n}, None) for n in (128, 512)]
    + [(f"decode_cmp stages={n}", None, {"decode_cmp": {"num_stages": n}}) for n in (2, 4)]
    + [(f"cmp={n} with 2 stages", {"cmp": n}, {"decode_cmp": {"num_stages": 2}})
       for n in (16, 24)]     # half the shared memory a program: more programs an SM
    + [("decode_cmp warps=8", None, {"decode_cmp": {"num_warps": 8}}),
       ("decode_cmp BC=128, cmp_quantum=32", {"cmp_quantum": 32}, {"decode_cmp": {"BC": 128}})]
    + [(f"decode_select BNB={n}", None, {"decode_select": {"BNB": n}}) for n in (128, 256)]
    + [("decode_select RANK_MAX=0", None, {"decode_select": {"RANK_MAX": 0}})]
    + [(f"decode_select warps={n}", None, {"decode_select": {"num_warps": n}}) for n in (2, 8)]
    + [("decode_slc stages=3", None, {"decode_slc": {"num_stages": 3}}),
       ("decode_slc warps=8", None, {"decode_slc": {"num_warps": 8}}),
       ("decode_slc BK=64", None, {"decode_slc": {"BK": 64}}),
       # the merge in decode_slc's last programs: no decode_combine launch (the tuner, timing
       # kernels alone, cannot see what that saves)
       ("decode_slc MERGE=1", None, {"decode_slc": {"MERGE": 1}})])


def head_major(cache: DecodeCache) -> None:
    """Re-lay the cache's K/V buffers out head by head ([B, H, L, D] in memory, the same
    [B, L, H, D] shape): a KV head's rows are then one contiguous stream. The single-token step
    reads them through their strides; this measures whether the layout moves the step."""
    for name in ("k", "v", "k_cmp", "v_cmp", "k_win", "v_win"):
        t = getattr(cache, name, None)
        if t is not None:
            setattr(cache, name, t.transpose(1, 2).contiguous().transpose(1, 2))


def time_variant(op, batch: int, cache_len: int, splits: dict | None,
                 configs: dict | None, layout: str = "") -> dict:
    """One whole-step timing row: a cache of cache_len - steps random tokens, then `steps`
    decode calls a timed call (rewound after), as `nsagen bench --decode` times them.
    `layout` "head-major" re-lays the cache out (head_major)."""
    spec, dt, dev = op.spec, torch.bfloat16, "cuda"
    H, HQ, Dk, Dv = spec.heads_kv, spec.heads_q, spec.dim_qk, spec.dim_v
    torch.manual_seed(batch)
    n = decode_steps(cache_len)
    cache = DecodeCache(op, batch, cache_len, device=dev, dtype=dt, splits=splits,
                        configs=configs)
    if layout == "head-major":
        head_major(cache)
    cache.prefill(torch.randn(batch, cache_len - n, H, Dk, dtype=dt, device=dev),
                  torch.randn(batch, cache_len - n, H, Dv, dtype=dt, device=dev))
    k_t = torch.randn(batch, H, Dk, dtype=dt, device=dev)
    v_t = torch.randn(batch, H, Dv, dtype=dt, device=dev)
    q = torch.randn(batch, HQ, Dk, dtype=dt, device=dev)
    gates = torch.rand(batch, HQ, 3, dtype=dt, device=dev)
    row = {"B": batch, "T": cache_len, "splits": dict(cache.splits), "configs": configs}
    time_steps(row, "nsagen", lambda: cache.decode(q, k_t, v_t, gates), n, dev, True,
               rewind=cache.rewind)
    del cache
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--cache", type=int, default=65536, help="cache length (default 65536)")
    ap.add_argument("--budget", type=float, default=600.0, help="stop after this many seconds")
    ap.add_argument("--json", default="decode-sweep.json")
    ap.add_argument("--only", nargs="+", metavar="LABEL",
                    help="run only the variants whose labels start with one of these")
    args = ap.parse_args()
    variants = [v for v in VARIANTS if not args.only or v[0] == "default"
                or any(v[0].startswith(o) for o in args.only)]
    op = nsagen.build(nsagen.load_spec(args.spec))    # a shipped name or a YAML path
    t0, rows = time.time(), []
    for batch in args.batch:
        for i, (label, splits, configs) in enumerate(variants):
            if time.time() - t0 > args.budget:
                break
            runs = [(label, splits, configs)]
            if i and i % (2 if args.only else 6) == 0:
                runs.append(("default (again)", None, None))
            for name, s, c in runs:
                try:
                    layout = "head-major" if name.startswith("head-major") else ""
                    row = dict(time_variant(op, batch, args.cache, s, c, layout), label=name)
                except Exception as err:      # a variant the kernels refuse: say so, go on
                    print(f"B={batch} {name}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                    continue
                rows.append(row)
                top = " ".join(f"{k.replace('decode_', '')}={t:.1f}"
                               for k, t in list(row.get("kernels_us", {}).items())[:5])
                print(f"B={batch} {name:36s} graph {row.get('nsagen_graph_us', float('nan')):7.2f} "
                      f"us  cmp={row['splits']['cmp']} win_keys={row['splits']['win_keys']}  "
                      f"{top}", flush=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    print(f"done in {time.time() - t0:.0f} s; results in {args.json}")


if __name__ == "__main__":
    main()
