"""Launch-config search for the generated kernels (forward, backward, decode) on the GPU at hand.

The candidates per kernel come from nsagen.configspace (pruned before anything compiles, nearest
the IR's default first, capped). Every candidate of a phase is compiled up front in a thread pool (Triton releases the
GIL while it compiles); then the phase runs in rounds, round i launching every kernel with its
i-th candidate, and the torch profiler gives each kernel's own GPU time, so one pass times one
candidate of every kernel at once. A candidate replaces the default only when it is faster by
`MARGIN` and a confirming run of both agrees, so tuned is never slower than untuned by more
than the noise. Decode steps are timed per kernel the same way; split counts by whole steps
replayed from a CUDA graph. Winners are checked against the reference before the table is
saved.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import queue
import threading
from concurrent.futures import Future, wait

import torch

from . import occupancy
from .configspace import candidates, decode_candidates, split_candidates
from .spec import Spec

log = logging.getLogger("nsagen")

MARGIN = 0.03          # a candidate must beat the default by 3% to replace it


# ---------------------------------------------------------------------------- budget, progress
class Budget:
    """A per-spec time limit: the search stops between rounds once it is spent, keeping the
    best found so far, and says so once."""

    def __init__(self, seconds: float | None, progress=print, on_spent=None):
        self.start = time.monotonic()
        self.deadline = None if seconds is None else self.start + seconds
        self.progress = progress
        self.on_spent = on_spent    # e.g. drop the compiles still queued
        self.hit = False

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def spent(self, where: str = "") -> bool:
        if self.left() > 0:
            return False
        if not self.hit:
            self.hit = True
            msg = (f"nsagen tune: budget of {self.deadline - self.start:.0f} s reached"
                   f"{' during ' + where if where else ''}; keeping the best configs found so far "
                   "(defaults where nothing was timed)")
            log.warning(msg)
            self.progress(msg)
            if self.on_spent is not None:
                self.on_spent()
        return True


def _bar(i: int, n: int, width: int = 20) -> str:
    full = width * i // max(1, n)
    return "[" + "#" * full + "." * (width - full) + f"] {i}/{n}"


# ---------------------------------------------------------------------------- measuring
def _plan_kernel(name: str, kernels: list[str]) -> str | None:
    """The plan kernel a launched Triton kernel belongs to: the longest plan name that equals it
    or prefixes it with '_' (slc_attention_bwd_dq -> slc_attention_bwd)."""
    best = None
    for k in kernels:
        if (name == k or name.startswith(k + "_")) and (best is None or len(k) > len(best)):
            best = k
    return best


def kernel_times(run, kernels: list[str], iters: int = 3) -> dict[str, float]:
    """GPU time (ms per call of `run`) of each plan kernel, from the torch profiler: each
    kernel's own time, whatever the host overhead between launches."""
    from .bench import profile_kernels

    out: dict[str, float] = {}
    for name, ms in profile_kernels(run, iters).items():
        k = _plan_kernel(name, kernels)
        if k is not None:
            out[k] = out.get(k, 0.0) + ms
    return out


