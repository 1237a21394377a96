"""Generated forward kernels under TRITON_INTERPRET=1 (float32, float16) against the reference."""
import os

import pytest
import torch

import nsagen
from nsagen.resources import shipped_specs

from nsagen.layout import build_layout
from nsagen.reference import select_blocks

from kernel_checks import check_forward, scaled

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests run on CPU-only machines (the GPU module covers CUDA)")

SHIPPED = sorted(shipped_specs("nsa"))


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("T", [1, 7, 45])
def test_shipped_spec_scaled_fp32(name, T):
    spec = scaled(nsagen.load_spec(name))
    check_forward(spec, B=1, T=T, dtype=torch.float32, device="cpu", seed=T)


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper", "nsa-fla", "nsa-g2"])
def test_shipped_spec_scaled_fp16(name):
    spec = scaled(nsagen.load_spec(name))
    check_forward(spec, B=1, T=50, dtype=torch.float16, device="cpu", seed=1)


def test_batch_and_odd_length():
    spec = scaled(nsagen.load_spec("nsa-d128"), kv_heads=2)
    check_forward(spec, B=2, T=37, dtype=torch.float32, device="cpu", seed=2)


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-fla", "nsa-paper"])
def test_varlen(name):
    spec = scaled(nsagen.load_spec(name))
    check_forward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=3,
                  varlen_lens=[1, 21, 6, 38])


BRANCH_SETS = [("cmp",), ("slc",), ("win",), ("cmp", "slc"), ("cmp", "win"), ("slc", "win"),
               ("cmp", "slc", "win")]


@pytest.mark.parametrize("branches", BRANCH_SETS, ids="+".join)
def test_branch_subsets(branches):
    base = scaled(nsagen.load_spec("nsa-d128"))
    spec = base.replace(branches=branches, window=base.window if "win" in branches else None)
    check_forward(spec, B=1, T=40, dtype=torch.float32, device="cpu", seed=4)


@pytest.mark.parametrize("G", [1, 2, 4, 16, 32])
def test_group_sizes(G):
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(heads_q=G, heads_kv=1)
    check_forward(spec, B=1, T=33, dtype=torch.float32, device="cpu", seed=G)


def test_non_power_of_two_group_and_dims():
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(heads_q=6, heads_kv=2, dim_qk=24, dim_v=40)
    check_forward(spec, B=1, T=29, dtype=torch.float32, device="cpu", seed=5)


def test_small_window_fused_into_selection():
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(window=8)
    plan = nsagen.ir.lower(spec)
    assert plan.kernel("slc_attention").fuse_window
    assert "win_attention" not in [k.name for k in plan.kernels]
    check_forward(spec, B=1, T=40, dtype=torch.float32, device="cpu", seed=6)


def test_learned_compression_and_separate_kv():
    spec = scaled(nsagen.load_spec("nsa-paper")).replace(kv_per_branch="separate")
    check_forward(spec, B=1, T=41, dtype=torch.float32, device="cpu", seed=7)


def test_op_call_matches_reference():
    """The public op (validation, packing, reshape) on a [B, T] batch."""
    spec = scaled(nsagen.load_spec("nsa-d128"), kv_heads=2)
    op = nsagen.build(spec)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 19, spec.heads_q, spec.dim_qk, generator=g)
    k = torch.randn(2, 19, spec.heads_kv, spec.dim_qk, generator=g)
    v = torch.randn(2, 19, spec.heads_kv, spec.dim_v, generator=g)
    with torch.no_grad():
        o, idx = op(q, k, v, None, return_indices=True)
    ref, ref_idx = nsagen.reference.nsa(q.double(), k.double(), v.double(), None, spec,
                                        return_indices=True)
    assert torch.equal(idx, ref_idx)
    assert ((o.double() - ref).norm() / ref.norm()).item() < 1e-4
    with pytest.raises(ValueError, match="k:"):
        op(q, k[:, :, :1], v, None)


