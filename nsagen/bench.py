"""`nsagen bench`: time the generated op side by side with dense and sparse baselines on one GPU.

Method: `triton.testing.do_bench` medians of at least 7 timed calls after warm-up, random inputs,
block indices from real importance scores; full attention through SDPA's flash and cuDNN
backends with the GQA heads expanded; FlexAttention for the window branch alone; fla-core's
`parallel_nsa` when it is importable. Reports ms, speedups, TFLOP/s on the cost model's FLOPs and
the fraction of the cost-model floor at the measured matmul rate. Timing never asserts anything.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from . import __version__, costmodel, paged
from .launch import decode_pdl
from .ops import build
from .spec import Spec
from .tune.timing import MIN_SAMPLES, capture_graph, median_ms, profile_kernels
from .tune.workloads import random_inputs

log = logging.getLogger("nsagen")
# consecutive decode steps per timed call (then one rewind returns the cache to its length)
DECODE_STEPS = 8


def decode_steps(cache_len: int) -> int:
    """Steps a timed decode call runs for a row of `cache_len` tokens: the cache is prefilled
    to cache_len minus that many, so the steps attend over lengths up to cache_len."""
    return max(1, min(DECODE_STEPS, cache_len - 1))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ceilings(device: str = "cuda") -> dict:
    """Measured device-to-device copy bandwidth (TB/s, read + write) and bf16 matmul TFLOP/s."""
    x = torch.empty(2 ** 29, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    bw = 2 * x.numel() * 2 / (ms * 1e-3) / 1e12
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn_like(a)
    ms = median_ms(lambda: a @ b)
    tf = 2 * 8192 ** 3 / (ms * 1e-3) / 1e12
    return {"copy_TBps": bw, "mm_TFLOPs": tf}


def environment() -> dict:
    """GPU, versions and date for the results file and the README table."""
    env = {"date": time.strftime("%Y-%m-%d"), "nsagen": __version__, "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version(),
           "timing": f"triton.testing.do_bench median over >= {MIN_SAMPLES} calls"}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}")
    return env


def _fla():
    try:
        from fla.ops.nsa import parallel_nsa  # type: ignore

        return parallel_nsa
    except Exception as err:  # fla-core is optional
        log.info("nsagen bench: fla-core not importable (%s); skipping its rows", err)
        return None


def _fa3():
    """FlashAttention-3's forward (the `fa3-fwd` wheel, built for Hopper), if it loads."""
    try:
        from fa3_fwd_interface import flash_attn_func  # type: ignore

        return flash_attn_func
    except Exception as err:  # optional
        log.info("nsagen bench: FlashAttention-3 (fa3-fwd) not importable (%s)", str(err)[:120])
        return None


def _fa4():
    """FlashAttention-4 (`flash-attn-4`, CuTe DSL), if it loads."""
    try:
        from flash_attn.cute import flash_attn_func  # type: ignore

        return flash_attn_func
    except Exception as err:  # optional
        log.info("nsagen bench: FlashAttention-4 not importable (%s)", str(err)[:120])
        return None


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        return torch.compile(flex_attention, dynamic=False), create_block_mask
    except Exception as err:
        log.info("nsagen bench: FlexAttention unavailable (%s)", err)
        return None


def kernel_breakdown(fn, iters: int = 5) -> dict[str, float]:
    """Mean GPU time per kernel name (ms) over `iters` calls, from the torch profiler."""
    fn()
    torch.cuda.synchronize()
    return profile_kernels(fn, iters)