def graph_time(fn, reps: int = 30) -> float:
    """ms per call of `fn` replayed from a CUDA graph (host overhead out of the picture), the
    best of three timed batches of `reps`; eager do_bench when capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
    except Exception as err:
        log.info("nsagen tune: graph capture failed (%s); timing eager steps", str(err)[:120])
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=20, return_mode="median")
    for _ in range(3):
        g.replay()
    best = math.inf
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / reps)
    del g
    return best


# ---------------------------------------------------------------------------- parallel compile
@contextlib.contextmanager
def _recording(calls: list):
    """Inside: Triton launches are recorded (kernel, args, grid, kwargs) instead of compiled
    and run, so a pass with candidate configs lists the variants it would compile."""
    from triton.runtime.jit import JITFunction

    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, grid, kwargs))
        return None

    JITFunction.run = record
    try:
        yield calls
    finally:
        JITFunction.run = real


def _variant_key(fn, args, kwargs) -> tuple:
    """Launches that compile to the same binary share a key: positional integers count by what
    Triton specialises them on, keyword arguments (the constexprs, warps, stages) by value.
    Merging two variants by mistake only means one compiles at its first launch instead."""
    def norm(x, exact):
        if isinstance(x, torch.Tensor):
            return (str(x.dtype), x.data_ptr() % 16 == 0)
        if isinstance(x, int) and not isinstance(x, bool) and not exact:
            return ("i", x == 1, x % 16 == 0)
        return repr(x)

    return (id(fn), tuple(norm(a, False) for a in args),
            tuple(sorted((k, norm(v, True)) for k, v in kwargs.items())))


class Compiler:
    """Compiles recorded kernel variants on worker threads, ahead of the timing rounds.
    `close` drops the compiles not started and waits for the running ones (Triton cannot stop
    them) and for the workers to exit."""

    started = False     # set once any Compiler ran in this process (see nsagen.cli.run)

    def __init__(self, workers: int | None = None):
        Compiler.started = True
        self.workers = workers or max(2, min(16, os.cpu_count() or 2))
        self.queue: queue.Queue = queue.Queue()
        self.threads = [threading.Thread(target=self._work, name=f"nsagen-compile-{i}",
                                         daemon=True) for i in range(self.workers)]
        for t in self.threads:
            t.start()
        self.seen: set = set()
        self.futures = []
        self.failed = 0

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            fut, job = item
            if fut.set_running_or_notify_cancel():
                self._compile(*job)
                fut.set_result(None)

    def record(self, passes) -> int:
        """Run each callable in `passes` with launches recorded; submit the new variants."""
        calls: list = []
        for p in passes:
            with _recording(calls):
                try:
                    p()
                except Exception as err:  # a pass that cannot even be set up: timed as failing
                    log.info("nsagen tune: recording a pass failed: %s", str(err)[:120])
        n = 0
        for fn, args, grid, kwargs in calls:
            key = _variant_key(fn, args, kwargs)
            if key in self.seen:
                continue
            self.seen.add(key)
            fut: Future = Future()
            self.queue.put((fut, (fn, args, grid, kwargs)))
            self.futures.append(fut)
            n += 1
        return n

    def _compile(self, fn, args, grid, kwargs):
        try:
            fn.run(*args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # rejected by the compiler: the timing round reports it
            self.failed += 1
            log.info("nsagen tune: %s %s does not compile: %s", getattr(fn, "__name__", fn),
                     {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)},
                     str(err)[:120])

    def wait(self, budget: Budget | None = None) -> None:
        left = None if budget is None or budget.deadline is None else max(0.0, budget.left())
        wait(self.futures, timeout=left)
        self.futures = [f for f in self.futures if not f.done()]

    def cancel(self) -> None:
        """Drop the compiles not started yet (those running finish: Triton cannot stop them)."""
        for f in self.futures:
            f.cancel()
        self.futures = []

    def close(self, timeout: float = 120.0) -> None:
        """Stop the workers and wait (up to `timeout` s) for them to exit: a process whose
        compile threads were still alive at exit has been seen to abort in the compiler's
        native teardown."""
        self.cancel()
        for _ in range(self.workers):
            self.queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------- the search
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
        progress(f"  {label} {_bar(i + 1, n)} {time.monotonic() - t0:.1f} s")
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


# ---------------------------------------------------------------------------- inputs and passes
def kernel_names(op) -> tuple[list[str], list[str]]:
    """The module's forward and backward kernels, in launch order."""
    from .ir import lower

    plan = lower(op.spec)
    return [k.name for k in plan.kernels], [k.name for k in plan.backward]


