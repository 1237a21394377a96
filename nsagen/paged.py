"""Paged KV for serving engines: functional append and decode over page pools the engine owns.

An engine (vLLM, SGLang) keeps keys and values in pools of pages, `[num_pages, page_size, H, D]`,
and a page table per sequence: int32 `[B, max_pages]`, entry j the pool page holding positions
`j * page_size ..` of that sequence. Compressed tokens are paged the same way in their own pools
and table. `seq_lens[b]` counts every token of sequence b, the new one included. Pages may come
in any order and may be shared between sequences (a common prefix): nothing here writes a page
other than the one the new token falls in. Both ops launch the generated decode kernels with no
host synchronisation, so a step can be captured in a CUDA graph. See docs/serving.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import reference, tables
from .ir.passes import decode_splits
from .launch import direct_launches, interpreted_in_float32, kernels_available
from .target import current

if TYPE_CHECKING:
    from .ops import NSAOp

I32 = torch.int32


def _pool(name: str, t, dims: tuple, dtype, device) -> None:
    """Refuse a pool that is not a contiguous [num_pages, page_size, H, D] tensor of the step."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [num_pages, page_size, H, D], got "
                        f"{type(t).__name__}")
    if t.dim() != 4 or tuple(t.shape[2:]) != dims:
        raise ValueError(f"{name}: expected [num_pages, page_size, H, D] with (H, D) = {dims}, "
                         f"got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from the step's {dtype}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the step is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: the pool must be contiguous (pages are addressed as rows)")


