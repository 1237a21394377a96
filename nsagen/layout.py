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
    tok_seq: torch.Tensor       # [Ntok] index of the token's sequence
    tok_kbase: torch.Tensor     # [Ntok] key row holding position 0 of the token's sequence
    tok_seqlen: torch.Tensor    # [Ntok] length of the token's sequence
    _tiles: dict = field(default_factory=dict, repr=False)
    _ncs: list = field(default_factory=list, repr=False)  # Nc per sequence

    @property
    def n_tok(self) -> int:
        return int(self.tok_pos.shape[0])

    def tiles(self, bt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query tiles of at most `bt` tokens that never cross a sequence: (first token, length)."""
        if bt not in self._tiles:
            _, _, start, length, _ = _chunks(self.seqlens, bt)
            t = torch.stack([start, length]).to(torch.int32).to(self.device)
            self._tiles[bt] = (t[0], t[1])
        return self._tiles[bt]

    def cmp_tiles(self, bc: int) -> tuple[torch.Tensor, ...]:
        """Tiles of at most `bc` compressed rows per sequence, for the backward of the compressed
        branch: (first packed row, index in the sequence, first token of the sequence, sequence
        length, rows in the tile)."""
        key = ("cmp", bc)
        if key not in self._tiles:
            seq, j, row0, nrows, _ = _chunks(self._ncs, bc)
            lens = torch.tensor(self.seqlens, dtype=torch.int64)
            tok0 = torch.cumsum(lens, 0) - lens
            t = torch.stack([row0, j * bc, tok0[seq], lens[seq], nrows]).to(torch.int32)
            t = t.to(self.device)
            self._tiles[key] = tuple(t[i] for i in range(5))
        return self._tiles[key]

    def blocks(self, lb: int) -> tuple[torch.Tensor, ...]:
        """Every selection block of every sequence: (first packed token, keys inside the
        sequence, position of the first key, first global block of each sequence). Global block
        ids count blocks across the packed sequences."""
        key = ("blocks", lb)
        if key not in self._tiles:
            _, j, tok0, nkeys, nb = _chunks(self.seqlens, lb)
            t = torch.stack([tok0, nkeys, j * lb]).to(torch.int32).to(self.device)
            self._tiles[key] = (t[0], t[1], t[2], (torch.cumsum(nb, 0) - nb).to(self.device))
        return self._tiles[key]

    def inverse_blocks(self, idx: torch.Tensor, lb: int) -> dict:
        """Key block -> the tokens that chose it, per KV head, from indices [Ntok, H, n].

        Built with device sorts (no host sync): `tokens` lists token ids grouped by
        (head, global block), `offsets`/`counts` [H * n_blocks] locate each group.
        """
        blk_tok0, blk_nkeys, blk_pos0, seq_first = self.blocks(lb)
        n_blocks = int(blk_tok0.numel())
        n_tok, H, n = idx.shape
        valid = idx >= 0
        gblk = seq_first[self.tok_seq.long()][:, None, None] + idx.long()
        head = torch.arange(H, device=idx.device)[None, :, None]
        key = torch.where(valid, head * n_blocks + gblk, torch.full_like(gblk, H * n_blocks))
        key = key.flatten()
        order = torch.sort(key, stable=True).indices
        tokens = (order // (H * n)).to(torch.int32)
        counts = torch.bincount(key, minlength=H * n_blocks + 1)[:H * n_blocks]
        offsets = torch.cumsum(counts, 0) - counts
        return dict(n_blocks=n_blocks, blk_tok0=blk_tok0, blk_nkeys=blk_nkeys, blk_pos0=blk_pos0,
                    tokens=tokens, counts=counts.to(torch.int32), offsets=offsets.to(torch.int32))


def _chunks(lens, size: int):
    """Split each of the packed sequences of `lens` into chunks of at most `size` rows.

    Returns, per chunk, (sequence, chunk index in it, first packed row, rows), and the chunks
    per sequence.
    """
    lens = torch.tensor(list(lens), dtype=torch.int64)
    per_seq = (lens + size - 1) // size
    seq = torch.repeat_interleave(torch.arange(len(lens)), per_seq)
    j = torch.arange(int(per_seq.sum())) - (torch.cumsum(per_seq, 0) - per_seq)[seq]
    start = (torch.cumsum(lens, 0) - lens)[seq] + j * size
    length = torch.clamp(lens[seq] - j * size, max=size)
    return seq, j, start, length, per_seq


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
    packed = torch.stack([tok_pos, cmp_start[seq_of_tok], ncs[seq_of_tok], seq_of_tok,
                          lens[seq_of_tok], tok_start[seq_of_tok]]).to(torch.int32)
    packed = packed.to(device)
    nb = max(spec.num_blocks(n) for n in seqlens)
    lay = Layout(
        seqlens=tuple(seqlens), device=device, tok_pos=packed[0], tok_cstart=packed[1],
        tok_ncmp=packed[2], cmp_src=cmp_src.to(torch.int32).to(device), n_cmp=int(ncs.sum()),
        nbp=max(16, triton.next_power_of_2(nb)), tok_seq=packed[3], tok_seqlen=packed[4],
        tok_kbase=packed[5])
    lay._ncs = [int(x) for x in ncs]
    return lay
