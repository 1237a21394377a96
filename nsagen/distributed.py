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

from .checks import check_cu_seqlens


# newer torch names the tensor collectives *_single (the old names warn there); older has only those
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
    return _share_rows(x, world, rank, dim)


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
    reduce-scatter of the shares laid out rank by rank."""
    world, _ = _group_shape(group)
    if world == 1:
        return g_full
    parts = torch.cat([_share_rows(g_full, world, r, dim) for r in range(world)], dim)
    return _reduce_scatter_rows(parts.movedim(dim, 0).contiguous(), group).movedim(0, dim)


class _Gather(torch.autograd.Function):
    """unshard with a gradient: the full tensor from the shares. Each rank's gradient of the
    full tensor is its own part (from its queries); backward sums the parts over the ranks and
    returns this rank's share."""

    @staticmethod
    def forward(ctx, x_local, group, dim):
        ctx.group, ctx.dim = group, dim
        return unshard(x_local, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _sum_and_shard(g, ctx.group, ctx.dim), None, None


def gather(x_local: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """The full tensor from every rank's share along `dim`, differentiable: the ranks' gradients
    of the full tensor are summed and each rank gets its share back (a reduce-scatter)."""
    return _Gather.apply(x_local, group, dim)


@dataclass(frozen=True)
class Piece:
    """A run of one rank's query rows inside one sequence: its `n_q` queries are the last
    positions of the prefix of `n_k` keys that starts at position `k_pos` of batch row `b` (of
    the packed stream with cu_seqlens); the sequence's compressed tokens start at row `c_row`.
    `late`: the run lies in the rank's late chunk."""

    n_q: int
    b: int
    k_pos: int
    n_k: int
    c_row: int
    late: bool


def pieces(seqlens: tuple[int, ...], world: int, rank: int, spec,
           packed: bool = False) -> list[Piece]:
    """The runs of rank `rank`'s zig-zag share of sequences of `seqlens` tokens: the early
    chunk's then the late chunk's, each in the order of the rows (batch row by batch row). The
    sequences are batch rows, each split on its own, or with `packed` varlen sequences laid end
    to end (cu_seqlens), whose packed stream is split."""
    streams = [tuple(seqlens)] if packed else [(n,) for n in seqlens]
    c0 = [0]
    for lens in streams:
        c0.append(c0[-1] + sum(spec.num_cmp(n) for n in lens))
    out: list[Piece] = []
    for late in (False, True):
        for b, lens in enumerate(streams):
            chunk = zigzag_chunks(sum(lens), world, rank)[late]
            st, c_row = 0, c0[b]
            for n in lens:
                lo, hi = max(chunk.start, st), min(chunk.stop, st + n)
                if lo < hi:
                    out.append(Piece(n_q=hi - lo, b=b, k_pos=st, n_k=hi - st, c_row=c_row,
                                     late=late))
                st, c_row = st + n, c_row + spec.num_cmp(n)
    return out


def _rows(spans, device) -> torch.Tensor:
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in spans])


def _cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32,
                        device=device)


