"""Checks of tuned configs against the float64 reference before a table is saved: outputs,
gradients, and decode steps token by token; and compiling what those checks launch ahead."""
from __future__ import annotations

import logging
import time

import torch

from ..decode import DecodeCache
from ..ir.passes import decode_splits
from ..reference import nsa, nsa_decode_step
from ..spec import Spec
from ..target import current
from .compile import Compiler
from .workloads import DecodeSetup, backward_pass, forward_pass, random_inputs

log = logging.getLogger("nsagen")


def precompile_check(compiler: "Compiler | None", op, configs: dict, T: int, device, dtype,
                     backward: bool = True, progress=print) -> None:
    """Compile, in parallel, the kernels check_against_reference (and, with `backward`,
    check_backward_against_reference) at T will launch with `configs`; otherwise each compiles
    at its first launch, one after another. Not bound by the search budget: the checks run
    whatever it left."""
    if compiler is None:
        return
    t0 = time.monotonic()
    x = random_inputs(op.spec, T, 1, device, dtype)
    n = compiler.record([forward_pass(op, x)(configs), forward_pass(op, x, save=True)(configs)])
    compiler.wait()
    if backward:
        n += compiler.record([backward_pass(op, x, configs)(configs)])
        compiler.wait()
    if n:
        progress(f"  compiled {n} kernel variants for the reference check "
                 f"({time.monotonic() - t0:.1f} s)")


def precompile_decode_check(compiler: "Compiler | None", op, configs: dict, splits: dict,
                            max_len: int, device, dtype, progress=print) -> None:
    """Compile, in parallel, the decode kernels check_decode_against_reference at `max_len`
    will launch with `configs` and the split overrides `splits`."""
    if compiler is None:
        return
    t0 = time.monotonic()
    dev = torch.device(device)
    target = current(dev if dev.type == "cuda" else None)
    full = dict(decode_splits(op.spec, 2, max_len, target), **splits)
    n = compiler.record([DecodeSetup(op, 2, max_len, dev, dtype).make(full)(configs)])
    compiler.wait()
    if n:
        progress(f"  compiled {n} decode kernel variants for the reference check "
                 f"({time.monotonic() - t0:.1f} s)")


def _plan_call(op, x: dict, T: int):
    """The op on `x` as the plan of length T runs it: (output, the blocks it chose). Up to the
    short-length bound no blocks are asked for, so the short plan runs (it chooses every
    candidate block, which is what the reference chooses there: idx None)."""
    if 0 < T <= getattr(op.module, "SHORT_LEN", 0):
        return op(**x), None
    return op(**x, return_indices=True)


def check_against_reference(op, spec: Spec, configs: dict, T: int, device, dtype,
                            tol: float) -> float:
    """Relative error of the op with `configs` against the float64 reference on fresh inputs,
    on the blocks the op chose (a near-tie may flip in low precision), in the plan that calls
    of length T run."""
    x = random_inputs(spec, T, 1, device, dtype)
    saved = op.configs
    op.configs = configs
    try:
        with torch.no_grad():
            o, idx = _plan_call(op, x, T)
    finally:
        op.configs = saved
    xr = {k: v.double() for k, v in x.items()}
    ref = nsa(xr.pop("q"), xr.pop("k"), xr.pop("v"), xr.pop("gates"), spec,
              block_indices=idx if spec.has("slc") and idx is not None else None, **xr)
    err = ((o.double() - ref).norm() / ref.norm()).item()
    if not err < tol:
        raise RuntimeError(f"tuned configs {configs} give relative error {err:.3g} >= {tol}")
    return err