def _table(name: str, t, batch: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 tensor [B, max_pages], got {type(t).__name__}")
    if t.dtype != I32 or t.dim() != 2 or t.shape[0] != batch or t.shape[1] < 1:
        raise ValueError(f"{name}: expected an int32 tensor [B={batch}, max_pages >= 1], got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the step is on {device}")


def check_paged(spec, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table, cmp_block_table,
                seq_lens, batch: int, dtype, device) -> int:
    """Check the pools, tables and lengths of one paged step by name; return the page size."""
    if spec.kv_per_branch == "separate" and spec.has("win"):
        raise ValueError("paged decoding keeps one k, v per token; this spec's window branch has "
                         "its own (kv_per_branch: separate): use op.new_cache")
    H = spec.heads_kv
    _pool("k_pages", k_pages, (H, spec.dim_qk), dtype, device)
    _pool("v_pages", v_pages, (H, spec.dim_v), dtype, device)
    page = k_pages.shape[1]
    if v_pages.shape[:2] != k_pages.shape[:2]:
        raise ValueError(f"v_pages: {tuple(v_pages.shape[:2])} pages x tokens differ from "
                         f"k_pages' {tuple(k_pages.shape[:2])}")
    _table("block_table", block_table, batch, device)
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype != I32 or \
            tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"seq_lens: expected an int32 tensor [B={batch}], got "
                         f"{_describe(seq_lens)}")
    if seq_lens.device != device:
        raise ValueError(f"seq_lens: on {seq_lens.device}, but the step is on {device}")
    if spec.has("cmp") or spec.has("slc"):
        _pool("k_cmp_pages", k_cmp_pages, (H, spec.dim_qk), dtype, device)
        _pool("v_cmp_pages", v_cmp_pages, (H, spec.dim_v), dtype, device)
        for name, t in (("k_cmp_pages", k_cmp_pages), ("v_cmp_pages", v_cmp_pages)):
            if t.shape[1] != page:
                raise ValueError(f"{name}: pages of {t.shape[1]} tokens, but k_pages' hold "
                                 f"{page}: compressed pools page the same way")
        _table("cmp_block_table", cmp_block_table, batch, device)
        need = spec.num_cmp(block_table.shape[1] * page)
        if cmp_block_table.shape[1] * page < need:
            raise ValueError(f"cmp_block_table: {cmp_block_table.shape[1]} pages of {page} hold "
                             f"fewer than the {need} compressed tokens block_table's "
                             f"{block_table.shape[1] * page} positions emit")
    return page


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def gather_pages(pages: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The contiguous cache [B, max_pages * page_size, H, D] a page table describes (a copy)."""
    B, n = table.shape
    return pages[table.long().clamp(min=0)].reshape(B, n * pages.shape[1], *pages.shape[2:])


class PagedSteps:
    """What paged steps of one op reuse between calls: the split choice and the workspace per
    (batch, capacity, device), so a step allocates only its output."""

    def __init__(self, op: NSAOp):
        self.op = op
        self._state: dict = {}

    def state(self, batch: int, max_len: int, device: torch.device) -> tuple[dict, dict, dict]:
        key = (batch, max_len, device)
        if key not in self._state:
            op, spec = self.op, self.op.spec
            tuned_cfg, tuned_splits = {}, {}
            if device.type == "cuda":
                op.configs_for(device, max_len)
                tuned_cfg, tuned_splits = tables.decode_configs_for(op.tuned_tables, batch,
                                                                    max_len)
            splits = decode_splits(spec, batch, max_len,
                                   current(device if device.type == "cuda" else None))
            splits.update(tuned_splits)
            work = op.module.decode_workspace(batch, max_len, splits, device)
            self._state[key] = (splits, work, tuned_cfg)
        return self._state[key]

    def append(self, k_t, v_t, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table,
               cmp_block_table, seq_lens, k_cmp_t=None, v_cmp_t=None) -> None:
        """Write token seq_lens[b] - 1 of every sequence (k_t, v_t [B, H, D]) into its page and
        emit the compressed token its length completes (mean of the last l tokens, or the
        given learned k_cmp_t, v_cmp_t [B, H, D]). With S new tokens per sequence (k_t, v_t
        [B, S, H, D], seq_lens counting all of them) they are written in order, one launch
        each."""
        spec = self.op.spec
        if isinstance(k_t, torch.Tensor) and k_t.dim() == 4:
            B, S = k_t.shape[:2]
            toks = [tuple(_token_of(t, s, B, S) for t in (k_t, v_t, k_cmp_t, v_cmp_t))
                    for s in range(S)]
            for tok in toks:
                check_token(spec, *tok, B)
            check_paged(spec, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table,
                        cmp_block_table, seq_lens, B, k_t.dtype, k_t.device)
            for s, (kt, vt, kct, vct) in enumerate(toks):
                self.append(kt, vt, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table,
                            cmp_block_table, seq_lens - (S - 1 - s), kct, vct)
            return None
        B = _batch(k_t, "k_t")
        check_token(spec, k_t, v_t, k_cmp_t, v_cmp_t, B)
        page = check_paged(spec, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table,
                           cmp_block_table, seq_lens, B, k_t.dtype, k_t.device)
        uses_cmp = spec.has("cmp") or spec.has("slc")
        if not kernels_available(k_t.device) or interpreted_in_float32(k_t):
            return _append_torch(spec, k_t, v_t, k_pages, v_pages, k_cmp_pages, v_cmp_pages,
                                 block_table, cmp_block_table, seq_lens, k_cmp_t, v_cmp_t, page)
        mod = self.op.module
        pages = mod.decode_pages(block_table, cmp_block_table if uses_cmp else block_table, page)
        kc = mod.pool_view(k_cmp_pages, B) if uses_cmp else None
        vc = mod.pool_view(v_cmp_pages, B) if uses_cmp else None
        with direct_launches():
            mod.launch_decode_append(k_t, v_t, mod.pool_view(k_pages, B),
                                     mod.pool_view(v_pages, B), kc, vc, seq_lens, k_cmp_t,
                                     v_cmp_t, pages=pages, counted=True)

    def decode(self, q, gates, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table,
               cmp_block_table, seq_lens, q_cmp=None) -> torch.Tensor:
        """o [B, HQ, Dv] of q [B, HQ, Dk] at position seq_lens[b] - 1 of each sequence: equal to
        that row of the prefill. With S new tokens per sequence (q [B, S, HQ, Dk], gates
        [B, S, HQ, 3]) token s is at position seq_lens[b] - S + s and sees the tokens up to
        it: o [B, S, HQ, Dv], every query attending at once. `q_cmp` (the shape of q; default
        q) is the query of the compressed branch and the block scores."""
        spec = self.op.spec
        if isinstance(q, torch.Tensor) and q.dim() == 4:
            B, S = q.shape[:2]
            for s in range(S):
                check_query(spec, q[:, s], _token_of(gates, s, B, S), B)
                if q_cmp is not None:
                    check_query(spec, _token_of(q_cmp, s, B, S), None, B)
            check_paged(spec, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table,
                        cmp_block_table, seq_lens, B, q.dtype, q.device)
            lens = (seq_lens[:, None] - S + 1
                    + torch.arange(S, dtype=I32, device=q.device)).reshape(-1)
            tables = [None if t is None else t.repeat_interleave(S, 0)
                      for t in (block_table, cmp_block_table)]
            o = self.decode(q.reshape(B * S, *q.shape[2:]),
                            None if gates is None else gates.reshape(B * S, *gates.shape[2:]),
                            k_pages, v_pages, k_cmp_pages, v_cmp_pages, *tables, lens,
                            None if q_cmp is None else q_cmp.reshape(B * S, *q_cmp.shape[2:]))
            return o.view(B, S, *o.shape[1:])
        B = _batch(q, "q")
        check_query(spec, q, gates, B)
        if q_cmp is not None:
            check_query(spec, q_cmp, None, B)
            if q_cmp.dtype != q.dtype or q_cmp.device != q.device:
                raise TypeError(f"q_cmp: expected {q.dtype} on {q.device}, got {q_cmp.dtype} on "
                                f"{q_cmp.device}")
        page = check_paged(spec, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table,
                           cmp_block_table, seq_lens, B, q.dtype, q.device)
        uses_cmp = spec.has("cmp") or spec.has("slc")
        if not kernels_available(q.device):
            kc = gather_pages(k_cmp_pages, cmp_block_table) if uses_cmp else None
            vc = gather_pages(v_cmp_pages, cmp_block_table) if uses_cmp else None
            return reference.nsa_decode_step(q, gather_pages(k_pages, block_table),
                                             gather_pages(v_pages, block_table), gates, spec,
                                             kc, vc, cache_seqlens=seq_lens, q_cmp=q_cmp)
        mod = self.op.module
        max_len = block_table.shape[1] * page
        splits, work, tuned = self.state(B, max_len, q.device)
        cfg = dict(tuned)
        cfg.update(self.op.configs)
        dtype = q.dtype
        pools = [k_pages, v_pages, k_cmp_pages if uses_cmp else k_pages,
                 v_cmp_pages if uses_cmp else v_pages]
        if interpreted_in_float32(q):     # the interpreter's bfloat16 is wrong: float32 copies
            q, gates = q.float(), None if gates is None else gates.float()
            q_cmp = None if q_cmp is None else q_cmp.float()
            pools = [p.float() for p in pools]
        k, v, kc, vc = (mod.pool_view(p, B) for p in pools)
        pages = mod.decode_pages(block_table, cmp_block_table if uses_cmp else block_table, page)
        with direct_launches():
            o, _ = mod.decode_step(q.contiguous(), None if gates is None else gates.contiguous(),
                                   k, v, kc if uses_cmp else None, vc if uses_cmp else None,
                                   seq_lens, splits, work, configs=cfg, pages=pages,
                                   q_cmp=None if q_cmp is None else q_cmp.contiguous())
        return o.to(dtype)


def _token_of(t, s: int, B: int, S: int):
    """Token s of a [B, S, ...] step tensor (None stays None)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[:2]) != (B, S):
        raise ValueError(f"expected every step tensor as [B={B}, S={S}, ...], got "
                         f"{_describe(t)}")
    return t[:, s]


