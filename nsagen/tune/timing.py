"""Timing on the GPU: per-kernel times from the torch profiler, whole calls from a CUDA graph or
`do_bench` medians. Used by the tuner and by `nsagen bench`; nothing here asserts anything."""
from __future__ import annotations

import logging
import math
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

log = logging.getLogger("nsagen")


MIN_SAMPLES = 7


def median_ms(fn, warmup: int = 25, rep: int = 100, min_samples: int = MIN_SAMPLES) -> float:
    """Median ms of `fn` by `triton.testing.do_bench` after a warm-up, over at least about
    `min_samples` timed calls: do_bench times `rep` ms' worth of calls, which is one call of
    anything slower than `rep` ms (a 64k forward + backward), so `rep` grows with one call's
    time, measured here on a second call (the first compiles and warms what `fn` launches)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one_ms = (time.perf_counter() - t0) * 1e3
    return do_bench(fn, warmup=warmup, rep=max(rep, min_samples * one_ms), return_mode="median")


def profile_kernels(fn, iters: int) -> dict[str, float]:
    """Mean GPU time per kernel name (ms) over `iters` calls of `fn` (no warm-up call), each
    kernel's own time whatever the host does between launches; longest first."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0.0)
        if t:
            out[ev.key] = out.get(ev.key, 0.0) + t / 1e3 / iters
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def plan_kernel(name: str, kernels: list[str]) -> str | None:
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
    out: dict[str, float] = {}
    for name, ms in profile_kernels(run, iters).items():
        k = plan_kernel(name, kernels)
        if k is not None:
            out[k] = out.get(k, 0.0) + ms
    return out


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """`fn` captured in a CUDA graph, after one warm-up call on a side stream (capture needs the
    allocations and compilations of a first call done)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_time(fn, reps: int = 30) -> float:
    """ms per call of `fn` replayed from a CUDA graph (host overhead out of the picture), the
    best of three timed batches of `reps`; eager medians when capture fails."""
    try:
        g = capture_graph(fn)
    except Exception as err:
        log.info("nsagen tune: graph capture failed (%s); timing eager steps", str(err)[:120])
        return median_ms(fn, warmup=5, rep=20)
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
