"""Generated backward kernels under TRITON_INTERPRET=1 (float32) against float64 autograd
through the reference, on the blocks the forward chose."""
import os

import pytest
import torch

import nsagen

from grad_checks import check_backward
from kernel_checks import scaled

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests run on CPU-only machines (the GPU module covers CUDA)")


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-fla", "nsa-paper", "nsa-g1"])
@pytest.mark.parametrize("T", [1, 6, 37])
def test_shipped_spec_scaled(name, T):
    check_backward(scaled(nsagen.load_spec(name)), B=1, T=T, dtype=torch.float32, device="cpu",
                   seed=T)


def test_batch():
    check_backward(scaled(nsagen.load_spec("nsa-d128"), kv_heads=2), B=2, T=23,
                   dtype=torch.float32, device="cpu", seed=11)


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper"])
def test_varlen(name):
    check_backward(scaled(nsagen.load_spec(name)), B=1, T=0, dtype=torch.float32, device="cpu",
                   seed=12, varlen_lens=[1, 19, 5, 33])


BRANCH_SETS = [("cmp",), ("slc",), ("win",), ("cmp", "slc"), ("cmp", "win"), ("slc", "win")]


@pytest.mark.parametrize("branches", BRANCH_SETS, ids="+".join)
def test_branch_subsets(branches):
    base = scaled(nsagen.load_spec("nsa-d128"))
    spec = base.replace(branches=branches, window=base.window if "win" in branches else None)
    check_backward(spec, B=1, T=30, dtype=torch.float32, device="cpu", seed=13)


@pytest.mark.parametrize("G", [2, 4, 16])
def test_group_sizes(G):
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(heads_q=G, heads_kv=1)
    check_backward(spec, B=1, T=29, dtype=torch.float32, device="cpu", seed=G)


def test_separate_kv_and_small_window():
    spec = scaled(nsagen.load_spec("nsa-paper")).replace(kv_per_branch="separate", window=8)
    check_backward(spec, B=1, T=31, dtype=torch.float32, device="cpu", seed=14)


def test_no_gates_and_fp16():
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    g = torch.Generator().manual_seed(15)
    q = torch.randn(1, 26, spec.heads_q, spec.dim_qk, generator=g, requires_grad=True)
    k = torch.randn(1, 26, spec.heads_kv, spec.dim_qk, generator=g, requires_grad=True)
    v = torch.randn(1, 26, spec.heads_kv, spec.dim_v, generator=g, requires_grad=True)
    o, idx = op(q, k, v, None, return_indices=True)
    o.sum().backward()
    ref = nsagen.reference.nsa(q.double(), k.double(), v.double(), None, spec, block_indices=idx)
    gq, = torch.autograd.grad(ref.sum(), q)
    assert ((q.grad.double() - gq).norm() / gq.norm()).item() < 1e-4
    check_backward(spec, B=1, T=40, dtype=torch.float16, device="cpu", seed=16)


def test_selected_dkdv_in_many_chunks():
    """Every block's token list cut into chunks of one tile of one token: the atomically added
    partial dk/dv must sum to the reference (the initial block is chosen by every token)."""
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    cfg = dict(op.module.CONFIGS["slc_attention_bwd"], BT_BWD=1, CHUNK_ITERS=1)
    op.configs = {"slc_attention_bwd": cfg}
    try:
        check_backward(spec, B=2, T=29, dtype=torch.float32, device="cpu", seed=12)
    finally:
        op.configs = {}


def test_compressed_dkdv_in_uneven_query_chunks():
    """The compressed dk/dv split over query chunks of 3 positions (chunk edges fall inside the
    partly visible head of each tile and across varlen sequences), added atomically."""
    spec = scaled(nsagen.load_spec("nsa-paper"))
    op = nsagen.build(spec)
    op.configs = {"cmp_attention_bwd": dict(op.module.CONFIGS["cmp_attention_bwd"], QC=3)}
    try:
        check_backward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=17,
                       varlen_lens=[7, 40, 18])
    finally:
        op.configs = {}


def _tma_spec():
    """A small `nsa-d128` (2 KV heads, D=32, l=8) for the interpreter."""
    return scaled(nsagen.load_spec("nsa-d128"), kv_heads=2)


