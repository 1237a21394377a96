"""Launch-config search for the generated kernels (forward and backward) on the GPU at hand.

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
    elif kernel == "gate_delta":
        for br, nw in itertools.product([8, 16, 32, 64], [2, 4, 8]):
            out.append(dict(default, BR=br, num_warps=nw))
    elif kernel == "cmp_attention_bwd":
        for bt, bc, nw in itertools.product(_rows(gp, 64, 128), [32, 64, 128], [4, 8]):
            if _smem_bytes(bt * gp, bc, dk, dv, 2) <= smem_limit:
                out.append(dict(default, BT=bt, BC=bc, num_warps=nw))
    elif kernel == "slc_attention_bwd":
        gps = default["GP"]
        for bt, it, nw in itertools.product(_rows(gps, 32, 64, 128), [16, 64], [4, 8]):
            if _smem_bytes(bt * gps, spec.slc_block, dk, dv, 2) <= smem_limit:
                out.append(dict(default, BT_BWD=bt, CHUNK_ITERS=it, num_warps=nw))
    elif kernel == "win_attention_bwd":
        for bt, bk, nw in itertools.product(_rows(gp, 64, 128), [32, 64, 128], [4, 8]):
            if _smem_bytes(bt * gp, bk, dk, dv, 2) <= smem_limit:
                out.append(dict(default, BT=bt, BK=bk, num_warps=nw))
    seen, uniq = set(), []
    for c in out:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


def _rows(gp: int, *rows: int) -> list[int]:
    """Tokens per tile giving each of `rows` head rows (at least one token)."""
    return sorted({max(1, r // gp) for r in rows})


def _do_bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def search(op, inputs: dict, kernels: list[str], backward: bool = False, progress=print,
           timer=None) -> dict:
    """Coordinate search: for each kernel, time the whole forward (with `backward`, forward and
    backward) with each candidate config, the other kernels at their best so far.

    `inputs` holds q, k, v, gates (and k_cmp, v_cmp / k_win, v_win when the spec needs them).
    Returns {kernel: {"best": config, "best_ms": float, "default_ms": float}}.
    """
    timer = timer or _do_bench
    best = {name: dict(cfg) for name, cfg in op.module.CONFIGS.items()}
    best.update(op.configs)
    run = _fwd_bwd(op, inputs) if backward else _fwd(op, inputs)
    report = {}
    for name in kernels:
        cands = candidates(op.spec, name, best[name])
        times = []
        for i, cfg in enumerate(cands):
            op.configs = dict(best, **{name: cfg})
            try:
                run()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                ms = timer(run)
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


def _fwd(op, x: dict):
    def run():
        with torch.no_grad():
            return op(**x)
    return run


def _fwd_bwd(op, x: dict):
    x = {k: t.detach().requires_grad_(t.is_floating_point()) for k, t in x.items()}
    leaves = [t for t in x.values() if t.requires_grad]
    do = torch.randn_like(op(**x))

    def run():
        return torch.autograd.grad(op(**x), leaves, do)
    return run


def kernel_names(op) -> tuple[list[str], list[str]]:
    """The module's forward and backward kernels, in launch order."""
    from .ir import lower

    plan = lower(op.spec)
    return [k.name for k in plan.kernels], [k.name for k in plan.backward]


def _inputs(spec: Spec, T: int, batch: int, device, dtype) -> dict:
    """Realistic inputs: random data (never zeros); block choices then follow real importance."""
    g = torch.Generator(device="cpu").manual_seed(T)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    x = dict(q=rnd(batch, T, spec.heads_q, spec.dim_qk), k=rnd(batch, T, spec.heads_kv, spec.dim_qk),
             v=rnd(batch, T, spec.heads_kv, spec.dim_v),
             gates=torch.rand(batch, T, spec.heads_q, 3, generator=g).to(dtype).to(device))
    if spec.learned_compression:
        nc = spec.num_cmp(T)
        x.update(k_cmp=rnd(batch, nc, spec.heads_kv, spec.dim_qk),
                 v_cmp=rnd(batch, nc, spec.heads_kv, spec.dim_v))
    if spec.kv_per_branch == "separate" and spec.has("win"):
        x.update(k_win=rnd(batch, T, spec.heads_kv, spec.dim_qk),
                 v_win=rnd(batch, T, spec.heads_kv, spec.dim_v))
    return x