def decode_kernel_names(op) -> list[str]:
    """The module's decode kernels (launch order where the IR gives it), as the generated module
    has them: none when it has no decode step."""
    have = dict(getattr(op.module, "DECODE_CONFIGS", {}) or {})
    if not have or not hasattr(op.module, "decode_step"):
        return []
    try:
        from .ir.passes import lower_decode

        order = [k.name for k in lower_decode(op.spec).kernels]
    except Exception:  # the IR and the module disagree: the module's own list
        order = []
    return [k for k in order if k in have] + [k for k in have if k not in order]


def _inputs(spec: Spec, T: int, batch: int, device, dtype) -> dict:
    """Realistic inputs: random data (never zeros); block choices then follow real importance.
    Drawn on the device (large lengths would take seconds on the host)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(T)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    x = dict(q=rnd(batch, T, spec.heads_q, spec.dim_qk), k=rnd(batch, T, spec.heads_kv, spec.dim_qk),
             v=rnd(batch, T, spec.heads_kv, spec.dim_v),
             gates=torch.rand(batch, T, spec.heads_q, 3, generator=g, device=dev).to(dtype))
    if spec.learned_compression:
        nc = spec.num_cmp(T)
        x.update(k_cmp=rnd(batch, nc, spec.heads_kv, spec.dim_qk),
                 v_cmp=rnd(batch, nc, spec.heads_kv, spec.dim_v))
    if spec.kv_per_branch == "separate" and spec.has("win"):
        x.update(k_win=rnd(batch, T, spec.heads_kv, spec.dim_qk),
                 v_win=rnd(batch, T, spec.heads_kv, spec.dim_v))
    return x


def _packed(op, x: dict):
    """The module-level arguments of a forward over `x` (packed, with its layout)."""
    from .layout import build_layout
    from .ops import _pack

    B, T = x["q"].shape[:2]
    lay = build_layout(op.spec, (T,) * B, x["q"].device)
    args = [_pack(x.get(n)) for n in ("q", "k", "v", "gates", "k_cmp", "v_cmp")]
    return args, lay, _pack(x.get("k_win")), _pack(x.get("v_win"))


def _forward_pass(op, x: dict, save: bool = False):
    """The forward with any configs: inference, or (`save`) keeping what the backward needs."""
    from .ops import direct_launches

    args, lay, kw, vw = _packed(op, x)

    def make(cfg):
        def run():
            with torch.no_grad(), direct_launches():
                return op.module.forward(*args, lay, kw, vw, configs=cfg, save=save)
        return run
    return make


def _backward_pass(op, x: dict, fwd_cfg: dict):
    """The backward alone, from one forward's saved tensors (which it does not change)."""
    from .ops import direct_launches

    args, lay, kw, vw = _packed(op, x)
    with torch.no_grad(), direct_launches():
        o, idx, saved = op.module.forward(*args, lay, kw, vw, configs=fwd_cfg, save=True)
    do = torch.randn_like(o)
    q, k, v, gates = args[:4]

    def make(cfg):
        def run():
            with torch.no_grad(), direct_launches():
                return op.module.backward(do, q, k, v, gates, idx, saved, lay, kw, vw,
                                          configs=cfg)
        return run
    return make