def _with_tma(spec, tma: int = 1, **kw) -> list:
    """Runs check_backward(spec, **kw) with the TMA switch at `tma` in every kernel that has
    it; returns (tensor rows, tile rows, tile cols) of every descriptor the launchers made."""
    op = nsagen.build(spec)
    made = []
    rows = op.module._tma_rows
    op.module._tma_rows = lambda x, r, c: made.append((x.shape[0], r, c)) or rows(x, r, c)
    op.configs = {k: dict(c, TMA=tma) for k, c in op.module.CONFIGS.items() if "TMA" in c}
    try:
        check_backward(spec, dtype=torch.float32, device="cpu", **kw)
    finally:
        op.configs = {}
        op.module._tma_rows = rows
    return made


@pytest.mark.parametrize("tma", [0, 1])
def test_key_tiles_through_tma_descriptors(tma):
    """The compressed forward and dq read the compressed tiles, the selected forward and dq
    the chosen blocks' tiles, the window forward and dq their key tiles through TMA
    descriptors (config TMA=1; 0: by pointers, both checked whichever is the default): rows
    past a tile's range are real rows there, masked
    out of the scores; rows before the tensor's start (padding picks) and past its end read as
    zeros. Varlen, so tiles run across sequences."""
    made = _with_tma(_tma_spec(), tma, B=1, T=0, seed=18, varlen_lens=[9, 45, 3, 26])
    # k and v: compressed, selected and window, forward and dq
    assert len(made) == 12 * tma, made


def test_tma_switch_without_compressed_tokens():
    """With TMA=1 and fewer tokens than one compression block there is no compressed row to
    describe: the compressed kernels load by pointers (a descriptor of an empty tensor is an
    error); the selected and window ones still describe the 2 x (l - 1) key rows."""
    spec = _tma_spec()
    made = _with_tma(spec, B=2, T=spec.cmp_block - 1, seed=19)
    assert [n for n, _, _ in made] == [2 * (spec.cmp_block - 1)] * 8, made


@pytest.mark.parametrize("bt_kv", [1, 8])
def test_window_dkdv_across_key_tiles(bt_kv):
    """Key tiles of 16 under a window of 24 at T=70: each tile's queries pass through the causal
    edge, the fully visible middle and the window edge (the three loops of the dk/dv kernel).
    Steps of one token split each tile's 40 queries over 10 programs (atomic adds); steps of 8
    leave them to one program."""
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(branches=("win",), window=24)
    op = nsagen.build(spec)
    assert op.module.query_splits(5, 40, bt_kv) == (10 if bt_kv == 1 else 1)
    op.configs = {"win_attention_bwd": dict(op.module.CONFIGS["win_attention_bwd"], BK_KV=16,
                                            BT_KV=bt_kv)}
    try:
        check_backward(spec, B=1, T=70, dtype=torch.float32, device="cpu", seed=18)
    finally:
        op.configs = {}


@pytest.mark.parametrize("fuse", [0, 1])
@pytest.mark.parametrize("G", [1, 4])
def test_selected_dq_in_the_dkdv_pass(G, fuse):
    """FUSE_DQ=1: the selected branch's dq comes from the dk/dv programs (each block's tokens
    from the inverse map, added atomically) and the dq kernel does not run; FUSE_DQ=0: the dq
    kernel. Varlen, with chunks of one step so a block's tokens are split over programs."""
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(heads_q=2 * G, heads_kv=2)
    op = nsagen.build(spec)
    base = op.module.CONFIGS["slc_attention_bwd"]
    op.configs = {"slc_attention_bwd": dict(base, FUSE_DQ=fuse, CHUNK_ITERS=1)}
    launched = []
    real = op.module._launch
    op.module._launch = lambda kernel: launched.append(kernel) or real(kernel)
    try:
        check_backward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=30 + G,
                       varlen_lens=[37, 3, 70])
    finally:
        op.configs = {}
        op.module._launch = real
    ran = [k for k in launched if k is op.module.slc_attention_bwd_dq]
    assert len(ran) == 1 - fuse, ran


def test_selected_dq_fused_by_default_only_for_few_rows():
    """The IR fuses the selected dq into the dk/dv pass where a token's fp32 dq rows are at
    most 1/8 of the key tile's bytes, G >= 8 and the rows at most 2 KB (the retrieval example's
    8 heads x 64, as measured), and keeps the dq kernel for nsa-d128, its small groups (nsa-g8:
    4 KB rows, not measured) and its scaled CPU versions."""
    small = nsagen.load_spec("nsa-d128").replace(heads_q=8, heads_kv=1, dim_qk=64, dim_v=64)
    assert nsagen.build(small).module.CONFIGS["slc_attention_bwd"]["FUSE_DQ"] == 1
    for name in ("nsa-d128", "nsa-g1", "nsa-g8"):
        cfg = nsagen.build(nsagen.load_spec(name)).module.CONFIGS["slc_attention_bwd"]
        assert cfg["FUSE_DQ"] == 0, name
    cfg = nsagen.build(_tma_spec()).module.CONFIGS["slc_attention_bwd"]
    assert cfg["FUSE_DQ"] == 0


