"""The zig-zag split of context parallelism on two CPU processes (gloo): each rank's share holds
chunks r and 2W - 1 - r, and gathering the shares gives the full tensor back on every rank."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nsagen.distributed import shard, unshard, zigzag_chunks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.arange(2 * 24 * 3, dtype=torch.float32).view(2, 24, 3)   # the same on every rank
        mine = shard(x, dim=1)
        full = unshard(mine, dim=1)
        back = unshard(shard(x.transpose(0, 1).contiguous(), dim=0), dim=0)
        torch.save(dict(mine=mine, full=full, back=back), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_shard_and_unshard_on_two_gloo_ranks(tmp_path):
    world, port = 2, _free_port()
    out = str(tmp_path / "r")
    mp.start_processes(_worker, args=(world, port, out), nprocs=world, start_method="spawn")
    x = torch.arange(2 * 24 * 3, dtype=torch.float32).view(2, 24, 3)
    for rank in range(world):
        got = torch.load(f"{out}.{rank}")
        early, late = zigzag_chunks(24, world, rank)
        want = torch.cat([x[:, early.start:early.stop], x[:, late.start:late.stop]], 1)
        assert torch.equal(got["mine"], want)
        assert torch.equal(got["full"], x) and torch.equal(got["back"], x.transpose(0, 1))


def test_zigzag_chunks_balance_and_refusals():
    # rank r holds chunks r and 2W - 1 - r: every rank the same causal work
    W, T = 4, 64
    work = [sum(p + 1 for rng in zigzag_chunks(T, W, r) for p in rng) for r in range(W)]
    assert len(set(work)) == 1
    cover = sorted(p for r in range(W) for rng in zigzag_chunks(T, W, r) for p in rng)
    assert cover == list(range(T))
    with pytest.raises(ValueError, match="not divisible by 2 x 4 ranks"):
        zigzag_chunks(60, 4, 0)
    with pytest.raises(ValueError, match="out of range"):
        zigzag_chunks(64, 4, 4)
