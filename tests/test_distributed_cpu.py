"""Context parallelism on two CPU processes (gloo): each rank's share holds chunks r and
2W - 1 - r, gathering the shares gives the full tensor back on every rank, and the op with
`cp_group` equals the single-process op, outputs and every gradient (interpreter, float32)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nsagen
from nsagen.distributed import pieces, shard, unshard, zigzag_chunks

from kernel_checks import make_inputs, rel_err, scaled


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
        dist.barrier()   # both ranks done before either tears the group down
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


# (spec, B, T or varlen lengths, separate query for the compressed branch)
CP_CASES = [("nsa-d128", 2, 48, False), ("nsa-d128", 1, (23, 9, 32), False),
            ("nsa-paper", 1, 40, True)]
CP_NAMES = ("q", "k", "v", "gates", "k_cmp", "v_cmp", "k_win", "v_win", "q_cmp")


def _cp_inputs(case):
    name, B, T, with_qc = case
    spec = scaled(nsagen.load_spec(name))
    if name == "nsa-paper":
        spec = spec.replace(kv_per_branch="separate", window=8)
    lens = list(T) if isinstance(T, tuple) else None
    x = make_inputs(spec, B, 0 if lens else T, torch.float32, "cpu", seed=31, varlen_lens=lens)
    gen = torch.Generator().manual_seed(32)
    x["q_cmp"] = torch.randn(x["q"].shape, generator=gen) if with_qc else None
    do = torch.randn(*x["q"].shape[:3], spec.dim_v, generator=gen)
    return spec, x, do


def _cp_run(op, x, do, group=None):
    """Output and gradients of every given input, on one process or (group) on this rank's
    shares; k_cmp, v_cmp are full tensors on every rank."""
    names = [n for n in CP_NAMES if x[n] is not None]
    full = ("k_cmp", "v_cmp")
    if group is not None:
        x = {n: (t if t is None or n in full or n == "cu_seqlens" else shard(t, group))
             for n, t in x.items()}
        do = shard(do, group)
    leaves = {n: x[n].clone().requires_grad_(True) for n in names}
    kw = {n: leaves.get(n) for n in ("k_win", "v_win", "q_cmp")}
    o = op(leaves["q"], leaves["k"], leaves["v"], leaves.get("gates"), leaves.get("k_cmp"),
           leaves.get("v_cmp"), x["cu_seqlens"], cp_group=group, **kw)
    grads = torch.autograd.grad(o, [leaves[n] for n in names], do)
    return o.detach(), dict(zip(names, grads))


def _cp_worker(rank: int, world: int, port: int, out: str) -> None:
    import conftest  # noqa: F401  (the interpreter's test setup, in this process too)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        for case in CP_CASES:
            spec, x, do = _cp_inputs(case)
            results.append(_cp_run(nsagen.build(spec), x, do, dist.group.WORLD))
        # the same under torch.compile (the collectives and the host-side split break the graph)
        spec, x, do = _cp_inputs(CP_CASES[0])
        op = torch.compile(nsagen.build(spec).__call__, backend="aot_eager")
        results.append(_cp_run(op, x, do, dist.group.WORLD))
        torch.save(dict(runs=results, order=_backward_order(*_cp_inputs(CP_CASES[0]))),
                   f"{out}.{rank}")
        dist.barrier()   # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


def _backward_order(spec, x, do) -> list[str]:
    """The backward's events in order: "op" / "done" when a chunk's op backward begins / ends
    (hooks on its output and its query), "rs" / "rs-async" when a reduce-scatter of k or v is
    issued, "wait" when a pending one is waited on."""
    import nsagen.distributed as nd
    log: list[str] = []
    rs = nd._reduce_scatter_rows

    class Handle:
        def __init__(self, work):
            self.work = work

        def wait(self):
            log.append("wait")
            if self.work is not None:
                self.work.wait()

    def logged_rs(src, group, async_op=False):
        log.append("rs-async" if async_op else "rs")
        if not async_op:
            return rs(src, group)
        out, work = rs(src, group, async_op=True)
        return out, Handle(work)

    real = nsagen.build(spec)

    class Hooked:
        spec = real.spec

        def __call__(self, *a, **kw):
            a[0].register_hook(lambda g: log.append("done"))
            o = real(*a, **kw)
            o.register_hook(lambda g: log.append("op"))
            return o

    nd._reduce_scatter_rows = logged_rs
    try:
        mine = {n: shard(x[n]).requires_grad_(True) for n in ("q", "k", "v", "gates")}
        o = nd.cp_attention(Hooked(), dist.group.WORLD, *mine.values())
        torch.autograd.grad(o, list(mine.values()), shard(do))
    finally:
        nd._reduce_scatter_rows = rs
    return log


def test_op_with_cp_group_equals_one_process(tmp_path):
    """Outputs and all gradients (q, k, v, gates, learned k_cmp/v_cmp, separate window k/v,
    q_cmp) of two gloo ranks against the single-process op, batched and varlen."""
    want = []
    for case in CP_CASES:
        spec, x, do = _cp_inputs(case)
        want.append(_cp_run(nsagen.build(spec), x, do))
    world, port = 2, _free_port()
    out = str(tmp_path / "cp")
    mp.start_processes(_cp_worker, args=(world, port, out), nprocs=world, start_method="spawn")
    got = [torch.load(f"{out}.{r}") for r in range(world)]
    for r in range(world):
        # the late half's gradient is reduce-scattered while the early chunk's backward runs,
        # and waited on only after it; the early half's after it
        assert got[r]["order"] == ["op", "done", "rs-async", "rs-async", "op", "done", "wait",
                                   "wait", "rs", "rs"], got[r]["order"]
    got = [g["runs"] for g in got]
    want.append(want[0])
    for i, case in enumerate(CP_CASES + CP_CASES[:1]):
        o, grads = want[i]
        T = o.shape[1]
        for r in range(world):
            o_r, grads_r = got[r][i]
            early, late = zigzag_chunks(T, world, r)
            rows = list(early) + list(late)
            assert rel_err(o_r, o[:, rows]) < 1e-5, (case, r)
            for n, gw in grads.items():
                if n not in ("k_cmp", "v_cmp"):
                    assert rel_err(grads_r[n], gw[:, rows]) < 1e-5, (case, r, n)
        for n in ("k_cmp", "v_cmp"):   # full on every rank: the ranks' parts sum to the gradient
            if n in grads:
                assert rel_err(sum(got[r][i][1][n] for r in range(world)), grads[n]) < 1e-5


def test_pieces_cover_each_rank_and_sequence():
    spec = scaled(nsagen.load_spec("nsa-d128"))
    lens, W = (23, 9, 32), 2
    starts = [0, 23, 32]
    seen = []
    for r in range(W):
        runs = pieces(lens, W, r, spec, packed=True)
        assert sum(p.n_q for p in runs) == sum(lens) // W
        early = [p for p in runs if not p.late]
        assert runs[:len(early)] == early and sum(p.n_q for p in early) == sum(lens) // (2 * W)
        for p in runs:   # queries end the prefix of their own sequence
            i = starts.index(p.k_pos)
            assert p.b == 0 and p.n_k <= lens[i]
            assert p.c_row == sum(spec.num_cmp(n) for n in lens[:i])
            if not p.late:   # an early chunk's prefix lies in the early half
                assert p.k_pos + p.n_k <= sum(lens) // 2
            seen += list(range(p.k_pos + p.n_k - p.n_q, p.k_pos + p.n_k))
    assert sorted(seen) == list(range(sum(lens)))


def _layer_case():
    from nsagen.nn import SparseAttention

    spec = scaled(nsagen.load_spec("nsa-paper"))
    torch.manual_seed(41)
    layer = SparseAttention(spec, hidden_size=32, match_width=False, rope=("slc", "win"))
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(1, 48, 32, generator=gen)
    do = torch.randn(1, 48, 32, generator=gen)
    return layer, x, do


def _layer_worker(rank: int, world: int, port: int, out: str) -> None:
    import conftest  # noqa: F401  (the interpreter's test setup, in this process too)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layer, x, do = _layer_case()
        layer.cp_group = dist.group.WORLD
        xs = shard(x).requires_grad_(True)
        y = layer(xs)
        (y * shard(do)).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        for g in grads.values():   # data parallel over the sequence: sum the parameters' parts
            dist.all_reduce(g)
        torch.save(dict(y=y.detach(), dx=xs.grad, grads=grads), f"{out}.{rank}")
        dist.barrier()   # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


def test_layer_with_cp_group_equals_one_process(tmp_path):
    """SparseAttention(cp_group=...) on shares (learned compression gathered on every rank,
    rotary positions of the share, an un-rotated compressed branch): outputs, input gradients
    and the parameters' gradients summed over the ranks equal one process's."""
    layer, x, do = _layer_case()
    x = x.requires_grad_(True)
    y = layer(x)
    (y * do).sum().backward()
    world, port = 2, _free_port()
    out = str(tmp_path / "layer")
    mp.start_processes(_layer_worker, args=(world, port, out), nprocs=world, start_method="spawn")
    for r in range(world):
        got = torch.load(f"{out}.{r}")
        early, late = zigzag_chunks(48, world, r)
        rows = list(early) + list(late)
        assert rel_err(got["y"], y.detach()[:, rows]) < 1e-5
        assert rel_err(got["dx"], x.grad[:, rows]) < 1e-5
        for n, p in layer.named_parameters():
            if p.grad is None:
                continue
            if p.grad.norm() < 1e-6:   # zero up to rounding (e.g. a bias every key shares)
                assert (got["grads"][n] - p.grad).abs().max() < 1e-6, n
            else:
                assert rel_err(got["grads"][n], p.grad) < 1e-5, n


def test_cp_group_of_one_rank_and_refusals(tmp_path):
    """A group of one rank is the plain op; shares of the wrong shape are refused by name."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        spec = scaled(nsagen.load_spec("nsa-d128"))
        op = nsagen.build(spec)
        x = make_inputs(spec, 1, 32, torch.float32, "cpu", seed=33)
        g = dist.group.WORLD
        o = op(x["q"], x["k"], x["v"], x["gates"], cp_group=g)
        assert rel_err(o, op(x["q"], x["k"], x["v"], x["gates"])) < 1e-6
        with pytest.raises(ValueError, match=r"^cp_group: k must be a share"):
            op(x["q"], x["k"][:, :30], x["v"], x["gates"], cp_group=g)
        with pytest.raises(ValueError, match=r"^cp_group: a share holds two equal chunks"):
            op(x["q"][:, :31], x["k"][:, :31], x["v"][:, :31], x["gates"][:, :31], cp_group=g)
        with pytest.raises(ValueError, match=r"^cp_group: return_indices"):
            op(x["q"], x["k"], x["v"], x["gates"], cp_group=g, return_indices=True)
    finally:
        dist.destroy_process_group()
