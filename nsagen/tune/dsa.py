"""Launch-config search for DSA specs: what `nsagen tune` runs on an `attention: dsa` spec.

The method is the NSA search's (nsagen.tune.search.sweep): each kernel's candidates come from
its definition (nsagen.configspace), rounds are timed per kernel by the profiler, and a winner
must beat the default by the margin and survive a confirming run. Per sequence-length bucket:
the forward kernels (indexer, top-k, sparse attention) on forward passes, then the attention's
backward on backward passes and the indexer loss's kernels on loss passes (forward and
backward). The winners of a bucket are checked against the float64 reference (the output, its
gradients and the loss, on the positions the kernels picked) before the table is saved.
"""
from __future__ import annotations

import logging
import time

import torch

from .. import reference, tables
from ..configspace import candidates
from ..launch import direct_launches, pack
from ..layout import build_layout
from ..ops import build
from .budget import Budget
from .search import sweep

log = logging.getLogger("nsagen")

FORWARD = ("dsa_indexer", "dsa_topk", "dsa_attention")
TRAINING = ("dsa_attention_bwd", "dsa_indexer_loss")


def dsa_inputs(spec, T: int, device, dtype, seed: int) -> dict:
    """Random inputs of one sequence of T tokens ([1, T, ...]); no v when the values are the
    keys' first columns (MLA's layout)."""
    g = torch.Generator(device=torch.device(device)).manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    mla = spec.dim_v <= spec.dim_qk
    return dict(q=r(1, T, spec.heads_q, spec.dim_qk), k=r(1, T, spec.heads_kv, spec.dim_qk),
                v=None if mla else r(1, T, spec.heads_kv, spec.dim_v),
                q_idx=r(1, T, spec.indexer_heads, spec.indexer_dim),
                k_idx=r(1, T, spec.indexer_dim), w_idx=r(1, T, spec.indexer_heads))


def passes(op, x: dict):
    """(forward, backward, loss) pass makers over x: each takes launch configs and returns a
    callable that runs the module's kernels of that phase (the backward and the loss start
    from one forward with the module's defaults, which they do not change)."""
    mod = op.module
    T = x["q"].shape[1]
    lay = build_layout(op.spec, (T,), x["q"].device)
    q, k, qi, ki, wi = (pack(x[n]) for n in ("q", "k", "q_idx", "k_idx", "w_idx"))
    v = None if x["v"] is None else pack(x["v"])
    with torch.no_grad(), direct_launches():
        o, idx, lse = mod.forward(q, k, v, qi, ki, wi, lay)
    do = torch.randn_like(o)

    def forward(cfg):
        def run():
            with torch.no_grad(), direct_launches():
                return mod.forward(q, k, v, qi, ki, wi, lay, configs=cfg)
        return run

    def backward(cfg):
        def run():
            with torch.no_grad(), direct_launches():
                return mod.backward(do, q, k, v, idx, o, lse, lay, configs=cfg)
        return run

    def loss(cfg):
        def run():
            with torch.no_grad(), direct_launches():
                per_token, saved = mod.indexer_loss(q, k, qi, ki, wi, idx, lse, lay, configs=cfg)
                return mod.indexer_loss_backward(torch.ones_like(per_token), q, k, qi, ki, wi,
                                                 idx, lse, saved, lay, configs=cfg)
        return run

    return forward, backward, loss


