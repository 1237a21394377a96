"""Context parallelism's data layout: the zig-zag split of a sequence across the ranks of a
torch.distributed group (docs/distributed.md).

With W ranks a sequence of T tokens (T divisible by 2W) is cut into 2W chunks of C = T / 2W
tokens, and rank r holds chunks r and 2W - 1 - r, in that order: an early chunk and a late one,
so every rank has the same causal work. `shard` takes a rank's share of a full tensor and
`unshard` gathers the shares back into the full tensor on every rank.
"""
from __future__ import annotations

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


__all__ = ["shard", "unshard", "zigzag_chunks"]
