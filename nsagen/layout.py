"""Launch metadata for packed (varlen) batches: where each token and compressed token lives.

Every generated kernel works on packed sequences: a [B, T] batch is viewed as B sequences of
length T laid end to end, exactly like a `cu_seqlens` batch. This module turns the per-sequence
lengths into the small int32 tables the kernels index with.

A batch of equal lengths (no `cu_seqlens`) gets its tables from `arange` arithmetic on the
device, using nothing but the shape: that path is traceable by torch.compile (also with
symbolic lengths) and costs no host-to-device copy. Ragged batches are built on the host from
the lengths and copied once (cached by lengths).

Queries may be fewer than keys (`qlens`): sequence b then has `seqlens[b]` keys and its
`qlens[b]` queries are its last positions (FlashAttention's bottom-right causal alignment), as
when a chunk of a sequence attends its whole prefix (context parallelism, chunked prefill).
Query rows and key rows are then two packings: `tok_*` tables and `tiles` index query rows,
`key_*` tables and `key_tiles` index key rows. With equal lengths the two coincide.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .dsa_spec import DSASpec
from .launch import tracing
from .spec import Spec

I32 = torch.int32


@dataclass
class Layout:
    """Per-token and per-tile tables for one packed batch."""

    seqlens: tuple              # length of each sequence (ints, or SymInts while tracing)
    device: torch.device
    tok_pos: torch.Tensor       # [Ntok] position of each token inside its sequence
    tok_cstart: torch.Tensor    # [Ntok] first packed compressed row of the token's sequence
    tok_ncmp: torch.Tensor      # [Ntok] Nc of the token's sequence
    cmp_src: torch.Tensor       # [Nc_total] packed token index where each compressed window starts
    n_cmp: int                  # Nc_total
    nbp: int                    # power of two >= the most selection blocks of any sequence
    tok_seq: torch.Tensor       # [Ntok] index of the token's sequence
    tok_kbase: torch.Tensor     # [Ntok] key row holding position 0 of the token's sequence
    tok_seqlen: torch.Tensor    # [Ntok] length of the token's sequence
    ncs: tuple = ()             # Nc per sequence
    uniform: bool = False       # every sequence has the same length (tables from the shape)
    qlens: tuple = ()           # queries per sequence, its last positions (default: seqlens)
    key_pos: torch.Tensor | None = None     # [Nkey] position of each key row (default tok_pos)
    key_len: torch.Tensor | None = None     # [Nkey] its sequence's length (default tok_seqlen)
    key_qzero: torch.Tensor | None = None   # [Nkey] query row that position 0 would have
    key_qfirst: torch.Tensor | None = None  # [Nkey] first position that has a query
    key_cstart: torch.Tensor | None = None  # [Nkey] first packed compressed row of its sequence
    _tiles: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.qlens:
            self.qlens = self.seqlens
        if self.key_pos is None:    # queries are the keys' rows: key tables are the token tables
            self.key_pos, self.key_len, self.key_qzero = self.tok_pos, self.tok_seqlen, self.tok_kbase
            self.key_qfirst = torch.zeros_like(self.tok_pos)
            self.key_cstart = self.tok_cstart

    @property
    def suffix(self) -> bool:
        """Some sequence has fewer queries than keys."""
        return tuple(self.qlens) != tuple(self.seqlens)

    def _chunks(self, lens: tuple, size: int) -> tuple[torch.Tensor, ...]:
        """(sequence, chunk index in it, first packed row, rows, chunks per sequence) of every
        chunk of at most `size` rows, on the device."""
        if self.uniform:
            return _chunks_uniform(len(lens), lens[0], size, self.device)
        return tuple(t.to(self.device) for t in _chunks_host(lens, size))

    def tiles(self, bt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query tiles of at most `bt` tokens that never cross a sequence: (first query row,
        length)."""
        if bt not in self._tiles:
            _, _, start, length, _ = self._chunks(self.qlens, bt)
            self._tiles[bt] = (start.to(I32), length.to(I32))
        return self._tiles[bt]

    def key_tiles(self, bt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles of at most `bt` keys that never cross a sequence: (first key row, length)."""
        if not self.suffix:
            return self.tiles(bt)
        key = ("keys", bt)
        if key not in self._tiles:
            _, _, start, length, _ = self._chunks(self.seqlens, bt)
            self._tiles[key] = (start.to(I32), length.to(I32))
        return self._tiles[key]

    def cmp_tiles(self, bc: int) -> tuple[torch.Tensor, ...]:
        """Tiles of at most `bc` compressed rows per sequence, for the backward of the compressed
        branch: (first packed row, index in the sequence, the query row that position 0 of the
        sequence would have, sequence length, rows in the tile, first position with a query)."""
        key = ("cmp", bc)
        if key not in self._tiles:
            seq, j, row0, nrows, _ = self._chunks(self.ncs, bc)
            if self.uniform:
                tok0, lens = seq * self.seqlens[0], torch.full_like(seq, self.seqlens[0])
                first = torch.zeros_like(seq)
            else:
                lens = torch.tensor(self.seqlens, dtype=torch.int64, device=self.device)
                qlens = torch.tensor(self.qlens, dtype=torch.int64, device=self.device)
                first = (lens - qlens)[seq]
                tok0, lens = (torch.cumsum(qlens, 0) - qlens)[seq] - first, lens[seq]
            self._tiles[key] = tuple(t.to(I32) for t in (row0, j * bc, tok0, lens, nrows, first))
        return self._tiles[key]

    def blocks(self, lb: int) -> tuple[torch.Tensor, ...]:
        """Every selection block of every sequence: (first packed token, keys inside the
        sequence, position of the first key, first global block of each sequence). Global block
        ids count blocks across the packed sequences."""
        key = ("blocks", lb)
        if key not in self._tiles:
            _, j, tok0, nkeys, nb = self._chunks(self.seqlens, lb)
            self._tiles[key] = (tok0.to(I32), nkeys.to(I32), (j * lb).to(I32),
                                torch.cumsum(nb, 0) - nb)
        return self._tiles[key]


def _chunks_host(lens, size: int) -> tuple[torch.Tensor, ...]:
    """`Layout._chunks` for sequences of any lengths (ints), on the host."""
    lens = torch.tensor(list(lens), dtype=torch.int64)
    per_seq = (lens + size - 1) // size
    n = sum(-(-int(x) // size) for x in lens)
    seq = torch.repeat_interleave(torch.arange(len(lens)), per_seq, output_size=n)
    j = torch.arange(n) - (torch.cumsum(per_seq, 0) - per_seq)[seq]
    start = (torch.cumsum(lens, 0) - lens)[seq] + j * size
    length = torch.clamp(lens[seq] - j * size, max=size)
    return seq, j, start, length, per_seq


def _chunks_uniform(B, T, size: int, device) -> tuple[torch.Tensor, ...]:
    """`Layout._chunks` for B sequences of length T, from the shape alone."""
    per = (T + size - 1) // size
    c = torch.arange(B * per, device=device)
    seq = c // per
    j = c - seq * per
    return (seq, j, seq * T + j * size, torch.clamp(T - j * size, max=size),
            torch.full((B,), per, dtype=torch.int64, device=device))


def _pow2_at_least(n, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


_CACHE: "OrderedDict[tuple, Layout]" = OrderedDict()
_CACHE_SIZE = 16


def build_layout(spec: Spec | DSASpec, seqlens: tuple, device: torch.device,
                 qlens: tuple | None = None) -> Layout:
    """Tables for sequences of the given lengths, packed in order; `qlens` (default: seqlens)
    gives each sequence's queries, its last positions. Concrete lengths are cached (a training
    loop calls with the same lengths every step); while tracing, nothing is cached."""
    device = torch.device(device)
    qlens = None if qlens is None or tuple(qlens) == tuple(seqlens) else tuple(qlens)
    if qlens is not None:
        return _cached(("suffix", _geometry(spec), tuple(seqlens), qlens, str(device)),
                       lambda: _build_suffix(spec, tuple(seqlens), qlens, device))
    concrete = all(type(n) is int for n in seqlens) and not tracing()
    if not concrete:
        return _build(spec, tuple(seqlens), device)
    return _cached((_geometry(spec), tuple(seqlens), str(device)),
                   lambda: _build(spec, tuple(seqlens), device))


def _cached(key: tuple, make) -> Layout:
    """The layout under `key` in the small LRU cache, made by `make()` when missing."""
    lay = _CACHE.get(key)
    if lay is None:
        lay = make()
        _CACHE[key] = lay
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return lay


def _geometry(spec: Spec | DSASpec) -> tuple:
    """What a spec's tables depend on besides the lengths: NSA's compression and selection
    blocks; a DSA layer (no compressed tokens) only its family."""
    if spec.family == "dsa":
        return ("dsa",)
    return (spec.cmp_block, spec.cmp_stride, spec.slc_block)


def _build(spec: Spec | DSASpec, seqlens: tuple, device: torch.device,
           from_shape: bool | None = None) -> Layout:
    """The tables; `from_shape` (default: when all lengths are equal) picks the shape-only path.
    A DSA spec has no compressed tokens or selection blocks (Nc = 0 per sequence)."""
    B = len(seqlens)
    nsa = spec.family == "nsa"
    ncs = tuple(spec.num_cmp(n) if nsa else 0 for n in seqlens)
    nbp = _pow2_at_least(max(spec.num_blocks(n) for n in seqlens)) if nsa else 1
    stride = spec.cmp_stride if nsa else 1
    if from_shape is None:
        from_shape = all(n is seqlens[0] or n == seqlens[0] for n in seqlens)
    if from_shape:
        T, nc = seqlens[0], ncs[0]
        tok = torch.arange(B * T, device=device)
        seq = tok // T
        cmp = torch.arange(B * nc, device=device)
        cseq = cmp // nc if nc else cmp
        tables = dict(tok_pos=tok - seq * T, tok_cstart=seq * nc, tok_ncmp=torch.full_like(tok, nc),
                      tok_seq=seq, tok_seqlen=torch.full_like(tok, T), tok_kbase=seq * T,
                      cmp_src=cseq * T + (cmp - cseq * nc) * stride)
        tables = {k: t.to(I32) for k, t in tables.items()}
        return Layout(seqlens=tuple(seqlens), device=device, n_cmp=B * nc, nbp=nbp, ncs=ncs,
                      uniform=True, **tables)
    lens = torch.tensor(seqlens, dtype=torch.int64)
    nct = torch.tensor(ncs, dtype=torch.int64)
    tok_start = torch.cumsum(lens, 0) - lens
    cmp_start = torch.cumsum(nct, 0) - nct
    seq_of_tok = torch.repeat_interleave(torch.arange(B), lens, output_size=sum(seqlens))
    tok_pos = torch.arange(sum(seqlens)) - tok_start[seq_of_tok]
    seq_of_cmp = torch.repeat_interleave(torch.arange(B), nct, output_size=sum(ncs))
    cmp_idx = torch.arange(sum(ncs)) - cmp_start[seq_of_cmp]
    cmp_src = tok_start[seq_of_cmp] + cmp_idx * stride
    packed = torch.stack([tok_pos, cmp_start[seq_of_tok], nct[seq_of_tok], seq_of_tok,
                          lens[seq_of_tok], tok_start[seq_of_tok]]).to(I32).to(device)
    return Layout(seqlens=tuple(seqlens), device=device, tok_pos=packed[0], tok_cstart=packed[1],
                  tok_ncmp=packed[2], cmp_src=cmp_src.to(I32).to(device), n_cmp=sum(ncs),
                  nbp=nbp, tok_seq=packed[3], tok_seqlen=packed[4], tok_kbase=packed[5], ncs=ncs)


def _build_suffix(spec: Spec, klens: tuple, qlens: tuple, device: torch.device) -> Layout:
    """The tables of sequences with `klens` keys whose `qlens` queries are their last
    positions: query rows and key rows packed separately (built on the host)."""
    B = len(klens)
    ncs = tuple(spec.num_cmp(n) for n in klens)
    kl = torch.tensor(klens, dtype=torch.int64)
    ql = torch.tensor(qlens, dtype=torch.int64)
    nct = torch.tensor(ncs, dtype=torch.int64)
    k_start, q_start, c_start = (torch.cumsum(x, 0) - x for x in (kl, ql, nct))
    first = kl - ql                                   # position of each sequence's first query
    seq_q = torch.repeat_interleave(torch.arange(B), ql, output_size=sum(qlens))
    seq_k = torch.repeat_interleave(torch.arange(B), kl, output_size=sum(klens))
    seq_c = torch.repeat_interleave(torch.arange(B), nct, output_size=sum(ncs))
    tok_pos = torch.arange(sum(qlens)) - q_start[seq_q] + first[seq_q]
    key_pos = torch.arange(sum(klens)) - k_start[seq_k]
    cmp_src = k_start[seq_c] + (torch.arange(sum(ncs)) - c_start[seq_c]) * spec.cmp_stride
    q_tab = torch.stack([tok_pos, c_start[seq_q], nct[seq_q], seq_q, kl[seq_q],
                         k_start[seq_q]]).to(I32).to(device)
    k_tab = torch.stack([key_pos, kl[seq_k], (q_start - first)[seq_k],
                         first[seq_k], c_start[seq_k]]).to(I32).to(device)
    return Layout(seqlens=klens, device=device, tok_pos=q_tab[0], tok_cstart=q_tab[1],
                  tok_ncmp=q_tab[2], cmp_src=cmp_src.to(I32).to(device), n_cmp=sum(ncs),
                  nbp=_pow2_at_least(max(spec.num_blocks(n) for n in klens)),
                  tok_seq=q_tab[3], tok_seqlen=q_tab[4], tok_kbase=q_tab[5], ncs=ncs,
                  qlens=qlens, key_pos=k_tab[0], key_len=k_tab[1], key_qzero=k_tab[2],
                  key_qfirst=k_tab[3], key_cstart=k_tab[4])


def _lengths(cu: torch.Tensor) -> tuple[int, ...]:
    offs = cu.tolist()
    return tuple(b - a for a, b in zip(offs[:-1], offs[1:]))


def layout_of_call(spec: Spec | DSASpec, q: torch.Tensor, cu_seqlens: torch.Tensor | None,
                   cu_seqlens_k: torch.Tensor | None = None) -> Layout:
    """The layout inside a registered op: from q's shape alone when there is no cu_seqlens
    (traceable by torch.compile), else from the lengths read on the host; `cu_seqlens_k` gives
    the keys of sequences whose queries (cu_seqlens) are their last positions."""
    if cu_seqlens is None:
        return build_layout(spec, (q.shape[1],) * q.shape[0], q.device)
    qlens = _lengths(cu_seqlens)
    if cu_seqlens_k is None:
        return build_layout(spec, qlens, q.device)
    return build_layout(spec, _lengths(cu_seqlens_k), q.device, qlens=qlens)
