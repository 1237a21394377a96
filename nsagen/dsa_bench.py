"""`nsagen bench` for DSA specs: the generated prefill (forward, or forward+backward) and the
decode step, side by side with dense attention through SDPA on one GPU.

The method is `nsagen bench`'s (nsagen.bench): `triton.testing.do_bench` medians after warm-up
on random bf16 inputs, per-kernel times from the profiler with `breakdown`, decode steps as a
model runs them (`cache.decode`: append + indexer + top-k + attention), eager and replayed from
a CUDA graph. FLOPs are counted from the spec: the indexer over every causal (query, key) pair,
the attention over the picks. Timing never asserts anything.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import bench
from .dsa_spec import DSASpec
from .ops import build

log = logging.getLogger("nsagen")


def dsa_flops(spec: DSASpec, T: int, batch: int = 1) -> dict[str, float]:
    """Matmul FLOPs of one layer call over `batch` sequences of T tokens: the indexer (every
    causal pair, all indexer heads), the sparse attention's forward (q.k and p.v over the
    min(topk, t + 1) picks of each query head) and its backward (the scores again, dP, dQ, dK,
    dV)."""
    pairs = T * (T + 1) / 2
    picks = sum(min(spec.topk, t + 1) for t in range(T)) if T <= spec.topk else (
        spec.topk * (spec.topk + 1) / 2 + (T - spec.topk) * spec.topk)
    hq, dk, dv = spec.heads_q, spec.dim_qk, spec.dim_v
    return {"indexer": batch * pairs * spec.indexer_heads * spec.indexer_dim * 2,
            "attention": batch * picks * hq * (dk + dv) * 2,
            "attention_bwd": batch * picks * hq * (3 * dk + 2 * dv) * 2}


def _inputs(spec: DSASpec, B: int, T: int, dev: str, dt: torch.dtype,
            cache_only: bool = False) -> dict:
    """Random layer inputs; no v when it can be the key's first columns (MLA's layout). With
    `cache_only`, what a decode cache holds (k, v, k_idx) and none of the queries, which at
    128 heads x 576 would take 8x the cache's memory."""
    H, HQ = spec.heads_kv, spec.heads_q
    mla = spec.dim_v < spec.dim_qk

    def r(*shape):
        return torch.randn(*shape, dtype=dt, device=dev)

    x = dict(k=r(B, T, H, spec.dim_qk), v=None if mla else r(B, T, H, spec.dim_v),
             k_idx=r(B, T, spec.indexer_dim))
    if not cache_only:
        x.update(q=r(B, T, HQ, spec.dim_qk), q_idx=r(B, T, spec.indexer_heads, spec.indexer_dim),
                 w_idx=r(B, T, spec.indexer_heads))
    return x


def _dense_ms(spec: DSASpec, x: dict, backward: bool) -> dict[str, float]:
    """Dense causal attention at the same dims through SDPA, with each backend that runs these
    head dims; backends that refuse are left out. GQA goes to SDPA as is (`enable_gqa`); a
    backend that refuses it gets k and v expanded to every query head (copied once, outside
    the timing: the memory-efficient kernel takes MLA's 576/512 dims only that way)."""
    q = x["q"].detach().transpose(1, 2)
    k = x["k"].detach().transpose(1, 2)
    v = (x["k"][..., :spec.dim_v] if x["v"] is None else x["v"]).detach().transpose(1, 2)
    expanded = None
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def attempt(kk, vv, gqa, backend=backend):
            def f():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True,
                                                          enable_gqa=gqa,
                                                          scale=spec.softmax_scale)
            with torch.no_grad():
                f()                          # raises when the backend refuses
            return f, [q, kk, vv]
        try:
            try:
                f, leaves = attempt(k, v, True)
            except RuntimeError:
                if spec.group == 1:
                    raise
                if expanded is None:
                    expanded = (k.repeat_interleave(spec.group, 1),
                                v.repeat_interleave(spec.group, 1))
                f, leaves = attempt(*expanded, False)
            out[f"sdpa_{name}_ms"] = bench.timed(f, backward, leaves) if backward else (
                bench.median_ms(f))
        except Exception as err:             # this backend does not take these dims
            log.info("nsagen bench: SDPA %s: %s", name, str(err)[:120])
    return out