class _DecodeSetup:
    """A full decode cache (random contents, every row at capacity - 1) and one step's q and
    gates, launched straight through the module's decode_step with any configs and splits."""

    def __init__(self, op, batch: int, max_len: int, device, dtype):
        spec = op.spec
        dev = torch.device(device)
        g = torch.Generator(device=dev).manual_seed(batch * 7 + max_len)
        H, HQ, Dk, Dv = spec.heads_kv, spec.heads_q, spec.dim_qk, spec.dim_v

        def rnd(*shape):
            return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

        self.op, self.batch, self.max_len, self.device = op, batch, max_len, dev
        self.k, self.v = rnd(batch, max_len, H, Dk), rnd(batch, max_len, H, Dv)
        nc = max(1, spec.num_cmp(max_len))
        self.k_cmp, self.v_cmp = rnd(batch, nc, H, Dk), rnd(batch, nc, H, Dv)
        sep = spec.kv_per_branch == "separate" and spec.has("win")
        self.kw = rnd(batch, max_len, H, Dk) if sep else None
        self.vw = rnd(batch, max_len, H, Dv) if sep else None
        self.lens = torch.full((batch,), max_len - 1, dtype=torch.int32, device=dev)
        self.q = rnd(batch, HQ, Dk)
        self.gates = torch.rand(batch, HQ, 3, generator=g, device=dev).to(dtype)
        self._work: dict = {}

    def work(self, splits: dict):
        key = tuple(sorted(splits.items()))
        if key not in self._work:
            self._work[key] = self.op.module.decode_workspace(self.batch, self.max_len, splits,
                                                              self.device)
        return self._work[key]

    def make(self, splits: dict):
        from .ops import direct_launches

        work = self.work(splits)

        def make_run(cfg):
            def run():
                with direct_launches():
                    return self.op.module.decode_step(
                        self.q, self.gates, self.k, self.v, self.k_cmp, self.v_cmp, self.lens,
                        splits, work, self.kw, self.vw, configs=cfg)
            return run
        return make_run


# ---------------------------------------------------------------------------- reference checks
def precompile_check(compiler: "Compiler | None", op, configs: dict, T: int, device, dtype,
                     backward: bool = True, progress=print) -> None:
    """Compile, in parallel, the kernels check_against_reference (and, with `backward`,
    check_backward_against_reference) at T will launch with `configs`; otherwise each compiles
    at its first launch, one after another. Not bound by the search budget: the checks run
    whatever it left."""
    if compiler is None:
        return
    t0 = time.monotonic()
    x = _inputs(op.spec, T, 1, device, dtype)
    n = compiler.record([_forward_pass(op, x)(configs), _forward_pass(op, x, save=True)(configs)])
    compiler.wait()
    if backward:
        n += compiler.record([_backward_pass(op, x, configs)(configs)])
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
    from .ir.passes import DEFAULT_SM_COUNT, decode_splits

    t0 = time.monotonic()
    dev = torch.device(device)
    sms = (torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda"
           else DEFAULT_SM_COUNT)
    full = dict(decode_splits(op.spec, 2, max_len, sms), **splits)
    n = compiler.record([_DecodeSetup(op, 2, max_len, dev, dtype).make(full)(configs)])
    compiler.wait()
    if n:
        progress(f"  compiled {n} decode kernel variants for the reference check "
                 f"({time.monotonic() - t0:.1f} s)")


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


def check_decode_against_reference(op, spec: Spec, configs: dict, splits: dict, max_len: int,
                                   device, dtype, tol: float, steps: int = 3) -> float:
    """Decode steps through a DecodeCache with `configs` and `splits` (ragged rows, several
    tokens each) equal the reference prefill row of each sequence on the blocks the kernels
    chose; the choice itself is well formed. Returns the largest relative error."""
    from .decode import DecodeCache
    from .reference import nsa_decode_step

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