def check_query(spec, q, gates, B: int) -> None:
    """Refuse a step's q [B, HQ, Dk] or gates [B, HQ, 3] by name."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q: expected a torch.Tensor [B, HQ, Dk], got {type(q).__name__}")
    if tuple(q.shape) != (B, spec.heads_q, spec.dim_qk):
        raise ValueError(f"q: expected [B, HQ, Dk] = {(B, spec.heads_q, spec.dim_qk)}, got "
                         f"{tuple(q.shape)}")
    if gates is not None and (not isinstance(gates, torch.Tensor) or
                              tuple(gates.shape) != (B, spec.heads_q, 3)):
        raise ValueError(f"gates: expected [B, HQ, 3] = {(B, spec.heads_q, 3)}, got "
                         f"{_describe(gates)}")
    if gates is not None and (gates.dtype != q.dtype or gates.device != q.device):
        raise TypeError(f"gates: expected {q.dtype} on {q.device}, got {gates.dtype} on "
                        f"{gates.device}")


def _batch(t, name: str) -> int:
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        raise ValueError(f"{name}: expected a 3-d tensor [B, heads, D], got {_describe(t)}")
    return t.shape[0]


def check_token(spec, k_t, v_t, k_cmp_t, v_cmp_t, B: int) -> None:
    """Refuse a step's new token k_t, v_t [B, H, D] (and compressed k_cmp_t, v_cmp_t) by name."""
    H = spec.heads_kv
    for name, t, d in (("k_t", k_t, spec.dim_qk), ("v_t", v_t, spec.dim_v),
                       ("k_cmp_t", k_cmp_t, spec.dim_qk), ("v_cmp_t", v_cmp_t, spec.dim_v)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, H, d):
            raise ValueError(f"{name}: expected [B, H, D] = {(B, H, d)}, got {_describe(t)}")
        if t.dtype != k_t.dtype or t.device != k_t.device:
            raise TypeError(f"{name}: expected {k_t.dtype} on {k_t.device}, got {t.dtype} on "
                            f"{t.device}")
    if spec.learned_compression and spec.reads_cmp and (k_cmp_t is None or v_cmp_t is None):
        raise ValueError("k_cmp_t, v_cmp_t: required for a learned compression spec")
    if not spec.learned_compression and (k_cmp_t is not None or v_cmp_t is not None):
        raise ValueError("k_cmp_t, v_cmp_t: only accepted for a learned compression spec "
                         "(mean compression is computed from the pages)")