@pytest.mark.parametrize("cfg,local", [
    # one row a program, segments of 64 blocks (two a long row)
    (dict(BT=1, SEG=64, CH=256, num_warps=4), 2),
    # four rows a program, segments of 16, reads of 16 scores
    (dict(BT=4, SEG=16, CH=16, num_warps=2), 2), (dict(BT=4, SEG=16, CH=16, num_warps=2), 0),
    # segments of 2: the first holds only forced blocks, picks empty segments
    (dict(BT=2, SEG=2, CH=8, num_warps=1), 2), (dict(BT=2, SEG=2, CH=8, num_warps=1), 0)])
def test_select_blocks_long_rows_and_ties(cfg, local):
    """The top-n kernel alone on rows of up to 68 blocks (many segments per row, several picks from one segment), with
    scores drawn from a few values so that ties must go to the lower block, and zeros past the
    last block a compressed window reaches. With segments of 2 blocks the first segment holds
    only forced blocks and a pick's segment is often emptied; with no local blocks the free
    candidates reach past the last window, where they score 0."""
    spec = nsagen.Spec(name="top-n", heads_q=1, heads_kv=1, dim_qk=16, dim_v=16, cmp_block=4, cmp_stride=4,
                       slc_block=4, slc_count=7, slc_initial=2, slc_local=local, window=4,
                       dtype="float32")
    op = nsagen.build(spec)
    T = 272
    lay = build_layout(spec, (T,), "cpu")
    gen = torch.Generator().manual_seed(11)
    score = torch.randint(0, 5, (T, spec.heads_kv, lay.nbp), generator=gen).float() / 4
    idx = torch.full((T, spec.heads_kv, spec.slc_count), 7777, dtype=torch.int32)
    op.module.launch_select_blocks(score, idx, lay, cfg)
    pos = torch.arange(T)
    nb = spec.num_blocks(T)
    # blocks past the last visible compressed window score 0 (cmp_block = slc_block here: the
    # block holding the query's own last complete window)
    j = torch.arange(lay.nbp)
    jlast = torch.where(pos >= 3, (pos - 3) // 4, -1)
    ref_score = torch.where((j[None, :] <= jlast[:, None])[:, None, :], score, 0.0)
    ref = select_blocks(spec, ref_score[None, :, :, :nb], pos)[0]
    assert torch.equal(idx, ref)


@pytest.mark.parametrize("slc_order", ["query", "block"], indirect=True)
@pytest.mark.parametrize("G,dtype", [(1, torch.float32), (1, torch.float16), (2, torch.float16),
                                     (4, torch.float32), (16, torch.float16)])
def test_selected_attention_loop_orders(slc_order, G, dtype):
    """Both loop orders of the selected attention, on ragged sequences, whatever the cost model
    picks for the shape."""
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(heads_q=2 * G, heads_kv=2)
    names = [k.name for k in nsagen.ir.lower(spec).kernels]
    assert ("slc_attention_kb" in names) == (slc_order == "block"), names
    check_forward(spec, B=1, T=0, dtype=dtype, device="cpu", seed=G, varlen_lens=[3, 70, 1, 41])


@pytest.mark.parametrize("slc_order", ["query", "block"], indirect=True)
@pytest.mark.parametrize("n,n_init,n_local", [(3, 1, 2), (3, 0, 3), (3, 3, 0), (4, 0, 1)])
def test_forced_and_free_picks(slc_order, n, n_init, n_local):
    """The forced blocks (dense tiles) and the free picks split as the spec's counts say: with
    n = n_init + n_local every pick is forced (nothing to bucket or walk), and specs with no
    initial or no local blocks."""
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(heads_q=2, heads_kv=2, slc_count=n,
                                                         slc_initial=n_init, slc_local=n_local)
    check_forward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=5,
                  varlen_lens=[70, 9, 41])


@pytest.mark.parametrize("slc_order", ["block"], indirect=True)
def test_block_outer_in_token_chunks(slc_order, monkeypatch):
    """Inputs whose partial outputs exceed the launch's budget run in chunks of tokens (here 7,
    across sequence boundaries), with the same result."""
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(heads_q=2, heads_kv=2)
    mod = nsagen.build(spec).module
    per_tok = spec.heads_kv * spec.slc_count * spec.group * (spec.dim_v * 4 + 4)
    monkeypatch.setattr(mod, "SLC_KB_PARTIAL_BYTES", 7 * per_tok)
    check_forward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=31,
                  varlen_lens=[20, 3, 30])
