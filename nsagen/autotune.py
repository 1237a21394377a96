"""Launch-config search for the generated kernels on the GPU at hand.

The space per kernel comes from the spec (group size, head dims, block sizes) and is pruned
before anything compiles: tiles must satisfy the templates' static asserts and fit the device's
shared memory. Candidates are timed on realistic inputs (random data, importance-driven block
choices) one kernel at a time, the other kernels held at their current best.
"""
from __future__ import annotations

import itertools
import logging

import torch
import triton

from .ir.passes import smem_bytes as _smem_bytes
from .spec import Spec

log = logging.getLogger("nsagen")


def candidates(spec: Spec, kernel: str, default: dict, smem_limit: int = 227 * 1024) -> list[dict]:
    """Configs to try for one kernel (the default first), pruned by shared memory and constraints."""
    gp = triton.next_power_of_2(spec.group)
    dk, dv = triton.next_power_of_2(spec.dim_qk), triton.next_power_of_2(spec.dim_v)
    r2 = spec.slc_block // spec.cmp_stride
    out = [dict(default)]
    if kernel == "cmp_attention":
        for bt, bc, nw, ns in itertools.product([max(1, 64 // gp), max(1, 128 // gp)],
                                                [default["BC"], 2 * default["BC"]], [4, 8], [2, 3]):
            c = dict(default, BT=bt, BC=bc, num_warps=nw, num_stages=ns)
            if bc % r2 or bc // r2 < 1 or _smem_bytes(bt * gp, bc, dk, dv, ns) > smem_limit:
                continue
            out.append(c)
    elif kernel == "slc_attention":
        for bk, nw, ns in itertools.product({min(spec.slc_block, 64), min(spec.slc_block, 32)},
                                            [2, 4, 8], [1, 2, 3, 4]):
            if spec.slc_block % bk or _smem_bytes(default["GP"], bk, dk, dv, ns) > smem_limit:
                continue
            out.append(dict(default, BK=bk, num_warps=nw, num_stages=ns))
    elif kernel == "win_attention":
        for bt, bk, nw, ns in itertools.product([max(1, 64 // gp), max(1, 128 // gp)], [32, 64, 128],
                                                [4, 8], [2, 3]):
            if _smem_bytes(bt * gp, bk, dk, dv, ns) > smem_limit:
                continue
            out.append(dict(default, BT=bt, BK=bk, num_warps=nw, num_stages=ns))
    elif kernel == "select_blocks":
        for bt, nw in itertools.product([1, 2, 4, 8], [2, 4, 8]):
            out.append(dict(default, BT=bt, num_warps=nw))
    elif kernel == "mean_compress":
        for bi, nw in itertools.product([16, 32, 64], [2, 4]):
            out.append(dict(default, BI=bi, num_warps=nw))
    seen, uniq = set(), []
    for c in out:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


def search_forward(op, inputs: dict, kernels: list[str] | None = None, progress=print) -> dict:
    """Coordinate search: for each kernel, time the whole forward with each candidate config.

    `inputs` holds q, k, v, gates (and k_cmp, v_cmp for learned compression). Returns
    {kernel: {"best": config, "best_ms": float, "default_ms": float}}.
    """
    from triton.testing import do_bench

    mod = op.module
    best = {name: dict(cfg) for name, cfg in mod.CONFIGS.items()}
    report = {}
    for name in kernels or list(mod.CONFIGS):
        cands = candidates(op.spec, name, best[name])
        times = []
        for i, cfg in enumerate(cands):
            op.configs = dict(best, **{name: cfg})
            try:
                with torch.no_grad():
                    f = lambda: op(**inputs)  # noqa: E731
                    f()
                    torch.cuda.synchronize()
                    ms = do_bench(f, warmup=10, rep=40, return_mode="median")
            except Exception as err:  # a config the compiler rejects (e.g. out of resources)
                log.info("nsagen tune: %s %s failed: %s", name, cfg, str(err)[:100])
                ms = float("inf")
            times.append(ms)
            progress(f"  {name} [{i + 1}/{len(cands)}] {cfg} -> {ms:.3f} ms")
        j = min(range(len(cands)), key=times.__getitem__)
        best[name] = cands[j]
        report[name] = {"best": cands[j], "best_ms": times[j], "default_ms": times[0]}
        progress(f"{name}: best {cands[j]} {times[j]:.3f} ms (default {times[0]:.3f} ms)")
    op.configs = best
    return report