def check_dsa(op, configs: dict, T: int, device, dtype, tol: float) -> float:
    """Largest relative error, with `configs`, of the op's output and gradients (against the
    float64 reference attention on the positions the op picked) and of the indexer loss and
    its gradients; raises when one passes `tol` or a pick is out of place."""
    spec = op.spec
    x = dsa_inputs(spec, T, device, dtype, seed=T + 17)
    leaves = [n for n in ("q", "k", "v") if x[n] is not None]
    for n in leaves:
        x[n].requires_grad_(True)
    saved = op.configs
    op.configs = configs
    try:
        o, idx = op(**x, return_indices=True)
        do = torch.randn_like(o)
        got = torch.autograd.grad(o, [x[n] for n in leaves], do)
        xi = {n: x[n].detach().requires_grad_(n in ("q_idx", "k_idx", "w_idx"))
              for n in ("q", "k", "q_idx", "k_idx", "w_idx")}
        loss = op.indexer_loss(**xi)
        lgot = torch.autograd.grad(loss, [xi["q_idx"], xi["k_idx"], xi["w_idx"]])
    finally:
        op.configs = saved
    pos = torch.arange(T, device=idx.device)[:, None]
    picked = (idx[0] >= 0).sum(1)
    if not (picked == torch.clamp(pos[:, 0] + 1, max=spec.topk)).all() or \
            ((idx[0] > pos) & (idx[0] >= 0)).any():
        raise RuntimeError(f"tuned configs {configs} pick the wrong positions")
    xr = {n: x[n].detach().double().requires_grad_(True) for n in leaves}
    ref = reference.dsa_sparse_attention(spec, xr["q"], xr["k"], xr.get("v"), idx)
    want = torch.autograd.grad(ref, [xr[n] for n in leaves], do.double())
    ri = {n: t.detach().double().requires_grad_(n in ("q_idx", "k_idx", "w_idx"))
          for n, t in xi.items()}
    lref = reference.dsa_indexer_loss(**ri, spec=spec)
    lwant = torch.autograd.grad(lref, [ri["q_idx"], ri["k_idx"], ri["w_idx"]])
    errs = {"o": _rel(o, ref)}
    errs.update({f"d{n}": _rel(a, b) for n, a, b in zip(leaves, got, want)})
    errs["loss"] = abs(loss.item() - lref.item()) / max(1.0, abs(lref.item()))
    errs.update({f"dloss/d{n}": _rel(a, b)
                 for n, a, b in zip(("q_idx", "k_idx", "w_idx"), lgot, lwant)})
    bad = {n: e for n, e in errs.items() if not e < (tol if n == "o" else 4 * tol)}
    if bad:
        raise RuntimeError(f"tuned configs {configs} give relative errors "
                           + ", ".join(f"{n} {e:.3g}" for n, e in bad.items()))
    return max(errs.values())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tune_dsa(spec, seq_lens: list[int], kernels: list[str] | None = None, progress=print,
             timer=None, device: str = "cuda", dtype=torch.bfloat16, check_len: int = 2048,
             budget: float | None = None, out_dir=None, backward: bool = True):
    """Search the DSA kernels' configs per sequence-length bucket and save the table for this
    GPU. Returns (path, summary rows). `kernels` limits the search to those names; `timer(fn)`
    replaces the GPU timing (ms, or {kernel: ms}); `out_dir` writes the table under
    <out_dir>/<gpu>/ instead of the user cache."""
    op = build(spec)
    on_gpu = torch.device(device).type == "cuda" and timer is None
    meta = tables.device_meta()
    clock = Budget(budget, progress)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    defaults = {name: dict(cfg) for name, cfg in op.module.CONFIGS.items()}
    want = [k for k in FORWARD + (TRAINING if backward else ())
            if k in defaults and (kernels is None or k in kernels)]
    buckets, summary = {}, []
    saved = op.configs
    try:
        for T in seq_lens:
            if not want:
                break
            progress(f"nsagen tune: {op.module_name} T={T} -> bucket {tables.bucket(T)}")
            fwd_pass, bwd_pass, loss_pass = passes(op, dsa_inputs(spec, T, device, dtype, T))
            best = dict(defaults)
            for label, make, names in (
                    ("forward", fwd_pass, [k for k in want if k in FORWARD]),
                    ("backward", bwd_pass, [k for k in want if k == "dsa_attention_bwd"]),
                    ("loss", loss_pass, [k for k in want if k == "dsa_indexer_loss"])):
                if not names or clock.spent(label):
                    continue
                cands = {k: candidates(spec, k, defaults[k]) for k in names}
                report = sweep(make, names, cands, best, timer, clock, progress,
                               f"{label} T={T}", on_gpu)
                for k, r in report.items():
                    best[k] = r["best"]
                    summary.append(dict(T=T, B=1, kernel=k, default_ms=r["default_ms"],
                                        best_ms=r["best_ms"], config=r["best"]))
            chosen = {k: best[k] for k in want if best[k] != defaults[k]}
            if chosen:
                try:
                    check_dsa(op, dict(defaults, **chosen), min(T, check_len), device, dtype,
                              tol)
                    buckets[tables.bucket(T)] = chosen
                except Exception as err:   # never save what the reference rejects
                    msg = (f"nsagen tune: T={T}: the winners fail the reference check "
                           f"({str(err)[:300]}); this bucket stays untuned")
                    log.warning(msg)
                    progress(msg)
            if on_gpu:
                torch.cuda.empty_cache()
    finally:
        op.configs = saved
    path = tables.table_path_under(out_dir, op.module_name, meta) if out_dir else None
    path = tables.save(op.module_name, meta, buckets, path)
    op.use_tuned_tables(True)
    progress(f"nsagen tune: {op.module_name} done in {time.monotonic() - clock.start:.1f} s"
             + (" (budget reached: partly searched)" if clock.hit else ""))
    return path, summary
