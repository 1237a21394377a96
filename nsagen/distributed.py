"""Context parallelism over a torch.distributed group (docs/distributed.md).

With W ranks a sequence of T tokens (T divisible by 2W) is cut into 2W chunks of C = T / 2W
tokens, and rank r holds chunks r and 2W - 1 - r, in that order: an early chunk and a late one,
so every rank has the same causal work. `shard` takes a rank's share of a full tensor and
`unshard` gathers the shares back into the full tensor on every rank.

`cp_attention` runs the op on each rank's queries: keys and values are all-gathered, each local
chunk attends its whole prefix (the op's `cu_seqlens_k`: queries that end their sequence), and in
the backward the keys' gradients are summed over the ranks and scattered back as shares.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _group_shape(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def zigzag_chunks(seq_len: int, world: int, rank: int) -> tuple[range, range]:
    """The positions rank `rank` of `world` holds: two ranges of seq_len / (2 world) tokens."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of a group of {world}: out of range")
    if seq_len % (2 * world):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x {world} ranks "
                         f"(the zig-zag split cuts it into {2 * world} equal chunks)")
    c = seq_len // (2 * world)
    late = 2 * world - 1 - rank
    return range(rank * c, (rank + 1) * c), range(late * c, (late + 1) * c)


def shard(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's zig-zag share of the full tensor x along `dim`: chunks r and 2W - 1 - r,
    concatenated (a new tensor)."""
    world, rank = _group_shape(group)
    early, late = zigzag_chunks(x.shape[dim], world, rank)
    return torch.cat([x.narrow(dim, early.start, len(early)),
                      x.narrow(dim, late.start, len(late))], dim)


def unshard(x_local: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """The full tensor on every rank from each rank's zig-zag share along `dim` (an
    all-gather)."""
    world, _ = _group_shape(group)
    if x_local.shape[dim] % 2:
        raise ValueError(f"x_local: a share holds two equal chunks along dim {dim}, got "
                         f"{x_local.shape[dim]} positions")
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local, group=group)
    c = x_local.shape[dim] // 2
    chunks: list = [None] * (2 * world)
    for r, part in enumerate(parts):
        chunks[r] = part.narrow(dim, 0, c)
        chunks[2 * world - 1 - r] = part.narrow(dim, c, c)
    return torch.cat(chunks, dim)


def _share_rows(x: torch.Tensor, world: int, rank: int, dim: int) -> torch.Tensor:
    early, late = zigzag_chunks(x.shape[dim], world, rank)
    return torch.cat([x.narrow(dim, early.start, len(early)),
                      x.narrow(dim, late.start, len(late))], dim)


def _sum_and_shard(g_full: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's partial gradient of a full tensor summed, this rank's share returned: a
    reduce-scatter of the shares laid out rank by rank (an all-reduce where a CPU backend lacks
    the reduce-scatter)."""
    world, rank = _group_shape(group)
    if world == 1:
        return g_full
    parts = torch.cat([_share_rows(g_full, world, r, dim) for r in range(world)], dim)
    parts = parts.movedim(dim, 0).contiguous()
    out = parts.new_empty(parts.shape[0] // world, *parts.shape[1:])
    try:
        dist.reduce_scatter_tensor(out, parts, group=group)
    except (RuntimeError, NotImplementedError):
        if dist.get_backend(group) == "nccl":
            raise
        g_full = g_full.contiguous()    # older gloo: every rank refuses alike before sending
        dist.all_reduce(g_full, group=group)
        return _share_rows(g_full, world, rank, dim)
    return out.movedim(0, dim)


class _Gather(torch.autograd.Function):
    """unshard with a gradient: the full tensor from the shares. Backward returns this rank's
    share of the full tensor's gradient, summed over the ranks first when each rank holds only
    its part of it (`summed`), taken as is when every rank holds the whole."""

    @staticmethod
    def forward(ctx, x_local, group, dim, summed):
        ctx.group, ctx.dim, ctx.summed = group, dim, summed
        return unshard(x_local, group, dim)

    @staticmethod
    def backward(ctx, g):
        if ctx.summed:
            return _sum_and_shard(g, ctx.group, ctx.dim), None, None, None
        world, rank = _group_shape(ctx.group)
        return _share_rows(g, world, rank, ctx.dim), None, None, None


def gather(x_local: torch.Tensor, group=None, dim: int = 1, grad: str = "partial") -> torch.Tensor:
    """The full tensor from every rank's share, differentiable. `grad` says what each rank's
    gradient of the full tensor is: "partial" (its own queries' part: summed over the ranks,
    a reduce-scatter) or "whole" (already the whole gradient on every rank, e.g. after a
    replicated input's all-reduce: this rank's share is taken as is)."""
    if grad not in ("partial", "whole"):
        raise ValueError(f"grad: expected 'partial' or 'whole', got {str(grad)[:40]!r}")
    return _Gather.apply(x_local, group, dim, grad == "partial")


@dataclass(frozen=True)
class Piece:
    """A run of one rank's query rows inside one sequence: its `n_q` queries (local rows from
    `q_row`) are the last positions of the prefix of `n_k` keys that starts at full row
    `k_row`; the sequence's compressed tokens start at row `c_row`."""

    q_row: int
    n_q: int
    k_row: int
    n_k: int
    c_row: int


def pieces(seqlens: tuple[int, ...], world: int, rank: int, spec,
           packed: bool = False) -> list[Piece]:
    """The runs of rank `rank`'s zig-zag share of sequences of `seqlens` tokens, in the order of
    its local rows. The sequences are batch rows, each split on its own, or with `packed` varlen
    sequences laid end to end (cu_seqlens), whose packed stream is split."""
    out: list[Piece] = []
    rows = 0
    if packed:
        streams = [(0, tuple(seqlens))]
    else:
        streams = [(b * seqlens[0], (seqlens[0],)) for b in range(len(seqlens))]
    c_row = 0
    for start, lens in streams:
        total = sum(lens)
        starts = [start + sum(lens[:i]) for i in range(len(lens))]
        c_starts = []
        for n in lens:
            c_starts.append(c_row)
            c_row += spec.num_cmp(n) if spec.family == "nsa" else 0
        for chunk in zigzag_chunks(total, world, rank):
            g0, g1 = start + chunk.start, start + chunk.stop
            for st, n, cs in zip(starts, lens, c_starts):
                a, b = max(g0, st), min(g1, st + n)
                if a < b:
                    out.append(Piece(q_row=rows, n_q=b - a, k_row=st, n_k=b - st, c_row=cs))
                    rows += b - a
    return out


def _rows(spans, device) -> torch.Tensor:
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in spans])