def bench_forward(spec: Spec, seq_lens: list[int], batch: int = 1, baselines: bool = True,
                  breakdown: bool = False, progress=print, backward: bool = False,
                  device: str = "cuda") -> dict:
    """Forward (or, with `backward`, forward+backward) timings for each sequence length; returns
    the results document."""
    dev = device
    dt = torch.bfloat16
    op = build(spec)
    progress(f"nsagen bench: {spec.name} ({op.name}), module {op.path}")
    ceil = ceilings(dev)
    progress(f"ceilings: copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul {ceil['mm_TFLOPs']:.0f} TFLOP/s")
    fla = _fla() if baselines else None
    flex = _flex() if baselines and spec.has("win") else None
    HQ, Dv, G = spec.heads_q, spec.dim_v, spec.group
    flops_expr = costmodel.fwd_flops(spec)
    if backward:
        flops_expr = flops_expr + costmodel.bwd_flops(spec)
    rows = []
    for i, T in enumerate(seq_lens):
        progress(f"[{i + 1}/{len(seq_lens)}] T={T}")
        x = random_inputs(spec, T, batch, dev, dt)
        q, k, v, gates = x["q"], x["k"], x["v"], x["gates"]
        row: dict = {"T": T, "B": batch}
        flops = float(costmodel.evaluate(flops_expr, T=T, B=batch))
        if backward:
            do = torch.randn(batch, T, HQ, Dv, dtype=dt, device=dev)
            leaves = [t.requires_grad_(True) for t in x.values()]

            def f():
                o = op(**x)
                torch.autograd.grad(o, leaves, do)
        else:
            def f():
                with torch.no_grad():
                    return op(**x)
        f()
        _sync(dev)
        row["nsagen_ms"] = median_ms(f)
        if breakdown:
            row["kernels_ms"] = kernel_breakdown(f)
            # what the GPU is busy for; the rest of the call's time is host work it waits on
            row["kernels_sum_ms"] = sum(row["kernels_ms"].values())
            row["host_gap_ms"] = max(0.0, row["nsagen_ms"] - row["kernels_sum_ms"])
            # the same call replayed from a CUDA graph (torch.compile's reduce-overhead mode):
            # what it costs with no host work between launches
            try:
                graph = capture_graph(f)
                row["nsagen_graph_ms"] = median_ms(graph.replay)
                del graph
            except Exception as err:
                row["graph_error"] = str(err)[:160]
        row["nsagen_TFLOPs"] = flops / (row["nsagen_ms"] * 1e-3) / 1e12
        row["floor_ms"] = flops / (ceil["mm_TFLOPs"] * 1e12) * 1e3
        row["floor_frac"] = row["floor_ms"] / row["nsagen_ms"]
        if baselines:
            with torch.no_grad():
                qd, kd, vd, gd = (t.detach() for t in (q, k, v, gates))
            _dense_rows(row, qd, kd, vd, G, backward)
            if flex is not None:
                row["flex_window_ms"] = _flex_window(flex, qd, kd, vd, G, spec.window, backward)
            if fla is not None:
                row["fla_ms"] = _fla_row(fla, spec, qd, kd, vd, gd, backward)
        dense = [row[n] for n in DENSE if row.get(n)]
        if dense:
            row["best_dense_ms"] = min(dense)
        for name in ("flash_ms", "cudnn_ms", "fla_ms", "best_dense_ms"):
            if row.get(name):
                row["speedup_vs_" + name[:-3]] = row[name] / row["nsagen_ms"]
        rows.append(row)
        report_row(progress, row, "ms", 16)
        del q, k, v, gates, x
        if dev == "cuda":
            torch.cuda.empty_cache()
    return {"spec": spec.to_dict(), "uri": op.name,
            "mode": "forward+backward" if backward else "forward", "env": environment(),
            "tuned": bool(op.tuned_tables), "ceilings": ceil, "rows": rows}


def timed(fn, backward: bool, leaves):
    """Time fn() (forward) or fn() followed by its backward w.r.t. `leaves`."""
    if not backward:
        with torch.no_grad():
            return median_ms(fn)
    for t in leaves:
        t.requires_grad_(True)
    o = fn()
    do = torch.randn_like(o)

    def fb():
        torch.autograd.grad(fn(), leaves, do)

    return median_ms(fb)


DENSE = ("flash_ms", "cudnn_ms", "fa3_ms", "fa4_ms")    # the dense baselines, best one reported