@pytest.mark.parametrize("slc_order", ["query", "block"], indirect=True)
@pytest.mark.parametrize("G", [1, 4])
def test_selected_attention_loop_orders(slc_order, G):
    """The backward from what either forward loop order saved (the branch output and LSE)."""
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(heads_q=2 * G, heads_kv=2)
    check_backward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=20 + G,
                   varlen_lens=[29, 2, 40])


@pytest.mark.parametrize("name,branches", [("nsa-d128", None), ("nsa-paper", None),
                                           ("nsa-d128", ("slc", "win"))])
def test_own_query_for_the_compressed_branch(name, branches):
    """q_cmp (e.g. q without RoPE) drives the compressed branch and the block scores: the
    output, the block choice and every gradient (dq from the other branches, dq_cmp from the
    compressed one; zero where only the selection reads it) match the reference."""
    spec = scaled(nsagen.load_spec(name))
    if branches:
        spec = spec.replace(branches=branches)
    check_backward(spec, B=1, T=37, dtype=torch.float32, device="cpu", seed=21, q_cmp=True)
    check_backward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=22, q_cmp=True,
                   varlen_lens=[9, 30])


def test_q_cmp_equal_to_q_is_todays_op_bit_for_bit():
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    from kernel_checks import make_inputs
    x = make_inputs(spec, 1, 33, torch.float32, "cpu", 23)
    for n in ("q", "k", "v", "gates"):
        x[n].requires_grad_(True)
    args = (x["q"], x["k"], x["v"], x["gates"])
    o = op(*args)
    g = torch.autograd.grad(o.square().sum(), args)
    o2 = op(*args, q_cmp=x["q"])
    g2 = torch.autograd.grad(o2.square().sum(), args)
    assert torch.equal(o, o2)
    assert all(torch.equal(a, b) for a, b in zip(g, g2))
    with torch.no_grad():
        assert torch.equal(op(*args), op(*args, q_cmp=x["q"]))


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper", "nsa-g1"])
def test_queries_that_end_each_sequence(name):
    """cu_seqlens_k: each sequence keeps only its last queries (a chunk over its whole prefix, as
    context parallelism and chunked prefill run it); every gradient, the keys' included, against
    the reference's."""
    spec = scaled(nsagen.load_spec(name))
    check_backward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=21,
                   varlen_lens=[40, 7, 33, 26], qlens=[13, 7, 1, 26])


def test_suffix_queries_with_separate_kv_and_q_cmp():
    spec = scaled(nsagen.load_spec("nsa-paper")).replace(kv_per_branch="separate", window=8)
    check_backward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=22,
                   varlen_lens=[37, 29], qlens=[11, 20], q_cmp=True)


@pytest.mark.parametrize("branches", [("cmp",), ("slc",), ("win",), ("cmp", "win")], ids="+".join)
def test_suffix_queries_with_branch_subsets(branches):
    base = scaled(nsagen.load_spec("nsa-d128"))
    spec = base.replace(branches=branches, window=base.window if "win" in branches else None)
    check_backward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=24,
                   varlen_lens=[35, 20], qlens=[9, 20])


@pytest.mark.parametrize("indices", [True, False])
def test_learned_compression_that_only_scores_blocks(indices):
    """A learned k_cmp/v_cmp without the compressed branch only picks blocks: its gradient is
    zero (the choice is not differentiated), shaped like it, in either plan."""
    spec = scaled(nsagen.load_spec("nsa-paper")).replace(branches=("slc", "win"))
    check_backward(spec, B=1, T=30, dtype=torch.float32, device="cpu", seed=26, indices=indices)