def _append_torch(spec, k_t, v_t, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table,
                  cmp_block_table, seq_lens, k_cmp_t, v_cmp_t, page: int) -> None:
    """The paged append in PyTorch (no kernels here, or bfloat16 under the interpreter)."""
    B = k_t.shape[0]
    rows = torch.arange(B, device=k_t.device)
    n = seq_lens.long()
    pos = n - 1

    def at(table, p):
        return table[rows, p // page].long(), p % page

    pg, off = at(block_table, pos)
    k_pages[pg, off] = k_t
    v_pages[pg, off] = v_t
    if not (spec.has("cmp") or spec.has("slc")):
        return
    L, d = spec.cmp_block, spec.cmp_stride
    emit = (n >= L) & ((n - L) % d == 0)
    if not bool(emit.any()):
        return
    ci = torch.clamp(n - L, min=0) // d
    if spec.learned_compression:
        new_k, new_v = k_cmp_t, v_cmp_t
    else:
        win = torch.clamp(pos[:, None] - torch.arange(L, device=k_t.device), min=0)
        wp, wo = block_table[rows[:, None], win // page].long(), win % page
        new_k = k_pages[wp, wo].float().mean(1).to(k_pages.dtype)
        new_v = v_pages[wp, wo].float().mean(1).to(v_pages.dtype)
    cp, co = at(cmp_block_table, ci)
    sel = emit.nonzero()[:, 0]
    k_cmp_pages[cp[sel], co[sel]] = new_k[sel]
    v_cmp_pages[cp[sel], co[sel]] = new_v[sel]


def to_pages(cache, page_size: int, shuffle: bool = True, seed: int = 0):
    """The tokens of a contiguous DecodeCache as page pools and tables (for benchmarks, tests,
    and moving a cache into an engine's pools): returns (k_pages, v_pages, k_cmp_pages,
    v_cmp_pages, block_table, cmp_block_table, seq_lens). Every sequence gets all the pages its
    capacity needs, handed out in a shuffled order unless `shuffle` is False."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size: expected a positive integer, got {str(page_size)[:40]}")
    B, dev = cache.batch, cache.k.device
    n_raw = -(-cache.max_len // page_size)
    n_cmp = -(-max(1, cache.spec.num_cmp(n_raw * page_size)) // page_size)
    total = B * (n_raw + n_cmp)
    order = (torch.randperm(total, generator=torch.Generator().manual_seed(seed)) if shuffle
             else torch.arange(total)).to(I32).to(dev)
    table = order[:B * n_raw].view(B, n_raw).contiguous()
    cmp_table = order[B * n_raw:].view(B, n_cmp).contiguous()
    out = []
    for src, tab in ((cache.k, table), (cache.v, table), (cache.k_cmp, cmp_table),
                     (cache.v_cmp, cmp_table)):
        pool = torch.zeros(total, page_size, *src.shape[2:], dtype=src.dtype, device=dev)
        n = min(src.shape[1], tab.shape[1] * page_size)
        pos = torch.arange(n, device=dev)
        for b in range(B):
            pool[tab[b, pos // page_size].long(), pos % page_size] = src[b, :n]
        out.append(pool)
    return (*out, table, cmp_table, cache.lens.clone())
