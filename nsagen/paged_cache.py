"""A paged decode cache for users without a serving engine: page pools shared by sequences that
join, fork and leave between steps (continuous batching), on top of `op.append_paged` and
`op.decode_paged` (nsagen.paged, docs/serving.md).

The page bookkeeping (free lists, reference counts, copy-on-write of a shared partial page)
lives on the host; each step sends the page tables of the sequences it decodes to the device
(a few hundred bytes). Engines that capture steps in CUDA graphs call the functional ops with
tables they keep on the device themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import reference
from .paged import check_query, check_token

I32 = torch.int32


@dataclass
class _Sequence:
    pages: list = field(default_factory=list)       # raw pages, in position order
    cmp_pages: list = field(default_factory=list)   # compressed pages, in index order
    length: int = 0


class _Pages:
    """A free list and reference counts over `n` pages of one pool."""

    def __init__(self, n: int):
        self.free = list(range(n - 1, -1, -1))
        self.refs = [0] * n

    def take(self) -> int:
        page = self.free.pop()
        self.refs[page] = 1
        return page

    def share(self, page: int) -> None:
        self.refs[page] += 1

    def drop(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self.free.append(page)


class PagedCache:
    """Sequences of an NSA op in shared page pools of `page_size` tokens. `num_pages` raw pages
    (and by default enough compressed pages for them) hold every sequence; `max_len` bounds one
    sequence (the page tables' width)."""

    def __init__(self, op, num_pages: int, page_size: int, max_len: int, device=None,
                 dtype: torch.dtype | None = None, num_cmp_pages: int | None = None):
        spec = op.spec
        for name, val in (("num_pages", num_pages), ("page_size", page_size),
                          ("max_len", max_len)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive integer, got {str(val)[:40]}")
        if spec.kv_per_branch == "separate" and spec.has("win"):
            raise ValueError("PagedCache keeps one k, v per token; this spec's window branch has "
                             "its own (kv_per_branch: separate): use op.new_cache")
        self.op, self.spec, self.page_size = op, spec, page_size
        self.device = torch.device(device or "cpu")
        self.dtype = dtype or getattr(torch, spec.dtype)
        self.max_pages = -(-max_len // page_size)
        self.max_cmp_pages = -(-max(1, spec.num_cmp(self.max_pages * page_size)) // page_size)
        if num_cmp_pages is None:       # compressed tokens are about 1/d of the raw ones
            num_cmp_pages = -(-num_pages // spec.cmp_stride) + num_pages // self.max_pages + 1
        H = spec.heads_kv

        def pool(n, d):
            return torch.zeros(n, page_size, H, d, dtype=self.dtype, device=self.device)

        self.k_pages, self.v_pages = pool(num_pages, spec.dim_qk), pool(num_pages, spec.dim_v)
        self.k_cmp_pages = pool(num_cmp_pages, spec.dim_qk)
        self.v_cmp_pages = pool(num_cmp_pages, spec.dim_v)
        self._raw, self._cmp = _Pages(num_pages), _Pages(num_cmp_pages)
        self._seqs: dict[int, _Sequence] = {}
        self._next_id = 0

    # ------------------------------------------------------------------ sequences
    @property
    def free_pages(self) -> tuple[int, int]:
        """(raw, compressed) pages not held by any sequence."""
        return len(self._raw.free), len(self._cmp.free)

    def length(self, seq: int) -> int:
        return self._get(seq).length

    def add(self, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor | None = None,
            v_cmp: torch.Tensor | None = None) -> int:
        """A new sequence holding the prompt k [T, H, Dk], v [T, H, Dv] (T >= 0), and for a
        learned compression spec its compressed tokens k_cmp, v_cmp [Nc(T), H, D]. Returns the
        sequence's id."""
        spec = self.spec
        T = self._check_rows("k", k, spec.dim_qk)
        if self._check_rows("v", v, spec.dim_v) != T:
            raise ValueError(f"v: {v.shape[0]} tokens, but k has {T}")
        if T > self.max_pages * self.page_size:
            raise ValueError(f"prompt of {T} tokens exceeds max_len "
                             f"{self.max_pages * self.page_size}")
        nc = spec.num_cmp(T)
        if spec.learned_compression and spec.reads_cmp:
            if k_cmp is None or v_cmp is None:
                raise ValueError("k_cmp, v_cmp: required for a learned compression spec")
            for name, t, d in (("k_cmp", k_cmp, spec.dim_qk), ("v_cmp", v_cmp, spec.dim_v)):
                if self._check_rows(name, t, d) != nc:
                    raise ValueError(f"{name}: expected Nc(T) = {nc} compressed tokens, got "
                                     f"{t.shape[0]}")
        elif (k_cmp is not None or v_cmp is not None) and not spec.learned_compression:
            raise ValueError("k_cmp, v_cmp: only accepted for a learned compression spec")
        P = self.page_size
        n_raw, n_cmp = -(-T // P), -(-nc // P)
        self._need(n_raw, n_cmp)
        seq = _Sequence(pages=[self._raw.take() for _ in range(n_raw)],
                        cmp_pages=[self._cmp.take() for _ in range(n_cmp)], length=T)
        if T:
            self._write(self.k_pages, seq.pages, k)
            self._write(self.v_pages, seq.pages, v)
        if nc and spec.reads_cmp:   # no branch reads compressed tokens: none are kept
            if not spec.learned_compression:
                # in float32, as the append kernel averages
                k_cmp = reference.mean_compress(k[None].float(), spec)[0].to(self.dtype)
                v_cmp = reference.mean_compress(v[None].float(), spec)[0].to(self.dtype)
            self._write(self.k_cmp_pages, seq.cmp_pages, k_cmp)
            self._write(self.v_cmp_pages, seq.cmp_pages, v_cmp)
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = seq
        return sid

    def fork(self, seq: int) -> int:
        """A new sequence continuing from `seq`'s tokens: full pages are shared, a partly filled
        last page is copied (each branch then writes its own)."""
        src = self._get(seq)
        P = self.page_size
        partial = src.length % P != 0
        nc = self.spec.num_cmp(src.length)
        cmp_partial = nc % P != 0
        self._need(int(partial), int(cmp_partial))
        out = _Sequence(length=src.length)
        for pool_k, pool_v, alloc, pages, dst, last_partial in (
                (self.k_pages, self.v_pages, self._raw, src.pages, out.pages, partial),
                (self.k_cmp_pages, self.v_cmp_pages, self._cmp, src.cmp_pages, out.cmp_pages,
                 cmp_partial)):
            for i, page in enumerate(pages):
                if last_partial and i == len(pages) - 1:
                    new = alloc.take()
                    pool_k[new] = pool_k[page]
                    pool_v[new] = pool_v[page]
                    dst.append(new)
                else:
                    alloc.share(page)
                    dst.append(page)
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = out
        return sid

    def free(self, seq: int) -> None:
        """Remove a sequence; its pages return to the pools once no other sequence holds them."""
        s = self._seqs.pop(self._check_id(seq))
        for page in s.pages:
            self._raw.drop(page)
        for page in s.cmp_pages:
            self._cmp.drop(page)

    # ------------------------------------------------------------------ a step
    def decode(self, seqs: list[int], q: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
               gates: torch.Tensor | None = None, k_cmp_t: torch.Tensor | None = None,
               v_cmp_t: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of the sequences `seqs` (row b of every tensor is seqs[b]): append
        their new tokens k_t, v_t [B, H, D] (and for a learned compression spec the compressed
        tokens k_cmp_t, v_cmp_t for the rows whose length completes one), then attend with
        q [B, HQ, Dk]: o [B, HQ, Dv]. Checked before anything changes."""
        if len(set(seqs)) != len(seqs) or not seqs:
            raise ValueError("seqs: expected distinct sequence ids, at least one")
        states = [self._get(s) for s in seqs]
        P, spec = self.page_size, self.spec
        if any(s.length + 1 > self.max_pages * P for s in states):
            raise ValueError(f"a sequence would exceed max_len {self.max_pages * P}")
        # pages this step needs: a new page at a page boundary, a private copy of a shared
        # page it writes into, and the same for the compressed token it may emit
        plan = []
        for s in states:
            n = s.length + 1
            raw = (s.length // P, s.length % P == 0)
            emits = n >= spec.cmp_block and (n - spec.cmp_block) % spec.cmp_stride == 0
            ci = (n - spec.cmp_block) // spec.cmp_stride if emits else -1
            cmp = (ci // P, ci % P == 0) if emits and (spec.has("cmp") or spec.has("slc")) \
                else None
            plan.append((raw, cmp))
        need_raw = sum(1 for (j, new), _ in plan if new) + sum(
            1 for s, ((j, new), _) in zip(states, plan) if not new and self._raw.refs[s.pages[j]] > 1)
        need_cmp = sum(1 for _, c in plan if c is not None and c[1]) + sum(
            1 for s, (_, c) in zip(states, plan)
            if c is not None and not c[1] and self._cmp.refs[s.cmp_pages[c[0]]] > 1)
        self._need(need_raw, need_cmp)
        B = len(seqs)
        check_token(spec, k_t, v_t, k_cmp_t, v_cmp_t, B)
        check_query(spec, q, gates, B)
        for name, t in (("q", q), ("k_t", k_t)):
            if t.dtype != self.dtype or t.device != self.device:
                raise TypeError(f"{name}: expected {self.dtype} on {self.device} (the cache's), "
                                f"got {t.dtype} on {t.device}")
        table = torch.zeros(B, self.max_pages, dtype=I32)
        cmp_table = torch.zeros(B, self.max_cmp_pages, dtype=I32)
        lens = torch.empty(B, dtype=I32)
        for b, (s, ((j, new), cmp)) in enumerate(zip(states, plan)):
            if new:
                s.pages.append(self._raw.take())
            else:
                self._own(s.pages, j, self._raw, self.k_pages, self.v_pages)
            if cmp is not None:
                if cmp[1]:
                    s.cmp_pages.append(self._cmp.take())
                else:
                    self._own(s.cmp_pages, cmp[0], self._cmp, self.k_cmp_pages,
                              self.v_cmp_pages)
            s.length += 1
            table[b, :len(s.pages)] = torch.tensor(s.pages, dtype=I32)
            if s.cmp_pages:
                cmp_table[b, :len(s.cmp_pages)] = torch.tensor(s.cmp_pages, dtype=I32)
            lens[b] = s.length
        dev = self.device
        table, cmp_table, lens = table.to(dev), cmp_table.to(dev), lens.to(dev)
        pools = (self.k_pages, self.v_pages, self.k_cmp_pages, self.v_cmp_pages)
        self.op.append_paged(k_t, v_t, *pools, table, cmp_table, lens, k_cmp_t, v_cmp_t)
        return self.op.decode_paged(q, gates, *pools, table, cmp_table, lens)

    # ------------------------------------------------------------------ helpers
    def _own(self, pages: list, j: int, alloc: _Pages, pool_k, pool_v) -> None:
        """Copy-on-write: give the sequence its own copy of page j if another one holds it."""
        page = pages[j]
        if alloc.refs[page] > 1:
            new = alloc.take()
            pool_k[new] = pool_k[page]
            pool_v[new] = pool_v[page]
            alloc.drop(page)
            pages[j] = new

    def _need(self, raw: int, cmp: int) -> None:
        if raw > len(self._raw.free) or cmp > len(self._cmp.free):
            raise RuntimeError(f"out of pages: this needs {raw} raw and {cmp} compressed pages, "
                               f"{len(self._raw.free)} and {len(self._cmp.free)} are free")

    def _write(self, pool: torch.Tensor, pages: list, rows: torch.Tensor) -> None:
        P = self.page_size
        pos = torch.arange(rows.shape[0], device=self.device)
        idx = torch.tensor(pages, dtype=torch.long, device=self.device)
        pool[idx[pos // P], pos % P] = rows

    def _check_rows(self, name: str, t, d: int) -> int:
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or \
                tuple(t.shape[1:]) != (self.spec.heads_kv, d):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected [T, H, D] with (H, D) = "
                             f"{(self.spec.heads_kv, d)}, got {shape}")
        if t.device != self.device or t.dtype != self.dtype:
            raise TypeError(f"{name}: expected {self.dtype} on {self.device} (the cache's), got "
                            f"{t.dtype} on {t.device}")
        return t.shape[0]

    def _check_id(self, seq) -> int:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq not in self._seqs:
            raise KeyError(f"no sequence {str(seq)[:20]} in this cache")
        return seq

    def _get(self, seq) -> _Sequence:
        return self._seqs[self._check_id(seq)]