def check_backward_against_reference(op, spec: Spec, configs: dict, T: int, device, dtype,
                                     tol: float) -> float:
    """Largest relative error of the op's gradients with `configs` against float64 autograd
    through the reference, on the blocks the op chose, in the plan that calls of length T
    run."""
    x = {k: t.requires_grad_(True) for k, t in random_inputs(spec, T, 1, device, dtype).items()}
    saved = op.configs
    op.configs = configs
    try:
        o, idx = _plan_call(op, x, T)
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, list(x.values()), do, allow_unused=True)
    finally:
        op.configs = saved
    xr = {k: t.detach().double().requires_grad_(True) for k, t in x.items()}
    ref = nsa(xr["q"], xr["k"], xr["v"], xr["gates"], spec,
              block_indices=idx if spec.has("slc") and idx is not None else None,
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


def check_decode_against_reference(op, spec: Spec, configs: dict, splits: dict, max_len: int,
                                   device, dtype, tol: float, steps: int = 3) -> float:
    """Decode steps through a DecodeCache with `configs` and `splits` (ragged rows, several
    tokens each) equal the reference prefill row of each sequence on the blocks the kernels
    chose; the choice itself is well formed. Returns the largest relative error."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(max_len)
    H, HQ, Dk, Dv = spec.heads_kv, spec.heads_q, spec.dim_qk, spec.dim_v
    prompts = [max(1, max_len - steps - 37), max_len - steps]

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    B, T = len(prompts), max_len
    k, v = rnd(B, T, H, Dk), rnd(B, T, H, Dv)
    kw, vw = (rnd(B, T, H, Dk), rnd(B, T, H, Dv)) if (
        spec.kv_per_branch == "separate" and spec.has("win")) else (None, None)
    kc = vc = None
    extra = {}
    if spec.learned_compression:
        nc = max(1, spec.num_cmp(T))
        kc, vc = rnd(B, nc, H, Dk), rnd(B, nc, H, Dv)
        extra = dict(k_cmp=kc, v_cmp=vc)
    cache = DecodeCache(op, B, T, device=dev, dtype=dtype, splits=splits, configs=configs)
    P = max(prompts)
    cache.prefill(k[:, :P], v[:, :P], torch.tensor(prompts, dtype=torch.int32, device=dev),
                  k_win=None if kw is None else kw[:, :P], v_win=None if vw is None else vw[:, :P],
                  **extra)
    rows = torch.arange(B, device=dev)
    pos = list(prompts)
    worst = 0.0
    for _ in range(steps):
        t = torch.tensor(pos, device=dev)
        step_extra = {}
        if spec.learned_compression:
            i = torch.clamp((t + 1 - spec.cmp_block) // spec.cmp_stride, min=0)
            step_extra = dict(k_cmp_t=kc[rows, i], v_cmp_t=vc[rows, i])
        if kw is not None:
            step_extra.update(k_win_t=kw[rows, t], v_win_t=vw[rows, t])
        cache.append(k[rows, t], v[rows, t], **step_extra)
        q, gt = rnd(B, HQ, Dk), torch.rand(B, HQ, 3, generator=g, device=dev).to(dtype)
        o, idx = cache.step(q, gt, return_indices=True)
        if spec.has("slc"):
            n = torch.tensor([min(spec.slc_count, p // spec.slc_block + 1) for p in pos], device=dev)
            ok = ((idx >= 0).sum(-1) == n[:, None]).all() and (
                idx <= (t // spec.slc_block)[:, None, None]).all()
            if not ok:
                raise RuntimeError(f"tuned decode configs {configs} {splits} choose malformed "
                                   f"blocks {idx.tolist()}")
        d = torch.float64
        ref = nsa_decode_step(
            q.to(d), cache.k.to(d), cache.v.to(d), gt.to(d), spec,
            None if not (spec.has("cmp") or spec.has("slc")) else cache.k_cmp.to(d),
            None if not (spec.has("cmp") or spec.has("slc")) else cache.v_cmp.to(d),
            cache_seqlens=cache.lens, k_win=None if kw is None else cache.k_win.to(d),
            v_win=None if kw is None else cache.v_win.to(d),
            block_indices=idx if spec.has("slc") else None)
        err = ((o.double() - ref).norm() / ref.norm()).item()
        if not err < tol:
            raise RuntimeError(f"tuned decode configs {configs} {splits} give relative error "
                               f"{err:.3g} >= {tol}")
        worst = max(worst, err)
        pos = [p + 1 for p in pos]
    return worst


def verified_configs(op, spec, best, defaults, fwd, bwd, T, device, dtype, tol, progress, label):
    """The configs to save for one bucket: the forward winners if their outputs pass the
    reference check, the backward winners if their gradients do. A failing winner falls back
    to its default (nothing saved); a default that fails too is reported as a kernel problem."""
    def say(msg):
        log.warning(msg)
        progress(msg)

    out = {}
    fcfg = {k: best[k] for k in fwd}
    if fwd:
        try:
            check_against_reference(op, spec, dict(defaults, **fcfg), T, device, dtype, tol)
            out.update(fcfg)
        except Exception as err:   # never save what the reference rejects
            say(f"nsagen tune: T={label}: forward winners fail the reference check "
                f"({str(err)[:300]}); forward kernels stay untuned")
    bcfg = {k: best[k] for k in bwd}
    if bwd:
        base = dict(defaults, **out)
        try:
            check_backward_against_reference(op, spec, dict(base, **bcfg), T, device, dtype,
                                             2 * tol)
            out.update(bcfg)
        except Exception as err:
            say(f"nsagen tune: T={label}: backward winners fail the reference check "
                f"({str(err)[:300]}); backward kernels stay untuned")
            if any(bcfg[k] != defaults[k] for k in bcfg):
                try:
                    check_backward_against_reference(op, spec, base, T, device, dtype, 2 * tol)
                except Exception as err2:
                    say(f"nsagen tune: T={label}: the default backward configs fail it too "
                        f"({str(err2)[:200]}): a kernel problem, not a tuning one")
    return out
