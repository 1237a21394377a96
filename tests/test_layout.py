"""The shape-only layout (equal lengths, traceable) equals the one built from the lengths; the
selected branch's inverse map groups and chunks every pick."""
import pytest
import torch

import nsagen
from nsagen.layout import _build, build_layout

FIELDS = ("tok_pos", "tok_cstart", "tok_ncmp", "cmp_src", "tok_seq", "tok_kbase", "tok_seqlen")


@pytest.mark.parametrize("B,T", [(1, 1), (1, 31), (2, 32), (3, 100), (2, 257)])
def test_shape_only_layout_matches_host_layout(B, T):
    spec = nsagen.load_spec("nsa-d128").replace(cmp_block=32, cmp_stride=16, slc_block=64)
    a = _build(spec, (T,) * B, torch.device("cpu"), from_shape=True)
    b = _build(spec, (T,) * B, torch.device("cpu"), from_shape=False)
    assert a.uniform and not b.uniform
    assert (a.n_cmp, a.nbp, a.ncs) == (b.n_cmp, b.nbp, b.ncs)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for size in (1, 16, 64, 128):
        for x, y in zip(a.tiles(size), b.tiles(size)):
            assert x.dtype == y.dtype == torch.int32 and torch.equal(x, y)
        for x, y in zip(a.cmp_tiles(size), b.cmp_tiles(size)):
            assert torch.equal(x, y)
        for x, y in zip(a.blocks(size), b.blocks(size)):
            assert torch.equal(x.long(), y.long())


def _inverse_oracle(lay, idx, lb, free, n_init, n_local):
    """The picks per (KV head, global block) as (token, slot) lists, by a loop."""
    n_blocks, seq_first = lay.blocks(lb)[0].shape[0], lay.blocks(lb)[3]
    n_tok, H, n = idx.shape
    groups: dict = {}
    for t in range(n_tok):
        jt = int(lay.tok_pos[t]) // lb
        first = int(seq_first[int(lay.tok_seq[t])])
        for h in range(H):
            for s in range(n):
                b = int(idx[t, h, s])
                if free and not (n_init <= s < n - n_local and n_init <= b <= jt - n_local):
                    continue
                if b >= 0:
                    groups.setdefault(h * n_blocks + first + b, []).append(
                        (t, s - (n_init if free else 0)))
    return groups


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("free", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 30])
def test_inverse_map_groups_every_pick_and_chunks_each_group_once(chunk, free, shared):
    """The generated counting sort (two launches) puts each pick in its (KV head, global block)
    group, in any order inside it, and its chunk list covers each group's entries exactly once
    in steps of `chunk`; the tail of the list names no group. `shared`: the tokens of a
    selection block all pick what its first token picks, so most picks take the path that
    places a column's equal picks with one atomic."""
    spec = nsagen.load_spec("nsa-d128").replace(cmp_block=8, cmp_stride=4, slc_block=8,
                                                 slc_count=5, slc_initial=1, slc_local=1,
                                                 window=16)
    mod = nsagen.build(spec).module
    lay = _build(spec, (50, 7, 90), torch.device("cpu"))
    H, n, lb = spec.heads_kv, spec.slc_count, spec.slc_block
    gen = torch.Generator().manual_seed(chunk + free)
    jt = (lay.tok_pos // lb).long()
    # distinct visible blocks per row, ascending, -1 past the row's count (as the selection)
    keys = torch.rand(lay.tok_pos.shape[0], H, 16, generator=gen)
    keys[(torch.arange(16)[None, None, :] > jt[:, None, None]).expand_as(keys)] = 2.0
    idx = keys.argsort(-1)[..., :n]
    idx = torch.where(idx > jt[:, None, None], 99, idx).sort(-1).values
    idx = torch.where(idx == 99, -1, idx).to(torch.int32)
    if shared:      # every token of a block (in its sequence) takes its block's first row
        first = torch.arange(idx.shape[0]) - (lay.tok_pos.long() % lb)
        idx = idx[first]
    inv = mod.inverse_map(idx, lay.tok_seq, lay.tok_pos, lay.blocks(lb), chunk, free=free,
                          slots=True)
    want = _inverse_oracle(lay, idx, lb, free, spec.slc_initial, spec.slc_local)
    n_groups = H * inv["n_blocks"]
    counts, offs = inv["counts"].tolist(), inv["offsets"].tolist()
    tokens, slots = inv["tokens"].tolist(), inv["slots"].tolist()
    assert sum(counts) == sum(len(v) for v in want.values()) > 0
    for g in range(n_groups):
        got = sorted(zip(tokens[offs[g]:offs[g] + counts[g]], slots[offs[g]:offs[g] + counts[g]]))
        assert got == sorted(want.get(g, [])), g
    hb, i0 = inv["chunk_hb"].tolist(), inv["chunk_i0"].tolist()
    seen: dict = {}
    for h, i in zip(hb, i0):
        assert 0 <= h <= n_groups
        if h < n_groups:
            seen.setdefault(h, []).append(i)
    for g, c in enumerate(counts):
        assert sorted(seen.get(g, [])) == list(range(0, c, chunk)), g


def test_layouts_are_kept_only_outside_tracing():
    """Eager calls reuse the layout of their lengths; under fake-tensor tracing (what
    torch.compile and opcheck run) the tables are built afresh and never kept, since they would
    hold fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nsagen.launch import tracing

    spec = nsagen.load_spec("nsa-d128")
    assert not tracing()
    assert build_layout(spec, (777,), "cpu") is build_layout(spec, (777,), "cpu")
    with FakeTensorMode():
        assert tracing()
        traced = build_layout(spec, (778,), "cpu")
        assert traced is not build_layout(spec, (778,), "cpu")
    assert build_layout(spec, (778,), "cpu") is not traced