def _reduce_scatter_rows(src: torch.Tensor, group, async_op: bool = False):
    """src [W * N, ...] (rank r's part first at rows r N) summed over the ranks; this rank's
    N rows returned (an all-reduce where a CPU backend lacks the reduce-scatter). With
    `async_op` the pair (rows, handle) is returned: the rows may be read once the handle is
    waited on (None when the collective has already finished)."""
    world, rank = _group_shape(group)
    out = src.new_empty(src.shape[0] // world, *src.shape[1:])
    work = None
    try:
        work = _REDUCE_SCATTER(out, src, group=group, async_op=async_op)
    except (RuntimeError, NotImplementedError):
        if dist.get_backend(group) == "nccl":
            raise
        src = src.clone()               # older gloo: every rank refuses alike before sending
        dist.all_reduce(src, group=group)
        out = src[rank * out.shape[0]:(rank + 1) * out.shape[0]]
    return (out, work) if async_op else out


class _GatherHalf(torch.autograd.Function):
    """Half of every rank's share, laid out [C, B, ...], gathered rank by rank into
    [W C, B, ...]. The collective is only started: its handle goes to `pending`, to be waited on
    before the result is read, so the other half's transfer can overlap the work on this one.
    Backward sums the ranks' gradients of the gathered half and returns this rank's part (a
    reduce-scatter)."""

    @staticmethod
    def forward(ctx, src, group, pending):
        ctx.group = group
        out, work = _start_gather(src, group)
        pending.append(work)
        return out

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_rows(g.contiguous(), ctx.group), None, None


def _start_gather(src: torch.Tensor, group):
    """Start the all-gather of `src` [C, B, ...] into [W C, B, ...]: (result, handle)."""
    src = src.contiguous()
    out = src.new_empty(dist.get_world_size(group) * src.shape[0], *src.shape[1:])
    return out, _ALL_GATHER(out, src, group=group, async_op=True)


class _Landing(torch.autograd.Function):
    """Identity. Its backward waits for the collectives in `pending` before passing the
    gradient on: the late half's reduce-scatter (started by `_Adopt`) writes the gradient this
    node receives."""

    @staticmethod
    def forward(ctx, x, pending):
        ctx.pending = pending
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        while ctx.pending:
            work = ctx.pending.pop()
            if work is not None:
                work.wait()
        return g, None


class _Adopt(torch.autograd.Function):
    """The late half's gathered keys, whose all-gather `gathered = (tensor, handle)` was
    started before the early chunk ran. It is applied after the early chunk's op: autograd runs
    the newest ready node first, so this backward comes right after the late chunk's and before
    the early chunk's. It only starts the reduce-scatter of the late half's gradient (handle to
    `pending`); the early chunk's backward runs while it is in flight, and `_Landing` waits for
    it before the gradient is read."""

    @staticmethod
    def forward(ctx, landing, gathered, group, pending):
        ctx.group, ctx.pending = group, pending
        out, work = gathered
        work.wait()
        return out

    @staticmethod
    def backward(ctx, g):
        out, work = _reduce_scatter_rows(g.contiguous(), ctx.group, async_op=True)
        ctx.pending.append(work)
        return out, None, None, None


def cp_attention(op, group, q, k, v, gates=None, k_cmp=None, v_cmp=None, cu_seqlens=None,
                 k_win=None, v_win=None, q_cmp=None) -> torch.Tensor:
    """The op with context parallelism: q, k, v, gates, q_cmp, k_win, v_win are this rank's
    zig-zag shares [B, T / W, ...] of the full sequences; learned k_cmp, v_cmp are the full
    tensors on every rank; cu_seqlens (B = 1) packs the full batch. Returns this rank's share of
    the output, equal to the single-device op's. The shares' gradients equal the single-device
    gradients' shares (the keys' parts are summed over the ranks); k_cmp and v_cmp get this
    rank's part of their gradient, as a replicated parameter does: the ranks' parts sum to the
    single-device gradient (compute them from `gather(k)` and that sum happens there).

    The early chunk's prefix lies in the early half of the sequence (every rank's early
    chunk), so the keys are gathered in two halves: the early chunk attends as soon as the early
    half has arrived, while the late half is still in flight. In the backward the late half's
    gradient is complete first (only the late chunk reads it): its reduce-scatter runs while the
    early chunk's backward computes."""
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
    T, C = Tl * world, Tl // 2
    if cu_seqlens is None:
        seqlens = (T,) * B
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens: requires batch size 1 (packed sequences), got B={B}")
        seqlens = check_cu_seqlens(cu_seqlens, T, q.device)   # the full batch's offsets
    runs = pieces(seqlens, world, rank, op.spec, packed=cu_seqlens is not None)
    dev = q.device
    shared = {n: t for n, t in (("k", k), ("v", v), ("k_win", k_win), ("v_win", v_win))
              if t is not None}
    early_wait: list = []
    early = {n: _GatherHalf.apply(t[:, :C].movedim(1, 0), group, early_wait)
             for n, t in shared.items()}
    late_src = {n: t[:, C:].movedim(1, 0) for n, t in shared.items()}
    late_sent = {n: _start_gather(t.detach(), group) for n, t in late_src.items()}
    late_rs: list = []                  # the late half's reduce-scatters, in the backward
    landing = {n: _Landing.apply(t, late_rs) for n, t in late_src.items()}

    def run(half: bool, keys: dict):
        """The op for the runs of one chunk; `keys` [B, L, ...] hold positions 0 .. L - 1."""
        part = [p for p in runs if p.late == half]
        L = next(iter(keys.values())).shape[1]
        rows = _rows([(p.b * L + p.k_pos, p.n_k) for p in part], dev)
        kx = {n: t.flatten(0, 1)[rows].unsqueeze(0) for n, t in keys.items()}
        sl = slice(C, Tl) if half else slice(0, C)

        def mine(x):
            return None if x is None else x[:, sl].reshape(1, B * C, *x.shape[2:])

        kc = vc = None
        if k_cmp is not None:
            crows = _rows([(p.c_row, op.spec.num_cmp(p.n_k)) for p in part], dev)
            kc = k_cmp.flatten(0, 1)[crows].unsqueeze(0)
            vc = v_cmp.flatten(0, 1)[crows].unsqueeze(0)
        o = op(mine(q), kx["k"], kx["v"], mine(gates), kc, vc,
               cu_seqlens=_cu([p.n_q for p in part], dev), k_win=kx.get("k_win"),
               v_win=kx.get("v_win"), q_cmp=mine(q_cmp),
               cu_seqlens_k=_cu([p.n_k for p in part], dev))
        return o.view(B, C, *o.shape[2:])

    for w in early_wait:
        w.wait()
    early = {n: t.movedim(0, 1) for n, t in early.items()}
    o_early = run(False, early)
    late = {n: _Adopt.apply(landing[n], late_sent[n], group, late_rs) for n in shared}
    # rank r's late chunk is chunk 2W - 1 - r: the gathered late half comes in reverse order
    full = {n: torch.cat([early[n], t.movedim(0, 1).unflatten(1, (world, C)).flip(1)
                          .flatten(1, 2)], 1) for n, t in late.items()}
    o_late = run(True, full)
    return torch.cat([o_early, o_late], 1)


def share_positions(pos_full: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's share of a [T] position table (the positions of its local rows)."""
    world, rank = _group_shape(group)
    return _share_rows(pos_full, world, rank, 0)


__all__ = ["cp_attention", "gather", "pieces", "shard", "share_positions", "unshard",
           "zigzag_chunks"]