def _first(out):
    """The output tensor of an attention call that may also return its LSE."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _dense_rows(row: dict, q, k, v, G: int, backward: bool = False) -> None:
    """Dense causal attention at the same shapes: SDPA's FlashAttention-2 and cuDNN backends,
    FlashAttention-3 (forward only, as its wheel ships) and FlashAttention-4 where they load
    (GQA native, [B, T, H, D]); `best_dense_ms` is the fastest of them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, fn in (("fa3_ms", None if backward else _fa3()), ("fa4_ms", _fa4())):
        if fn is None or k.shape[-1] != v.shape[-1]:
            continue
        qc, kc, vc = (t.detach().clone() for t in (q, k, v))
        try:
            row[name] = timed(lambda: _first(fn(qc, kc, vc, causal=True)), backward, [qc, kc, vc])
        except Exception as err:
            log.info("nsagen bench: %s failed: %s", name, str(err)[:120])
        del qc, kc, vc

    qt = q.transpose(1, 2).contiguous()
    kt = k.repeat_interleave(G, 2).transpose(1, 2).contiguous()
    vt = v.repeat_interleave(G, 2).transpose(1, 2).contiguous()
    if kt.shape[-1] != vt.shape[-1] or kt.shape[-1] > 256:
        return
    for name, be in (("flash_ms", SDPBackend.FLASH_ATTENTION), ("cudnn_ms", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                row[name] = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
                                   backward, [qt, kt, vt])
        except Exception as err:
            log.info("nsagen bench: %s failed: %s", name, str(err)[:120])
    del qt, kt, vt


def _flex_window(flex, q, k, v, G: int, w: int, backward: bool = False) -> float | None:
    flex_fn, create_block_mask = flex
    T = q.shape[1]
    qt = q.transpose(1, 2).contiguous()
    kt = k.repeat_interleave(G, 2).transpose(1, 2).contiguous()
    vt = v.repeat_interleave(G, 2).transpose(1, 2).contiguous()
    try:
        def swa(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < w)

        bm = create_block_mask(swa, None, None, T, T, device=q.device)
        return timed(lambda: flex_fn(qt, kt, vt, block_mask=bm), backward, [qt, kt, vt])
    except Exception as err:
        log.info("nsagen bench: flex failed: %s", str(err)[:160])
        return None


def _fla_row(fla, spec: Spec, q, k, v, gates, backward: bool = False) -> float | None:
    try:
        q, k, v = (t.detach().clone() for t in (q, k, v))
        g_cmp = gates[..., 0].contiguous()
        g_slc = gates[..., 1].contiguous()
        f = lambda: fla(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=spec.slc_count,  # noqa: E731
                        block_size=spec.slc_block)
        return timed(f, backward, [q, k, v, g_cmp, g_slc])
    except Exception as err:
        log.info("nsagen bench: fla parallel_nsa failed: %s", str(err)[:160])
        return None


def bench_decode(spec: Spec, cache_lens: list[int], batches: list[int], baselines: bool = True,
                 progress=print, device: str = "cuda", breakdown: bool = False,
                 pdl: bool = True, page_size: int = 64) -> dict:
    """One-token decode steps as a user runs them, `cache.decode` (append the token, then
    attend), eager and replayed from a CUDA graph, with the attention alone (`cache.step`) as a
    breakdown, beside SDPA decoding (GQA) and fla. A timed call runs DECODE_STEPS consecutive
    steps from a cache of L - DECODE_STEPS tokens (so they attend over L - DECODE_STEPS + 1 ..
    L), then one `cache.rewind` of as many tokens, whose two launches are counted, spread over
    the steps.

    Reports microseconds and the rate on the bytes NSA must read (cost model) against the
    measured copy bandwidth, and the split counts the IR chose for each batch; `breakdown`
    adds the time of each decode kernel. `pdl=False` launches the decode kernels one after
    another, without programmatic dependent launch (for A/B runs). With `page_size` the same
    whole step is also timed over shuffled page pools (`op.append_paged` + `op.decode_paged`,
    what a serving engine runs); 0 leaves it out.
    """
    op = build(spec)
    with decode_pdl(op.module, pdl):
        return _bench_decode(op, spec, cache_lens, batches, baselines, progress, device, breakdown,
                             page_size)


def _bench_decode(op, spec: Spec, cache_lens: list[int], batches: list[int], baselines: bool,
                  progress, dev: str, breakdown: bool, page_size: int) -> dict:
    """bench_decode's rows, with the module's launch mode already set."""
    dt = torch.bfloat16
    ceil = ceilings(dev) if dev == "cuda" else {"copy_TBps": float("nan"), "mm_TFLOPs": float("nan")}
    fla = _fla() if baselines else None
    HQ, H, Dk, Dv = spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
    bytes_expr = costmodel.decode_bytes(spec)
    rows = []
    for B in batches:
        for L in cache_lens:
            progress(f"decode B={B} cache={L}")
            torch.manual_seed(L + B)
            n_steps = decode_steps(L)
            cache = op.new_cache(B, L, device=dev, dtype=dt)
            k = torch.randn(B, L - n_steps, H, Dk, dtype=dt, device=dev)
            v = torch.randn(B, L - n_steps, H, Dv, dtype=dt, device=dev)
            extra = {}
            if spec.learned_compression:
                nc = spec.num_cmp(L - n_steps)
                extra = dict(k_cmp=torch.randn(B, nc, H, Dk, dtype=dt, device=dev),
                             v_cmp=torch.randn(B, nc, H, Dv, dtype=dt, device=dev))
            if cache.separate:
                extra.update(k_win=torch.randn_like(k), v_win=torch.randn_like(v))
            cache.prefill(k, v, **extra)
            step_extra = {}
            if spec.learned_compression:
                step_extra = dict(k_cmp_t=torch.randn(B, H, Dk, dtype=dt, device=dev),
                                  v_cmp_t=torch.randn(B, H, Dv, dtype=dt, device=dev))
            if cache.separate:
                step_extra.update(k_win_t=torch.randn(B, H, Dk, dtype=dt, device=dev),
                                  v_win_t=torch.randn(B, H, Dv, dtype=dt, device=dev))
            k_t = torch.randn(B, H, Dk, dtype=dt, device=dev)
            v_t = torch.randn(B, H, Dv, dtype=dt, device=dev)
            q = torch.randn(B, HQ, Dk, dtype=dt, device=dev)
            gates = torch.rand(B, HQ, 3, dtype=dt, device=dev)
            row: dict = {"B": B, "T": L, "splits": dict(cache.splits)}
            # the step alone (attention over L tokens), as a breakdown
            for _ in range(n_steps):
                cache.append(k_t, v_t, **step_extra)
            time_steps(row, "step", lambda: cache.step(q, gates), n_steps, dev, False)
            if page_size and not cache.separate:   # page pools of the same L tokens, for below
                pools = paged.to_pages(cache, page_size)
            cache.rewind(n_steps)
            # what a user runs each step: append the token, then attend
            time_steps(row, "nsagen", lambda: cache.decode(q, k_t, v_t, gates, **step_extra),
                       n_steps, dev, breakdown, rewind=cache.rewind)
            if page_size and not cache.separate:
                # the same steps over page pools (shuffled pages), as an engine runs them: the
                # engine's lengths go L - n_steps + 1 .. L as above (so as many steps emit a
                # compressed token), each step writing its token again
                kp, vp, kcp, vcp, table, ctable, lens = pools
                del pools
                lens_at = [lens - (n_steps - 1 - s) for s in range(n_steps)]
                at = {"step": 0}

                def paged_step():
                    n = lens_at[at["step"]]
                    at["step"] = (at["step"] + 1) % n_steps
                    op.append_paged(k_t, v_t, kp, vp, kcp, vcp, table, ctable, n, **step_extra)
                    return op.decode_paged(q, gates, kp, vp, kcp, vcp, table, ctable, n)
                time_steps(row, "paged", paged_step, n_steps, dev, False)
                row["page_size"] = page_size
                del kp, vp, kcp, vcp
            nbytes = float(costmodel.evaluate(bytes_expr, T=L, B=B))
            best = min(x for x in (row.get("nsagen_us"), row.get("nsagen_graph_us")) if x)
            row["nsa_bytes"] = nbytes
            row["TBps"] = nbytes / (best * 1e-6) / 1e12
            row["copy_frac"] = row["TBps"] / ceil["copy_TBps"]
            if baselines:
                qs = q[:, :, None, :]
                ks = torch.randn(B, H, L, Dk, dtype=dt, device=dev)
                vs = torch.randn(B, H, L, Dv, dtype=dt, device=dev)
                try:
                    row["sdpa_us"] = median_ms(lambda: F.scaled_dot_product_attention(
                        qs, ks, vs, enable_gqa=True)) * 1e3
                    row["speedup_vs_sdpa"] = row["sdpa_us"] / best
                except Exception as err:
                    log.info("nsagen bench: sdpa decode failed: %s", str(err)[:120])
                if fla is not None:
                    try:
                        qn, kn, vn = qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)
                        g = torch.rand(B, 1, HQ, dtype=dt, device=dev)
                        row["fla_us"] = median_ms(lambda: fla(
                            qn.contiguous(), kn.contiguous(), vn.contiguous(), g_cmp=g, g_slc=g,
                            block_counts=spec.slc_count, block_size=spec.slc_block)) * 1e3
                    except Exception as err:
                        log.info("nsagen bench: fla decode failed: %s", str(err)[:120])
                del ks, vs
            rows.append(row)
            report_row(progress, row, "us", 8)
            del cache
            if dev == "cuda":
                torch.cuda.empty_cache()
    return {"spec": spec.to_dict(), "uri": op.name, "mode": "decode", "env": environment(),
            "tuned": bool(op.tuned_tables), "pdl": bool(op.module.DECODE_PDL) and dev == "cuda",
            "ceilings": ceil, "rows": rows}


