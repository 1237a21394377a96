"""Launch metadata for packed (varlen) batches: where each token and compressed token lives.

Every generated kernel works on packed sequences: a [B, T] batch is viewed as B sequences of
length T laid end to end, exactly like a `cu_seqlens` batch. This module turns the per-sequence
lengths into the small int32 tables the kernels index with (built once per call, on the host).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import triton

from .spec import Spec


@dataclass
class Layout:
    """Per-token and per-tile tables for one packed batch."""

    seqlens: tuple[int, ...]
    device: torch.device
    tok_pos: torch.Tensor       # [Ntok] position of each token inside its sequence
    tok_cstart: torch.Tensor    # [Ntok] first packed compressed row of the token's sequence
    tok_ncmp: torch.Tensor      # [Ntok] Nc of the token's sequence
    cmp_src: torch.Tensor       # [Nc_total] packed token index where each compressed window starts
    n_cmp: int                  # Nc_total
    nbp: int                    # power of two >= the most selection blocks of any sequence
    _tiles: dict = field(default_factory=dict, repr=False)

    @property
    def n_tok(self) -> int:
        return int(self.tok_pos.shape[0])

    def tiles(self, bt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query tiles of at most `bt` tokens that never cross a sequence: (first token, length)."""
        if bt not in self._tiles:
            lens = torch.tensor(self.seqlens, dtype=torch.int64)
            per_seq = (lens + bt - 1) // bt
            seq = torch.repeat_interleave(torch.arange(len(lens)), per_seq)
            k = torch.arange(int(per_seq.sum())) - (torch.cumsum(per_seq, 0) - per_seq)[seq]
            start = (torch.cumsum(lens, 0) - lens)[seq] + k * bt
            length = torch.clamp(lens[seq] - k * bt, max=bt)
            t = torch.stack([start, length]).to(torch.int32).to(self.device)
            self._tiles[bt] = (t[0], t[1])
        return self._tiles[bt]


_CACHE: "OrderedDict[tuple, Layout]" = OrderedDict()
_CACHE_SIZE = 16


def build_layout(spec: Spec, seqlens: tuple[int, ...], device: torch.device) -> Layout:
    """Tables for sequences of the given lengths, packed in order (cached: a training loop calls
    with the same lengths every step, and the tables cost a host-to-device copy)."""
    key = (spec.cmp_block, spec.cmp_stride, spec.slc_block, tuple(seqlens), str(device))
    lay = _CACHE.get(key)
    if lay is None:
        lay = _build(spec, tuple(seqlens), torch.device(device))
        _CACHE[key] = lay
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return lay


def _build(spec: Spec, seqlens: tuple[int, ...], device: torch.device) -> Layout:
    lens = torch.tensor(seqlens, dtype=torch.int64)
    ncs = torch.tensor([spec.num_cmp(n) for n in seqlens], dtype=torch.int64)
    tok_start = torch.cumsum(lens, 0) - lens
    cmp_start = torch.cumsum(ncs, 0) - ncs
    seq_of_tok = torch.repeat_interleave(torch.arange(len(seqlens)), lens)
    tok_pos = torch.arange(int(lens.sum())) - tok_start[seq_of_tok]
    seq_of_cmp = torch.repeat_interleave(torch.arange(len(seqlens)), ncs)
    cmp_idx = torch.arange(int(ncs.sum())) - cmp_start[seq_of_cmp]
    cmp_src = tok_start[seq_of_cmp] + cmp_idx * spec.cmp_stride
    packed = torch.stack([tok_pos, cmp_start[seq_of_tok], ncs[seq_of_tok]]).to(torch.int32)
    packed = packed.to(device)
    nb = max(spec.num_blocks(n) for n in seqlens)
    return Layout(
        seqlens=tuple(seqlens), device=device, tok_pos=packed[0], tok_cstart=packed[1],
        tok_ncmp=packed[2], cmp_src=cmp_src.to(torch.int32).to(device), n_cmp=int(ncs.sum()),
        nbp=max(16, triton.next_power_of_2(nb)))
