#!/usr/bin/env python3
"""Context parallelism on the GPUs of one host: check, then time (docs/distributed.md).

Run with one process per GPU:

    torchrun --nproc-per-node 2 scripts/cp-bench.py [--spec nsa-d128] [--check-len 32768]
        [--seq-len 131072 262144] [--json out.json]

1. Check: forward and backward of one sequence of --check-len tokens, split over the ranks,
   against the same op on one GPU (every rank runs that on its own GPU); relative errors of the
   output share and of every gradient share (bf16).
2. Time, for each --seq-len: forward+backward of one sequence on one GPU (every rank at once,
   each on its own GPU, so the GPUs stay as busy as in the split run), then split over the
   ranks (zig-zag shares, cp_group). Medians of --reps runs after a warm-up, each run ended by a
   barrier; the speedup is single / split. Peak memory per GPU and the bytes each rank gathers
   (k and v from the other ranks) are reported beside the times.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import nsagen
from nsagen.distributed import shard


def inputs(spec, T: int, dev, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(dtype).to(dev)

    HQ, H, Dk, Dv = spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
    return dict(q=rnd(1, T, HQ, Dk), k=rnd(1, T, H, Dk), v=rnd(1, T, H, Dv),
                gates=torch.rand(1, T, HQ, 3, generator=g).to(dtype).to(dev),
                do=rnd(1, T, HQ, Dv))


def step(op, x: dict, group=None):
    """Forward + backward; returns the output and the gradients of q, k, v, gates."""
    leaves = [x[n].detach().requires_grad_(True) for n in ("q", "k", "v", "gates")]
    o = op(*leaves, cp_group=group) if group is not None else op(*leaves)
    grads = torch.autograd.grad(o, leaves, x["do"])
    return o, grads


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int, group) -> float:
    fn()
    _sync()
    dist.barrier(group)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        dist.barrier(group)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _reset_peak(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev) -> int:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="nsa-d128")
    p.add_argument("--check-len", type=int, default=32768)
    p.add_argument("--seq-len", type=int, nargs="*", default=[131072, 262144])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")   # gloo: a CPU smoke run (interpreter)
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    group = dist.group.WORLD
    op = nsagen.build(a.spec)
    spec = op.spec
    out = dict(spec=spec.name, world=world,
               gpu=torch.cuda.get_device_name(dev) if cuda else "cpu",
               torch=torch.__version__, check={}, runs=[])

    x = inputs(spec, a.check_len, dev, seed=1)
    o1, g1 = step(op, x)
    xs = {n: shard(t, group) for n, t in x.items()}
    o2, g2 = step(op, xs, group)
    errs = {"o": rel(o2, shard(o1, group))}
    for n, want, got in zip(("q", "k", "v", "gates"), g1, g2):
        errs["d" + n] = rel(got, shard(want, group))
    out["check"] = dict(T=a.check_len, rel_err=errs)
    if rank == 0:
        print(f"check T={a.check_len}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()),
              flush=True)
    del x, xs, o1, g1, o2, g2

    for T in a.seq_len:
        x = inputs(spec, T, dev, seed=2)
        _reset_peak(dev)
        one = timed(functools.partial(step, op, x), a.reps, group)
        mem_one = _peak(dev)
        xs = {n: shard(t, group).contiguous() for n, t in x.items()}
        del x
        _reset_peak(dev)
        split = timed(functools.partial(step, op, xs, group), a.reps, group)
        mem_split = _peak(dev)
        kv_bytes = (xs["k"].numel() + xs["v"].numel()) * xs["k"].element_size()
        row = dict(T=T, one_gpu_ms=one, split_ms=split, speedup=one / split,
                   peak_GiB_one=mem_one / 2**30, peak_GiB_split=mem_split / 2**30,
                   gathered_GB_per_rank=kv_bytes * (world - 1) / 1e9,
                   reduce_scattered_GB_per_rank=kv_bytes * (world - 1) / 1e9)
        out["runs"].append(row)
        if rank == 0:
            print(f"T={T}: one GPU {one:.1f} ms, {world} GPUs {split:.1f} ms, speedup "
                  f"{one / split:.2f}x; peak {mem_one / 2**30:.1f} -> {mem_split / 2**30:.1f} GiB "
                  f"per GPU; gathered {row['gathered_GB_per_rank']:.2f} GB per rank", flush=True)
        del xs
    if rank == 0 and a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
