"""The shape-only layout (equal lengths, traceable) equals the one built from the lengths."""
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
    idx = torch.randint(-1, spec.num_blocks(T), (B * T, spec.heads_kv, 3), dtype=torch.int32)
    ia, ib = a.inverse_blocks(idx, 64), b.inverse_blocks(idx, 64)
    for key in ("tokens", "counts", "offsets"):
        assert torch.equal(ia[key], ib[key]), key
    assert int(ia["counts"].sum()) == int((idx >= 0).sum())


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 30])
def test_inverse_map_chunks_cover_every_group_once(chunk):
    spec = nsagen.load_spec("nsa-d128").replace(cmp_block=8, cmp_stride=4, slc_block=8)
    lay = _build(spec, (50, 7, 90), torch.device("cpu"))
    H = spec.heads_kv
    idx = torch.randint(-1, 4, (lay.tok_pos.shape[0], H, 5), dtype=torch.int32)
    inv = lay.inverse_blocks(idx, 8, chunk)
    n_groups = H * inv["n_blocks"]
    hb, i0 = inv["chunk_hb"].tolist(), inv["chunk_i0"].tolist()
    got = {}
    for h, i in zip(hb, i0):
        assert 0 <= h <= n_groups
        if h < n_groups:
            got.setdefault(h, []).append(i)
    for h, c in enumerate(inv["counts"].tolist()):
        assert sorted(got.get(h, [])) == list(range(0, c, chunk)), h


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