def bench_dsa(spec: DSASpec, seq_lens: list[int], batch: int = 1, baselines: bool = True,
              breakdown: bool = False, progress=print, backward: bool = False,
              device: str = "cuda") -> dict:
    """Prefill timings (forward, or forward+backward) for each sequence length; returns the
    results document (`nsagen.bench.format_table` renders it)."""
    dt = torch.bfloat16
    op = build(spec)
    progress(f"nsagen bench: {spec.name} ({op.name}), module {op.path}")
    ceil = bench.ceilings(device)
    progress(f"ceilings: copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul "
             f"{ceil['mm_TFLOPs']:.0f} TFLOP/s")
    rows = []
    for i, T in enumerate(seq_lens):
        progress(f"[{i + 1}/{len(seq_lens)}] T={T}")
        x = _inputs(spec, batch, T, device, dt)
        fl = dsa_flops(spec, T, batch)
        row: dict = {"T": T, "B": batch}
        if backward:
            leaves = [x[n].requires_grad_(True) for n in ("q", "k", "v") if x[n] is not None]
            do = torch.randn(batch, T, spec.heads_q, spec.dim_v, dtype=dt, device=device)

            def f():
                torch.autograd.grad(op(**x), leaves, do)
            flops = fl["indexer"] + fl["attention"] + fl["attention_bwd"]
        else:
            def f():
                with torch.no_grad():
                    return op(**x)
            flops = fl["indexer"] + fl["attention"]
        f()
        if device == "cuda":
            torch.cuda.synchronize()
        row["nsagen_ms"] = bench.median_ms(f)
        row["nsagen_TFLOPs"] = flops / (row["nsagen_ms"] * 1e-3) / 1e12
        row["floor_ms"] = flops / (ceil["mm_TFLOPs"] * 1e12) * 1e3
        row["floor_frac"] = row["floor_ms"] / row["nsagen_ms"]
        if breakdown and device == "cuda":
            ker = bench.kernel_breakdown(f)
            row["kernels_ms"] = ker
            part = lambda *names: sum(ms for n, ms in ker.items()  # noqa: E731
                                      if any(n.startswith(p) for p in names))
            row["indexer_topk_ms"] = part("dsa_indexer", "dsa_topk")
            row["attention_ms"] = part("dsa_attention") - part("dsa_attention_bwd")
            if row["indexer_topk_ms"]:
                row["indexer_TFLOPs"] = fl["indexer"] / (part("dsa_indexer") * 1e-3) / 1e12
            if row["attention_ms"]:
                row["attention_TFLOPs"] = fl["attention"] / (row["attention_ms"] * 1e-3) / 1e12
            if backward and part("dsa_attention_bwd"):
                row["attention_bwd_TFLOPs"] = (fl["attention_bwd"]
                                               / (part("dsa_attention_bwd") * 1e-3) / 1e12)
        if baselines:
            row.update(_dense_ms(spec, x, backward))
            dense = [row[k] for k in ("sdpa_flash_ms", "sdpa_cudnn_ms", "sdpa_efficient_ms")
                     if row.get(k)]
            if dense:
                row["sdpa_ms"] = min(dense)
                row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["nsagen_ms"]
        rows.append(row)
        bench.report_row(progress, row, "ms", 8)
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"spec": spec.to_dict(), "uri": op.name,
            "mode": "forward+backward" if backward else "forward", "env": bench.environment(),
            "tuned": False, "ceilings": ceil, "rows": rows}


def _dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense attention of one token per row over a whole cache: q [B, H, G, Dk], k [B, H, L, Dk],
    v [B, H, L, Dv] -> [B, H, G, Dv] (softmax in fp32)."""
    p = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, -1)
    return p.to(v.dtype) @ v


def bench_dsa_decode(spec: DSASpec, cache_lens: list[int], batches: list[int],
                     baselines: bool = True, progress=print, device: str = "cuda",
                     breakdown: bool = False) -> dict:
    """Decode steps as a model runs them (`cache.decode`: append the token, indexer over the
    cache, top-k, sparse attention), eager and from a CUDA graph, consecutive steps up to L
    tokens as bench.time_steps runs them; the attention step alone as a breakdown; beside
    dense attention over the whole cache."""
    dt = torch.bfloat16
    op = build(spec)
    Dk, Dv = spec.dim_qk, spec.dim_v
    mla = Dv < Dk
    rows = []
    for B in batches:
        for L in cache_lens:
            progress(f"decode B={B} cache={L}")
            n_steps = bench.decode_steps(L)
            cache = op.new_cache(B, L, device=device, dtype=dt, with_values=not mla)
            x = _inputs(spec, B, L - n_steps, device, dt, cache_only=True)
            cache.prefill(x["k"], x["v"], x["k_idx"],
                          torch.full((B,), L - n_steps, dtype=torch.int32, device=device))
            t = _inputs(spec, B, 1, device, dt)
            q, k_t, q_idx, k_idx_t, w_idx = (t["q"][:, 0], t["k"][:, 0], t["q_idx"][:, 0],
                                              t["k_idx"][:, 0], t["w_idx"][:, 0])
            v_t = None if mla else t["v"][:, 0]
            row: dict = {"B": B, "T": L}
            for _ in range(n_steps):
                cache.append(k_t, v_t, k_idx_t)
            bench.time_steps(row, "step", lambda: cache.step(q, q_idx, w_idx), n_steps, device,
                             False)
            cache.rewind(n_steps)
            bench.time_steps(row, "nsagen", lambda: cache.decode(q, k_t, v_t, q_idx, k_idx_t,
                                                                 w_idx),
                             n_steps, device, breakdown, rewind=cache.rewind)
            if baselines:
                # dense attention over the whole cache, each KV head's G query heads as the rows
                # of one product (SDPA has no fused kernel for wide MLA heads, and its fallback
                # expands the shared key to every head)
                kk = cache.k[:, :L].transpose(1, 2).contiguous()
                vv = (cache.k[:, :L, :, :Dv] if mla else cache.v[:, :L]).transpose(1, 2).contiguous()
                qq = q.view(B, spec.heads_kv, spec.group, Dk)
                try:
                    row["dense_us"] = bench.median_ms(
                        lambda: _dense_decode(qq, kk, vv, spec.softmax_scale)) * 1e3
                    best = min(v for v in (row.get("nsagen_us"), row.get("nsagen_graph_us")) if v)
                    row["speedup_vs_dense"] = row["dense_us"] / best
                except Exception as err:
                    log.info("nsagen bench: dense decode failed: %s", str(err)[:120])
            rows.append(row)
            bench.report_row(progress, row, "us", 8)
            del cache
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"spec": spec.to_dict(), "uri": op.name, "mode": "decode", "env": bench.environment(),
            "tuned": False, "ceilings": {}, "rows": rows}