@pytest.mark.parametrize("block, stride", [(4, 2), (4, 4), (8, 2)])
def test_mean_compression_gradient_is_gathered_per_key(block, stride):
    """The mean-pooling backward adds, to each key row, the gradients of the windows that hold
    it (float64 autograd through the reference's pooling), on ragged sequences (one shorter
    than a window, one that ends inside a window) and suffix layouts; dx's earlier contents
    are kept."""
    from nsagen import reference
    from nsagen.layout import build_layout

    spec = scaled(nsagen.load_spec("nsa-d128")).replace(
        cmp_block=block, cmp_stride=stride, slc_block=max(8, block))
    mod = nsagen.build(spec).module
    g = torch.Generator().manual_seed(block * 10 + stride)
    for lens, qlens in (((3, 17, 9, block), None), ((13, 8), (5, 8))):
        lay = build_layout(spec, lens, "cpu", qlens=qlens)
        dys, dx0s, wants = [], [], []
        for D in (mod.BLOCK_DK, mod.BLOCK_DV // 2):     # keys and values: widths may differ
            x = torch.randn(sum(lens), spec.heads_kv, D, dtype=torch.float64, generator=g,
                            requires_grad=True)
            pooled = [reference.mean_compress(s[None], spec)[0] for s in x.split(list(lens))]
            dys.append(torch.randn(lay.n_cmp, spec.heads_kv, D, dtype=torch.float64, generator=g))
            wants.append(torch.autograd.grad(torch.cat(pooled), x, dys[-1])[0])
            dx0s.append(torch.randn(sum(lens), spec.heads_kv, D, generator=g))
        dk, dv = (t.clone() for t in dx0s)
        mod.launch_mean_compress_bwd(dys[0].float(), dys[1].float(), dk, dv, lay,
                                     mod.CONFIGS["mean_compress_bwd"])
        for got, dx0, want in zip((dk, dv), dx0s, wants):
            torch.testing.assert_close(got.double(), dx0.double() + want, rtol=1e-5, atol=1e-5)


def _step_host_work(spec, T):
    """The generated launches (kernels not run) and the torch ops (by name and count) of one
    forward+backward of the op at length T."""
    from torch.profiler import ProfilerActivity, profile

    op = nsagen.build(spec)
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.name = getattr(kernel, "__name__", None) or kernel.fn.__name__

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(self.name)

    g = torch.Generator().manual_seed(T)
    shapes = (("q", spec.heads_q, spec.dim_qk), ("k", spec.heads_kv, spec.dim_qk),
              ("v", spec.heads_kv, spec.dim_v), ("gates", spec.heads_q, 3))
    x = [torch.rand(1, T, h, d, generator=g, requires_grad=True) for _, h, d in shapes]

    def step():
        o = op(*x)
        torch.autograd.grad(o, x, torch.ones_like(o))

    real = op.module._launch
    op.module._launch = Recorder
    try:
        step()
        launches.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        op.module._launch = real
    keys = [e.key for e in prof.key_averages()]
    # an eager step runs the op's forward and backward directly, not through torch.library's
    # dispatch of the registered ops (which torch.compile uses)
    assert not [k for k in keys if k.startswith("nsagen::")], keys
    ops = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    return launches, ops


def test_training_step_host_work_does_not_grow_with_the_window():
    """One short-plan training step launches each plan kernel once (mean pooling and its
    backward once for keys and values) and the same torch ops whatever the compression block l:
    nothing on the host loops over a window's tokens."""
    base = scaled(nsagen.load_spec("nsa-d128"))
    wide = base.replace(cmp_block=16, cmp_stride=4)
    n = base.slc_count * base.slc_block
    (la, oa), (lb, ob) = _step_host_work(base, n), _step_host_work(wide, n)
    assert la == lb and oa == ob
    assert la.count("mean_compress") == 1 and la.count("mean_compress_bwd") == 1
    assert not [k for k in oa if "index_add" in k or "scatter" in k]


def test_registered_op_and_eager_path_agree():
    """Eager calls run the training op through a plain autograd.Function; the registered
    torch.library op (what torch.compile traces and opcheck checks) runs the same forward and
    backward: outputs and gradients are bit for bit the same."""
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    g = torch.Generator().manual_seed(7)
    T = spec.slc_count * spec.slc_block + 5              # the full plan (block indices kept)
    shapes = ((spec.heads_q, spec.dim_qk), (spec.heads_kv, spec.dim_qk),
              (spec.heads_kv, spec.dim_v), (spec.heads_q, 3))
    x = [torch.randn(1, T, h, d, generator=g) for h, d in shapes]
    do = torch.randn(1, T, spec.heads_q, spec.dim_v, generator=g)
    results = []
    for train in (op._train_op, op._eager_train):
        leaves = [t.clone().requires_grad_(True) for t in x]
        o = train(*leaves, None, None, None, None, None, None, None, False)[0]
        results.append((o.detach(), torch.autograd.grad(o, leaves, do)))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