def report_row(progress, row: dict, unit: str, kernels: int) -> None:
    """Progress lines for one results row: its figures, then its `kernels` longest kernels
    (`kernels_<unit>`)."""
    times = f"kernels_{unit}"
    progress("   " + ", ".join(f"{a}={b:.3f}" if isinstance(b, float) else f"{a}={b}"
                               for a, b in row.items() if a != times))
    for name, t in list(row.get(times, {}).items())[:kernels]:
        progress(f"      {t:8.3f} {unit}  {name[:100]}")


def time_steps(row: dict, name: str, step, n_steps: int, dev: str, breakdown: bool,
               rewind=None) -> None:
    """time_decode of consecutive decode steps, as a model's CUDA graph holds one step's calls
    back to back: a timed call runs `step` `n_steps` times (then `rewind(n_steps)` where the step
    appends a token, so every call sees the same cache lengths; its launches count), and the
    times are per step."""
    def run():
        for _ in range(n_steps):
            step()
        if rewind is not None:
            rewind(n_steps)
    time_decode(row, name, run, dev, breakdown, steps=n_steps)


def time_decode(row: dict, name: str, f, dev: str, breakdown: bool, steps: int = 1) -> None:
    """Eager median (`<name>_us`), CUDA-graph median (`<name>_graph_us`) and, with `breakdown`,
    per-kernel times of a decode step, where one call of `f` runs `steps` steps."""
    f()
    _sync(dev)
    row[f"{name}_us"] = median_ms(f) * 1e3 / steps
    if breakdown and dev == "cuda":
        row["kernels_us"] = {k_: ms * 1e3 / steps for k_, ms in kernel_breakdown(f).items()}
    if dev == "cuda":
        try:
            graph = capture_graph(f)
            row[f"{name}_graph_us"] = median_ms(graph.replay) * 1e3 / steps
        except Exception as err:
            log.info("nsagen bench: graph capture failed: %s", str(err)[:160])