# ---------------------------------------------------------------------------- tune
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
    from . import tables
    from .ops import build

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
    fwd_all, bwd_all = kernel_names(op)
    dec_all = decode_kernel_names(op)

    def wanted(names):
        return [k for k in names if kernels is None or k in kernels]

    fwd, bwd, dec = wanted(fwd_all), wanted(bwd_all) if backward else [], wanted(dec_all)

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
            if not (fwd or bwd):
                break
            progress(f"nsagen tune: {op.module_name} T={T} B={batch} -> bucket {tables.bucket(T)}")
            x = _inputs(spec, T, batch, device, dtype)
            best = dict(defaults)
            if fwd:
                make = _forward_pass(op, x)
                cands = {k: candidates(spec, k, defaults[k]) for k in fwd}
                precompile(make, best, fwd, cands)
                report = sweep(make, fwd, cands, best, timer, clock, progress,
                               f"forward T={T}", on_gpu) if not clock.spent("forward") else {}
                best.update({k: r["best"] for k, r in report.items()})
                rows_of(report, T)
            if bwd:
                make = _backward_pass(op, x, best)
                cands = {k: candidates(spec, k, defaults[k]) for k in bwd}
                precompile(make, best, bwd, cands)
                report = sweep(make, bwd, cands, best, timer, clock, progress,
                               f"backward T={T}", on_gpu) if not clock.spent("backward") else {}
                best.update({k: r["best"] for k, r in report.items()})
                rows_of(report, T)
            del x
            precompile_check(compiler, op, best, min(T, check_len), device, dtype, bool(bwd),
                             progress)
            chosen = _checked(op, spec, best, defaults, fwd, bwd, min(T, check_len), device,
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
    op._tables_loaded = False  # pick the new table up on the next call
    progress(f"nsagen tune: {op.module_name} done in {time.monotonic() - clock.start:.1f} s"
             + (" (budget reached: partly searched)" if clock.hit else ""))
    return path, summary


def _checked(op, spec, best, defaults, fwd, bwd, T, device, dtype, tol, progress, label):
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


def _tune_decode(op, spec, B, L, names, timer, clock, progress, device, dtype, on_gpu,
                 precompile, precompile_runs, summary) -> dict:
    """Decode kernels' configs (per-kernel times of eager steps), then split counts (whole
    steps replayed from a CUDA graph) for one batch and cache capacity. Returns the table
    entry: every searched kernel's config and the split counts that differ from the IR's."""
    from . import tables
    from .ir.passes import decode_splits

    defaults = {k: dict(v) for k, v in op.module.DECODE_CONFIGS.items()}
    dev = torch.device(device)
    setup = _DecodeSetup(op, B, L, device, dtype)
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        base_splits = decode_splits(spec, B, L, sms)
        resident = occupancy.decode_residency(setup.make(base_splits)(defaults))
        base_splits = decode_splits(spec, B, L, sms, resident)
    else:
        base_splits = decode_splits(spec, B, L)
    cands = {k: decode_candidates(spec, k, defaults[k]) for k in names}
    make = setup.make(base_splits)
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
    entry = {k: dict(v) for k, v in best.items()}
    entry[tables.DECODE_SPLITS] = {k: v for k, v in splits.items() if base_splits.get(k) != v}
    return entry


# ---------------------------------------------------------------------------- build
def warm_build(op, seq_len: int = 4096, device: str = "cuda", dtype=torch.bfloat16,
               decode_batch: int = 1, progress=print) -> int:
    """Compile the module's forward, backward and decode kernels for the configs it will
    launch with (the tuned table's, else the defaults) at one shape, in parallel threads.
    Returns how many kernel variants were compiled."""
    from . import tables

    spec = op.spec
    if torch.device(device).type != "cuda":
        return 0
    dev = torch.device(device)
    cfg = op.configs_for(dev, seq_len)
    x = _inputs(spec, seq_len, 1, dev, dtype)
    compiler = Compiler()
    try:
        n = compiler.record([_forward_pass(op, x)(cfg)])
        compiler.wait()
        n += compiler.record([_backward_pass(op, x, cfg)(cfg)])
        if decode_kernel_names(op):
            from .ir.passes import decode_splits

            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            tuned_cfg, tuned_splits = tables.decode_configs_for(op._tables, decode_batch, seq_len)
            splits = dict(decode_splits(spec, decode_batch, seq_len, sms), **tuned_splits)
            dcfg = dict(tuned_cfg, **op.configs)
            n += compiler.record([_DecodeSetup(op, decode_batch, seq_len, dev, dtype)
                                  .make(splits)(dcfg)])
        compiler.wait()
    finally:
        compiler.close()
    return n