def _cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32,
                        device=device)


def cp_attention(op, group, q, k, v, gates=None, k_cmp=None, v_cmp=None, cu_seqlens=None,
                 k_win=None, v_win=None, q_cmp=None) -> torch.Tensor:
    """The op with context parallelism: q, k, v, gates, q_cmp, k_win, v_win are this rank's
    zig-zag shares [B, T / W, ...] of the full sequences; learned k_cmp, v_cmp are the full
    tensors on every rank; cu_seqlens (B = 1) packs the full batch. Returns this rank's share of
    the output, equal to the single-device op's. The shares' gradients equal the single-device
    gradients' shares (the keys' parts are summed over the ranks); k_cmp and v_cmp get this
    rank's part of their gradient, as a replicated parameter does: the ranks' parts sum to the
    single-device gradient (compute them from `gather(k)` and that sum happens there)."""
    world, rank = _group_shape(group)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("cp_group: q and k must be 4-d shares [B, T / W, heads, dim]")
    B, Tl = q.shape[:2]
    if Tl % 2:
        raise ValueError(f"cp_group: a share holds two equal chunks, got {Tl} positions")
    for name, t in (("k", k), ("v", v), ("gates", gates), ("q_cmp", q_cmp), ("k_win", k_win),
                    ("v_win", v_win)):
        if t is not None and tuple(t.shape[:2]) != (B, Tl):
            raise ValueError(f"cp_group: {name} must be a share [B={B}, {Tl}, ...] like q, got "
                             f"{tuple(t.shape)[:4]}")
    T = Tl * world
    if cu_seqlens is None:
        seqlens = (T,) * B
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens: requires batch size 1 (packed sequences), got B={B}")
        offs = cu_seqlens.tolist()
        if len(offs) < 2 or offs[0] != 0 or offs[-1] != T:
            raise ValueError(f"cu_seqlens: must run from 0 to the full packed length {T}")
        seqlens = tuple(b - a for a, b in zip(offs[:-1], offs[1:]))
    runs = pieces(seqlens, world, rank, op.spec, packed=cu_seqlens is not None)
    dev = q.device

    def keys(x):   # this rank's key rows (every run's prefix) of a gathered share
        full = gather(x, group, 1).flatten(0, 1)
        return full[_rows([(p.k_row, p.n_k) for p in runs], dev)].unsqueeze(0)

    def rows_of(x):
        return None if x is None else x.reshape(1, B * Tl, *x.shape[2:])

    kc = vc = None
    if k_cmp is not None:
        spec = op.spec
        crows = _rows([(p.c_row, spec.num_cmp(p.n_k)) for p in runs], dev)
        kc = k_cmp.flatten(0, 1)[crows].unsqueeze(0)
        vc = v_cmp.flatten(0, 1)[crows].unsqueeze(0)
    o = op(rows_of(q), keys(k), keys(v), rows_of(gates), kc, vc,
           cu_seqlens=_cu([p.n_q for p in runs], dev),
           k_win=None if k_win is None else keys(k_win),
           v_win=None if v_win is None else keys(v_win), q_cmp=rows_of(q_cmp),
           cu_seqlens_k=_cu([p.n_k for p in runs], dev))
    return o.view(B, Tl, *o.shape[2:])


def share_positions(pos_full: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's share of a [T] position table (the positions of its local rows)."""
    world, rank = _group_shape(group)
    return _share_rows(pos_full, world, rank, 0)


__all__ = ["cp_attention", "gather", "pieces", "shard", "share_positions", "unshard",
           "zigzag_chunks"]