def check_against_reference(op, spec: Spec, configs: dict, T: int, device, dtype,
                            tol: float) -> float:
    """Relative error of the op with `configs` against the float64 reference on fresh inputs,
    on the blocks the op chose (a near-tie may flip in low precision)."""
    from .reference import nsa

    x = _inputs(spec, T, 1, device, dtype)
    saved = op.configs
    op.configs = configs
    try:
        with torch.no_grad():
            o, idx = op(**x, return_indices=True)
    finally:
        op.configs = saved
    xr = {k: v.double() for k, v in x.items()}
    ref = nsa(xr.pop("q"), xr.pop("k"), xr.pop("v"), xr.pop("gates"), spec,
              block_indices=idx if spec.has("slc") else None, **xr)
    err = ((o.double() - ref).norm() / ref.norm()).item()
    if not err < tol:
        raise RuntimeError(f"tuned configs {configs} give relative error {err:.3g} >= {tol}")
    return err


def check_backward_against_reference(op, spec: Spec, configs: dict, T: int, device, dtype,
                                     tol: float) -> float:
    """Largest relative error of the op's gradients with `configs` against float64 autograd
    through the reference, on the blocks the op chose."""
    from .reference import nsa

    x = {k: t.requires_grad_(True) for k, t in _inputs(spec, T, 1, device, dtype).items()}
    saved = op.configs
    op.configs = configs
    try:
        o, idx = op(**x, return_indices=True)
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, list(x.values()), do, allow_unused=True)
    finally:
        op.configs = saved
    xr = {k: t.detach().double().requires_grad_(True) for k, t in x.items()}
    ref = nsa(xr["q"], xr["k"], xr["v"], xr["gates"], spec,
              block_indices=idx if spec.has("slc") else None,
              **{k: t for k, t in xr.items() if k not in ("q", "k", "v", "gates")})
    want = torch.autograd.grad(ref, list(xr.values()), do.double(), allow_unused=True)
    err = 0.0
    for name, g, w in zip(x, grads, want):
        if w is not None and w.abs().max() > 0:
            if g is None:
                raise RuntimeError(f"no gradient for {name}")
            e = ((g.double() - w).norm() / w.norm()).item()
            if not e < tol:
                raise RuntimeError(f"tuned configs {configs} give d{name} relative error "
                                   f"{e:.3g} >= {tol}")
            err = max(err, e)
    return err


def tune(spec: Spec, seq_lens: list[int], batch: int = 1, kernels: list[str] | None = None,
         progress=print, timer=None, device: str = "cuda", dtype=torch.bfloat16,
         check_len: int = 2048):
    """Search every kernel's config per shape bucket (forward kernels on forward timings, backward
    kernels on forward+backward timings), check the winners' outputs and gradients against the
    reference, and save the table for this GPU. Returns (path, summary rows)."""
    from . import tables
    from .ops import build

    op = build(spec)
    meta = tables.device_meta()
    buckets: dict[str, dict] = {}
    summary = []
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    saved = op.configs
    try:
        for T in seq_lens:
            progress(f"nsagen tune: {op.module_name} T={T} B={batch}")
            x = _inputs(spec, T, batch, device, dtype)
            op.configs = {}
            fwd, bwd = kernel_names(op)
            if kernels is not None:
                fwd, bwd = [k for k in fwd if k in kernels], [k for k in bwd if k in kernels]
            report = search(op, x, fwd, progress=progress, timer=timer)
            if bwd:
                report.update(search(op, x, bwd, backward=True, progress=progress, timer=timer))
            best = {k: r["best"] for k, r in report.items()}
            check_against_reference(op, spec, best, min(T, check_len), device, dtype, tol)
            if bwd:
                check_backward_against_reference(op, spec, best, min(T, check_len), device,
                                                 dtype, 2 * tol)
            buckets[tables.bucket(T)] = best
            for k, r in report.items():
                summary.append(dict(T=T, kernel=k, default_ms=r["default_ms"],
                                    best_ms=r["best_ms"], config=r["best"]))
    finally:
        op.configs = saved
    path = tables.save(op.module_name, meta, buckets)
    op._tables_loaded = False  # pick the new table up on the next call
    return path, summary