def format_table(doc: dict) -> str:
    """A Markdown table of a results document."""
    env = doc["env"]
    head = (f"{doc['spec']['name']} {doc['mode']}, B={doc['rows'][0]['B'] if doc['rows'] else '?'}, "
            f"{env.get('gpu', 'cpu')}, torch {env['torch']}, triton {env['triton']}, {env['date']}"
            + (", tuned table" if doc.get("tuned") else ", untuned")
            + (", dependent launches off" if doc.get("pdl") is False else ""))
    if doc["mode"] == "decode":
        cols = [("B", "B", "{:d}"), ("cache", "T", "{:d}"),
                ("step us (append + attend)", "nsagen_us", "{:.1f}"),
                ("graph us", "nsagen_graph_us", "{:.1f}"),
                ("attend only, graph us", "step_graph_us", "{:.1f}"),
                ("paged graph us", "paged_graph_us", "{:.1f}"), ("SDPA us", "sdpa_us", "{:.1f}"),
                ("dense us", "dense_us", "{:.1f}"),
                ("fla us", "fla_us", "{:.1f}"), ("x SDPA", "speedup_vs_sdpa", "{:.2f}"),
                ("x dense", "speedup_vs_dense", "{:.2f}"),
                ("TB/s on NSA bytes", "TBps", "{:.2f}"), ("of copy", "copy_frac", "{:.0%}")]
    else:
        cols = [("T", "T", "{:d}"), ("nsagen ms", "nsagen_ms", "{:.3f}"),
                ("FA2 ms", "flash_ms", "{:.3f}"), ("cuDNN ms", "cudnn_ms", "{:.3f}"),
                ("FA3 ms", "fa3_ms", "{:.3f}"), ("FA4 ms", "fa4_ms", "{:.3f}"),
                ("best dense ms", "best_dense_ms", "{:.3f}"),
                ("x best dense", "speedup_vs_best_dense", "{:.2f}"),
                ("fla NSA ms", "fla_ms", "{:.3f}"), ("Flex win ms", "flex_window_ms", "{:.3f}"),
                ("x FA2", "speedup_vs_flash", "{:.2f}"), ("x cuDNN", "speedup_vs_cudnn", "{:.2f}"),
                ("x fla", "speedup_vs_fla", "{:.2f}"), ("SDPA ms", "sdpa_ms", "{:.3f}"),
                ("x SDPA", "speedup_vs_sdpa", "{:.2f}"),
                ("indexer+top-k ms", "indexer_topk_ms", "{:.3f}"),
                ("attention ms", "attention_ms", "{:.3f}"), ("TFLOP/s", "nsagen_TFLOPs", "{:.0f}"),
                ("indexer TFLOP/s", "indexer_TFLOPs", "{:.0f}"),
                ("attention TFLOP/s", "attention_TFLOPs", "{:.0f}"),
                ("attention bwd TFLOP/s", "attention_bwd_TFLOPs", "{:.0f}"),
                ("of floor", "floor_frac", "{:.0%}")]
    present = [c for c in cols if any(r.get(c[1]) is not None for r in doc["rows"])]
    lines = [head, "", "| " + " | ".join(c[0] for c in present) + " |",
             "|" + "---|" * len(present)]
    for r in doc["rows"]:
        cells = []
        for _, key, fmt in present:
            val = r.get(key)
            cells.append("-" if val is None or (isinstance(val, float) and math.isnan(val))
                         else fmt.format(val))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def require_gpu(command: str) -> None:
    """Exit with status 2 and a one-line message naming `command` (e.g. 'nsagen tune') when no
    CUDA GPU is present: timing needs one."""
    if not torch.cuda.is_available():
        print(f"{command}: needs a CUDA GPU (none found)", file=sys.stderr)
        raise SystemExit(2)
