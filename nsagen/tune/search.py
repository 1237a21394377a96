"""Launch-config search for the generated kernels (forward, backward, decode) on the GPU at hand.

The candidates per kernel come from nsagen.configspace (pruned before anything compiles, nearest
the IR's default first, capped). Every candidate of a phase is compiled up front on worker
threads (nsagen.tune.compile; Triton releases the GIL while it compiles); then the phase runs in
rounds, round i launching every kernel with its i-th candidate, and the torch profiler gives each
kernel's own GPU time, so one pass times one candidate of every kernel at once. A candidate
replaces the default only when it is faster by `MARGIN` and a confirming run of both agrees, so
tuned is never slower than untuned by more than the noise. Decode steps are timed per kernel
the same way; split counts by whole steps replayed from a CUDA graph. Winners are checked
against the reference (nsagen.tune.verify) before the table is saved.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from .. import occupancy, tables
from ..configspace import candidates, decode_candidates, split_candidates
from ..ir import lower
from ..ir.passes import decode_splits, lower_decode
from ..launch import decode_pdl
from ..ops import build
from ..spec import Spec
from ..target import current
from .budget import Budget, bar
from .compile import Compiler
from .timing import graph_time, kernel_times
from .verify import (check_decode_against_reference, precompile_check, precompile_decode_check,
                     verified_configs)
from .workloads import DecodeSetup, backward_pass, forward_pass, random_inputs

log = logging.getLogger("nsagen")

MARGIN = 0.03          # a candidate must beat the default by 3% to replace it
# (decode kernel, 0/1 parameter) that moves work between launches (decode_slc's MERGE leaves
# decode_combine out): kernels timed alone cannot see what that saves, so whole steps decide
STEP_KNOBS = (("decode_slc", "MERGE"),)


def _measure(timer, run, kernels: list[str], iters: int) -> dict[str, float]:
    """Per-kernel ms of one round: the profiler on a GPU, else `timer` (a float applies to
    every kernel: the tests' stub)."""
    if timer is None:
        return kernel_times(run, kernels, iters)
    t = timer(run)
    return dict(t) if isinstance(t, dict) else {k: float(t) for k in kernels}


def sweep(make_run, kernels: list[str], cands: dict[str, list[dict]], base: dict, timer=None,
          budget: Budget | None = None, progress=print, label: str = "",
          on_gpu: bool = True) -> dict:
    """Time every kernel's candidates in rounds: round i runs each kernel with its i-th
    candidate (kernels with fewer run their default). `make_run(configs)` returns the pass.
    A kernel's best replaces its default only if faster by MARGIN and a confirming round of
    all defaults against all winners agrees. Returns {kernel: {best, best_ms, default_ms,
    tried}}."""
    budget = budget or Budget(None, progress)
    kernels = [k for k in kernels if cands.get(k)]
    times = {k: [math.inf] * len(cands[k]) for k in kernels}
    n = max((len(cands[k]) for k in kernels), default=0)
    iters = 3
    tried = 0
    t0 = time.monotonic()
    for i in range(n):
        if i and budget.spent(label):
            break
        cfg = dict(base)
        for k in kernels:
            cfg[k] = cands[k][i] if i < len(cands[k]) else cands[k][0]
        run = make_run(cfg)
        try:
            w = time.perf_counter()
            run()
            if on_gpu:
                torch.cuda.synchronize()
            if i == 0 and on_gpu:   # enough calls per round for ~50 ms of GPU time, 2..10
                iters = max(2, min(10, math.ceil(0.05 / max(1e-6, time.perf_counter() - w))))
            got = _measure(timer, run, kernels, iters)
        except Exception as err:  # a config the compiler or launcher rejects
            log.info("nsagen tune: %s round %d failed: %s", label, i, str(err)[:160])
            got = {}
            if on_gpu:
                torch.cuda.synchronize()
        for k in kernels:
            if i < len(cands[k]):
                times[k][i] = got.get(k, math.inf)
        tried = i + 1
        progress(f"  {label} {bar(i + 1, n)} {time.monotonic() - t0:.1f} s")
    report = {}
    winners = {}
    for k in kernels:
        j = min(range(len(times[k])), key=times[k].__getitem__)
        if j and times[k][j] < times[k][0] * (1 - MARGIN):
            winners[k] = j
        report[k] = dict(best=cands[k][0], best_ms=times[k][0], default_ms=times[k][0],
                         tried=min(tried, len(cands[k])))
    if winners and not budget.spent(label + " (confirmation)"):
        dflt = dict(base, **{k: cands[k][0] for k in kernels})
        best = dict(dflt, **{k: cands[k][j] for k, j in winners.items()})
        try:
            d = _measure(timer, make_run(dflt), kernels, iters)
            b = _measure(timer, make_run(best), kernels, iters)
        except Exception as err:
            log.info("nsagen tune: %s confirmation failed: %s", label, str(err)[:160])
            d, b = {}, {}
        for k, j in winners.items():
            if b.get(k, math.inf) <= d.get(k, -math.inf):
                report[k].update(best=cands[k][j], best_ms=times[k][j])
            else:
                progress(f"  {label} {k}: candidate {cands[k][j]} not confirmed "
                         f"({b.get(k, math.inf):.4f} vs {d.get(k, math.nan):.4f} ms); default kept")
    elif winners:
        for k, j in winners.items():   # no time to confirm: the sweep's margin decides
            report[k].update(best=cands[k][j], best_ms=times[k][j])
    for k in kernels:
        r = report[k]
        progress(f"  {label} {k}: {'best ' + str(r['best']) if r['best'] != cands[k][0] else 'default kept'}"
                 f" {r['best_ms']:.4f} ms (default {r['default_ms']:.4f} ms, {r['tried']} tried)")
    return report


def kernel_names(op, seq_len: int | None = None) -> tuple[list[str], list[str]]:
    """The module's forward and backward kernels, in launch order, as a call of `seq_len` tokens
    launches them (the short-length plan's below its bound; default: the full plan)."""
    plan = lower(op.spec, op.target)
    short = plan.short
    if short is not None and seq_len is not None and seq_len <= short.max_len:
        return (list(dict.fromkeys(s.kernel for s in short.forward)),
                list(dict.fromkeys(s.kernel for s in short.backward)))
    return [k.name for k in plan.kernels], [k.name for k in plan.backward]


def decode_kernel_names(op) -> list[str]:
    """The module's decode kernels (launch order where the IR gives it), as the generated module
    has them: none when it has no decode step."""
    have = dict(getattr(op.module, "DECODE_CONFIGS", {}) or {})
    if not have or not hasattr(op.module, "decode_step"):
        return []
    try:
        order = [k.name for k in lower_decode(op.spec, op.target).kernels]
    except Exception:  # the IR and the module disagree: the module's own list
        order = []
    return [k for k in order if k in have] + [k for k in have if k not in order]


def tune(spec: Spec, seq_lens: list[int], batch: int = 1, kernels: list[str] | None = None,
         progress=print, timer=None, device: str = "cuda", dtype=torch.bfloat16,
         check_len: int = 2048, decode_batches=(1, 8, 64), decode_len: int = 65536,
         budget: float | None = None, out_dir=None, backward: bool = True,
         check_decode_len: int = 4096):
    """Search every kernel's config and save the table for this GPU. Returns (path, summary rows).

    Per sequence length (one bucket each): the forward kernels on forward timings, then the
    backward kernels on the backward's; per decode batch at a `decode_len` cache: the decode
    kernels, then the split counts on whole steps. Each bucket's winners are checked against
    the reference (outputs, gradients, decode steps equal to prefill rows) before saving.
    `kernels` limits the search to those names; `budget` (seconds) stops it gracefully;
    `timer(fn)` replaces the GPU timing (ms, or {kernel: ms}); `out_dir` writes the table under
    <out_dir>/<gpu>/ instead of the user cache.
    """
    op = build(spec)
    on_gpu = torch.device(device).type == "cuda" and timer is None
    meta = tables.device_meta()
    clock = Budget(budget, progress)
    compiler = Compiler() if torch.device(device).type == "cuda" else None
    if compiler is not None:
        clock.on_spent = compiler.cancel
    buckets: dict[str, dict] = {}
    summary = []
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    defaults = {name: dict(cfg) for name, cfg in op.module.CONFIGS.items()}
    dec_all = decode_kernel_names(op)

    def wanted(names):
        return [k for k in names if kernels is None or k in kernels]

    dec = wanted(dec_all)

    def precompile_runs(runs) -> None:
        """Compile, in parallel, the kernel variants a list of passes would launch."""
        if compiler is None or not runs or clock.spent():
            return
        t0 = time.monotonic()
        m = compiler.record(runs)
        compiler.wait(clock)
        progress(f"  compiled {m} kernel variants on {compiler.workers} threads "
                 f"({time.monotonic() - t0:.1f} s)")

    def precompile(make_run, base, names, cands) -> None:
        n = max((len(cands[k]) for k in names), default=0)
        precompile_runs([make_run(dict(base, **{k: cands[k][min(i, len(cands[k]) - 1)]
                                                for k in names})) for i in range(n)])

    def rows_of(report, T, B=None):
        for k, r in report.items():
            summary.append(dict(T=T, B=B, kernel=k, default_ms=r["default_ms"],
                                best_ms=r["best_ms"], config=r["best"]))

    saved = op.configs
    try:
        for T in seq_lens:
            fwd_all, bwd_all = kernel_names(op, T)
            fwd, bwd = wanted(fwd_all), wanted(bwd_all) if backward else []
            if not (fwd or bwd):
                continue
            progress(f"nsagen tune: {op.module_name} T={T} B={batch} -> bucket {tables.bucket(T)}")
            x = random_inputs(spec, T, batch, device, dtype)
            best = dict(defaults)
            if fwd:
                make = forward_pass(op, x)
                cands = {k: candidates(spec, k, defaults[k]) for k in fwd}
                precompile(make, best, fwd, cands)
                report = sweep(make, fwd, cands, best, timer, clock, progress,
                               f"forward T={T}", on_gpu) if not clock.spent("forward") else {}
                best.update({k: r["best"] for k, r in report.items()})
                rows_of(report, T)
            if bwd:
                make = backward_pass(op, x, best)
                cands = {k: candidates(spec, k, defaults[k]) for k in bwd}
                precompile(make, best, bwd, cands)
                report = sweep(make, bwd, cands, best, timer, clock, progress,
                               f"backward T={T}", on_gpu) if not clock.spent("backward") else {}
                best.update({k: r["best"] for k, r in report.items()})
                rows_of(report, T)
            del x
            precompile_check(compiler, op, best, min(T, check_len), device, dtype, bool(bwd),
                             progress)
            chosen = verified_configs(op, spec, best, defaults, fwd, bwd, min(T, check_len), device,
                              dtype, tol, progress, T)
            if chosen:
                buckets[tables.bucket(T)] = chosen
            if on_gpu:
                torch.cuda.empty_cache()
        for B in decode_batches if dec else ():
            key = tables.decode_bucket(B, decode_len)
            progress(f"nsagen tune: {op.module_name} decode B={B} cache={decode_len} -> {key}")
            try:
                entry = _tune_decode(op, spec, B, decode_len, dec, timer, clock, progress,
                                     device, dtype, on_gpu, precompile, precompile_runs, summary)
                configs = {k: v for k, v in entry.items() if k != tables.DECODE_SPLITS}
                check_len_d = min(decode_len, check_decode_len)
                precompile_decode_check(compiler, op, configs, entry[tables.DECODE_SPLITS],
                                        check_len_d, device, dtype, progress)
                check_decode_against_reference(op, spec, configs, entry[tables.DECODE_SPLITS],
                                               check_len_d, device, dtype, 2 * tol)
            except Exception as err:   # never save what failed or the reference rejects
                msg = f"nsagen tune: decode B={B}: {str(err)[:300]}; {key} stays untuned"
                log.warning(msg)
                progress(msg)
                continue
            if len(entry) > 1 or entry[tables.DECODE_SPLITS]:   # something was searched
                buckets[key] = entry
            if on_gpu:
                torch.cuda.empty_cache()
    finally:
        op.configs = saved
        if compiler is not None:
            compiler.close()
    path = tables.table_path_under(out_dir, op.module_name, meta) if out_dir else None
    path = tables.save(op.module_name, meta, buckets, path)
    op.use_tuned_tables(True)  # pick the new table up on the next call
    progress(f"nsagen tune: {op.module_name} done in {time.monotonic() - clock.start:.1f} s"
             + (" (budget reached: partly searched)" if clock.hit else ""))
    return path, summary


def _tune_decode(op, spec, B, L, names, timer, clock, progress, device, dtype, on_gpu,
                 precompile, precompile_runs, summary) -> dict:
    """Decode kernels' configs (per-kernel times of eager steps, kernels one after another),
    then split counts (whole steps replayed from a CUDA graph) for one batch and cache
    capacity. Returns the table entry: every searched kernel's config and the split counts
    that differ from the IR's."""
    defaults = {k: dict(v) for k, v in op.module.DECODE_CONFIGS.items()}
    dev = torch.device(device)
    setup = DecodeSetup(op, B, L, device, dtype)
    if dev.type == "cuda":
        target = current(dev)
        base_splits = decode_splits(spec, B, L, target)
        resident = occupancy.decode_residency(setup.make(base_splits)(defaults), target)
        base_splits = decode_splits(spec, B, L, target, resident)
    else:
        base_splits = decode_splits(spec, B, L)
    cands = {k: decode_candidates(spec, k, defaults[k]) for k in names}
    make = setup.make(base_splits)
    # kernels alone, one after another: with dependent launches a kernel's profiled time
    # counts its wait for the one before; the split counts below are timed on whole steps as
    # they run
    with decode_pdl(op.module, False):
        precompile(make, defaults, names, cands)
        report = sweep(make, names, cands, defaults, timer, clock, progress, f"decode B={B}",
                       on_gpu) if not clock.spent("decode") else {}
    best = {k: r["best"] for k, r in report.items()}
    for k, r in report.items():
        summary.append(dict(T=L, B=B, kernel=k, default_ms=r["default_ms"], best_ms=r["best_ms"],
                            config=r["best"]))
    cfg = dict(defaults, **best)
    splits = dict(base_splits)
    variants = split_candidates(spec, base_splits)
    if len(variants) > 1 and not clock.spent(f"decode B={B} splits"):
        precompile_runs([setup.make(s)(cfg) for s in variants])
        t_of = timer or graph_time
        times = []
        for s in variants:
            if times and clock.spent(f"decode B={B} splits"):
                break
            try:
                run = setup.make(s)(cfg)
                run()
                t = t_of(run)
                t = sum(t.values()) if isinstance(t, dict) else float(t)
            except Exception as err:
                log.info("nsagen tune: decode splits %s failed: %s", s, str(err)[:160])
                t = math.inf
            times.append(t)
        j = min(range(len(times)), key=times.__getitem__)
        if j and times[j] < times[0] * (1 - MARGIN):
            splits = variants[j]
        else:
            j = 0
        progress(f"  decode B={B} splits: {'best ' + str(splits) if j else 'IR choice kept'}"
                 f" step {times[j]:.4f} ms (IR choice {base_splits} {times[0]:.4f} ms, "
                 f"{len(times)} tried)")
        summary.append(dict(T=L, B=B, kernel="step (splits)", default_ms=times[0],
                            best_ms=times[j], config=splits))
    for kernel, param in STEP_KNOBS:
        if kernel in names and param in cfg.get(kernel, {}) and \
                not clock.spent(f"decode B={B} {kernel} {param}"):
            cfg, best = _step_knob(spec, setup, splits, cfg, best, defaults, kernel, param,
                                   timer, precompile_runs, progress, summary, B, L)
    entry = {k: dict(v) for k, v in best.items()}
    entry[tables.DECODE_SPLITS] = {k: v for k, v in splits.items() if base_splits.get(k) != v}
    return entry


def _step_knob(spec, setup, splits, cfg, best, defaults, kernel, param, timer, precompile_runs,
               progress, summary, B, L):
    """Whole steps (CUDA graph) with `param` of `kernel` as chosen and flipped; the flip is
    kept when faster by MARGIN and still in the kernel's config space. Returns (cfg, best)."""
    flipped = dict(cfg[kernel], **{param: 1 - cfg[kernel][param]})
    if flipped not in decode_candidates(spec, kernel, defaults[kernel], limit=None):
        return cfg, best
    trial = dict(cfg, **{kernel: flipped})
    precompile_runs([setup.make(splits)(trial)])
    t_of = timer or graph_time
    times = []
    try:
        for c in (cfg, trial):
            run = setup.make(splits)(c)
            run()
            t = t_of(run)
            times.append(sum(t.values()) if isinstance(t, dict) else float(t))
    except Exception as err:
        log.info("nsagen tune: decode %s %s=%s failed: %s", kernel, param, flipped[param],
                 str(err)[:160])
        return cfg, best
    keep = times[1] < times[0] * (1 - MARGIN)
    progress(f"  decode B={B} {kernel} {param}={flipped[param]}: step {times[1]:.4f} ms against "
             f"{times[0]:.4f} ({'kept' if keep else 'not kept'})")
    summary.append(dict(T=L, B=B, kernel=f"step ({kernel} {param})", default_ms=times[0],
                        best_ms=min(times), config=(flipped if keep else cfg[kernel])))
    if keep:
        return trial, dict(best, **{kernel: flipped})
    return cfg, best


def warm_build(op, seq_len: int = 4096, device: str = "cuda", dtype=torch.bfloat16,
               decode_batch: int = 1, progress=print) -> int:
    """Compile the module's forward, backward and decode kernels for the configs it will
    launch with (the tuned table's, else the defaults) at one shape (and at the short-length
    plan's bound, below which calls take that plan), in parallel threads.
    Returns how many kernel variants were compiled."""
    spec = op.spec
    if torch.device(device).type != "cuda":
        return 0
    dev = torch.device(device)
    cfg = op.configs_for(dev, seq_len)
    x = random_inputs(spec, seq_len, 1, dev, dtype)
    compiler = Compiler()
    try:
        n = compiler.record([forward_pass(op, x)(cfg)])
        compiler.wait()
        n += compiler.record([backward_pass(op, x, cfg)(cfg)])
        short = getattr(op.module, "SHORT_LEN", 0)
        if 0 < short < seq_len:     # calls up to `short` tokens launch the short-length plan
            xs = random_inputs(spec, short, 1, dev, dtype)
            n += compiler.record([forward_pass(op, xs)(cfg)])
            compiler.wait()
            n += compiler.record([backward_pass(op, xs, cfg)(cfg)])
        if decode_kernel_names(op):
            tuned_cfg, tuned_splits = tables.decode_configs_for(op.tuned_tables, decode_batch,
                                                                seq_len)
            splits = dict(decode_splits(spec, decode_batch, seq_len, current(dev)),
                          **tuned_splits)
            dcfg = dict(tuned_cfg, **op.configs)
            n += compiler.record([DecodeSetup(op, decode_batch, seq_len, dev, dtype)
                                  .make(splits)(dcfg)])
        compiler.wait()
    finally:
        compiler.close()
    return n
