"""The generated DSA kernels (indexer, top-k, sparse attention and its backward) under Triton's
interpreter, against the float64 reference: MQA and GQA, v given or read from k, odd lengths,
sequences shorter than topk (dense), packed sequences, float32 and float16."""
import os

import pytest
import torch
import triton
import triton.language as tl

os.environ.setdefault("TRITON_INTERPRET", "1")

import nsagen  # noqa: E402
from nsagen import reference  # noqa: E402
from nsagen.dsa_spec import DSASpec  # noqa: E402
from nsagen.spec import SpecError  # noqa: E402

from dsa_checks import check_forward, dsa_inputs, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tests run the kernels under the interpreter")


def spec_of(kv=1, dk=24, dv=16, topk=16, hq=4, hi=2, di=8):
    return DSASpec(name="dsa-test", heads_q=hq, heads_kv=kv, dim_qk=dk, dim_v=dv,
                   indexer_heads=hi, indexer_dim=di, topk=topk, dtype="float32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kv,with_v", [(1, True), (1, False), (2, True), (2, False)])
def test_forward_matches_reference(kv, with_v, dtype):
    spec = spec_of(kv=kv)
    op = nsagen.build(spec)
    lens = [45]
    x, _ = dsa_inputs(spec, lens, dtype, "cpu", seed=kv * 10 + with_v, with_v=with_v)
    check_forward(op, x, lens, dtype)


def test_packed_sequences_and_dense_below_topk():
    """Sequences longer and shorter than topk (the short ones are dense causal attention), and
    one of a single token, packed in one row."""
    spec = spec_of(kv=2, topk=16)
    op = nsagen.build(spec)
    lens = [40, 1, 9, 23]
    x, _ = dsa_inputs(spec, lens, torch.float32, "cpu", seed=3)
    check_forward(op, x, lens, torch.float32)


def test_wide_keys_split_in_two_tiles():
    """A key wider than a power of two (as MLA's 576 = 512 + 64) is read as two column tiles;
    v = k[..., :Dv] read in place; an indexer with heads and dim not powers of two."""
    spec = spec_of(kv=1, dk=40, dv=32, topk=8, hq=3, hi=3, di=12)
    op = nsagen.build(spec)
    lens = [30]
    x, _ = dsa_inputs(spec, lens, torch.float32, "cpu", seed=5, with_v=False)
    check_forward(op, x, lens, torch.float32)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("bk,kb,krows", [(16, 1, 0), (16, 2, 1), (32, 16, 0), (32, 4, 1)])
def test_indexer_key_blocks_per_program(bk, kb, krows, fp8):
    """Programs of KB blocks of BK keys: a block past the tile's last token is skipped, a
    program's last blocks run short; scores and picks unchanged (bf16 and FP8 keys), with the
    keys as the product's columns or as its rows (KROWS)."""
    spec = spec_of(kv=2, topk=8)
    if fp8:
        spec = spec.replace(key_dtype="float8_e4m3")
    op = nsagen.build(spec)
    lens = [45, 3, 20]
    x, _ = dsa_inputs(spec, lens, torch.float32, "cpu", seed=bk + kb)
    op.configs = {"dsa_indexer": dict(op.module.CONFIGS["dsa_indexer"], BK=bk, KB=kb,
                                      KROWS=krows, SMS=0)}
    try:
        check_forward(op, x, lens, torch.float32)
    finally:
        op.configs = {}


@pytest.mark.parametrize("bk,kb,krows", [(16, 1, 0), (16, 1, 1), (32, 4, 1)])
def test_indexer_folds_each_rows_extreme_scores(bk, kb, krows):
    """With ext, the indexer folds into each row the largest and smallest score it wrote over
    s <= t (what the top-k's buckets span), across the key blocks and programs of ragged packed
    sequences; a row's scores past its token do not count."""
    from nsagen.launch import pack
    from nsagen.layout import build_layout

    spec = spec_of(topk=8)
    op = nsagen.build(spec)
    lens = [45, 3, 20]
    x, _ = dsa_inputs(spec, lens, torch.float32, "cpu", seed=bk * kb + krows)
    lay = build_layout(spec, tuple(lens), "cpu")
    cfg = dict(op.module.CONFIGS["dsa_indexer"], BK=bk, KB=kb, KROWS=krows, SMS=0)
    bt = cfg["BT"]
    tile_tok, tile_len = lay.tiles(bt)
    tiles = tile_tok.shape[0]
    score = torch.full((tiles * bt, max(lens)), float("nan"))
    ext = torch.tensor([[-2 ** 31, 2 ** 31 - 1]], dtype=torch.int32).repeat(tiles * bt, 1)
    op.module.launch_dsa_indexer(pack(x["q_idx"]), pack(x["k_idx"]), None, pack(x["w_idx"]),
                                 score, lay, 0, tiles, cfg, "ieee", ext=ext)
    bits = ext ^ ((ext >> 31) & 0x7FFFFFFF)                 # back to the scores' fp32 bits
    got = bits.view(torch.float32)
    for tile in range(tiles):
        for i in range(int(tile_len[tile])):
            row, pos = tile * bt + i, int(lay.tok_pos[int(tile_tok[tile]) + i])
            s = score[row, :pos + 1]
            assert not torch.isnan(s).any()
            assert got[row, 0] == s.max() and got[row, 1] == s.min(), (row, pos)


@pytest.mark.parametrize("kv,hfast,split_s", [(1, 0, 0), (2, 0, 1), (1, 1, 1)])
def test_attention_splits_a_tokens_picks_across_programs(kv, hfast, split_s):
    """A grid of few programs (a decode step) splits each token's picks into runs, one program
    each, and combines their partials by LSE: outputs equal the reference, rows below topk
    (some runs see nothing) included. `hfast`: a token's head blocks and runs are neighbours in
    the grid (with MQA over 128 heads: two head blocks); `split_s`: the scores formed behind
    the branch that lets two warpgroups split them (the same values either way)."""
    spec = spec_of(kv=kv, topk=32, hq=128 if hfast else 4)
    op = nsagen.build(spec)
    lens = [36] if hfast else [44, 20]
    x, cu = dsa_inputs(spec, lens, torch.float32, "cpu", seed=11)
    op.configs = {"dsa_attention": dict(op.module.CONFIGS["dsa_attention"], BK=16, BKV=16,
                                        SMS=1 << 20, HFAST=hfast, SPLIT_S=split_s)}
    try:
        check_forward(op, x, lens, torch.float32)
        if hfast:   # the grid order is the forward's alone
            return
        # the backward reads the combined LSE: gradients equal those of the unsplit forward
        grads = []
        for sms in (1 << 20, 0):
            op.configs["dsa_attention"]["SMS"] = sms
            leaves = {n: x[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v")}
            o = op(**dict(x, **leaves), cu_seqlens=cu)
            do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
            grads.append(torch.autograd.grad(o, list(leaves.values()), do))
        for a, b in zip(*grads):
            assert rel_err(a, b) < 1e-5
    finally:
        op.configs = {}


@pytest.mark.parametrize("rb,ch,T,seg,cap", [
    (11, 2048, 33, 0, 16), (8, 16, 64, 0, 16), (8, 16, 64, 0, 128), (8, 16, 64, 0, 0),
    (5, 64, 70, 0, 128), (5, 16, 70, 0, 24), (8, 16, 48, 16, 16), (11, 16, 60, 32, 16),
    (5, 16, 45, 16, 16)])
def test_ties_go_to_the_lower_position(rb, ch, T, seg, cap):
    """Integer inputs make many scores equal (zeros from the ReLU, negative and positive
    ties): the picks must be the reference's exactly, with radix digits of several widths
    (the last one narrower) and rows read in several steps; with candidate lists of `cap`
    scores (0: none; 128: every row's candidates fit, ties included; 16, 24: some rows fall
    back to the whole row); and with rows split in segments of `seg` scores across programs
    (the decode path), a segment's picks placed after the earlier segments'."""
    spec = spec_of(topk=8)
    op = nsagen.build(spec)
    split = dict(SEG=seg, SPLIT_BELOW=1 << 20) if seg else dict(SPLIT_BELOW=0)
    op.configs = {"dsa_topk": dict(op.module.CONFIGS["dsa_topk"], RB=rb, CH=ch, CAP=cap,
                                   **split)}
    g = torch.Generator().manual_seed(rb)
    r = lambda *s: torch.randint(-1, 2, s, generator=g).float()  # noqa: E731
    x = dict(q=torch.randn(1, T, 4, 24, generator=g), k=torch.randn(1, T, 1, 24, generator=g),
             v=torch.randn(1, T, 1, 16, generator=g), q_idx=r(1, T, 2, 8), k_idx=r(1, T, 8),
             w_idx=r(1, T, 2))
    try:
        with torch.no_grad():
            o, idx = op(**x, return_indices=True)
    finally:
        op.configs = {}
    ref_o, ref_idx = reference.dsa(*(t.double() for t in x.values()), spec, return_indices=True)
    assert torch.equal(idx, ref_idx)
    assert rel_err(o, ref_o) < 1e-4


def test_op_call_batch_varlen_and_dtype():
    """The op's public call: a batch of two, a packed call with cu_seqlens, and bfloat16 inputs
    (computed in float32 under the interpreter, returned in bfloat16)."""
    spec = spec_of(kv=2)
    op = nsagen.build(spec)
    g = torch.Generator().manual_seed(1)
    B, T = 2, 21
    x = dict(q=torch.randn(B, T, 4, 24, generator=g), k=torch.randn(B, T, 2, 24, generator=g),
             v=torch.randn(B, T, 2, 16, generator=g), q_idx=torch.randn(B, T, 2, 8, generator=g),
             k_idx=torch.randn(B, T, 8, generator=g), w_idx=torch.randn(B, T, 2, generator=g))
    with torch.no_grad():
        o = op(**x)
        packed = op(*(t.reshape(1, B * T, *t.shape[2:]) for t in x.values()),
                    cu_seqlens=torch.tensor([0, T, 2 * T], dtype=torch.int32))
        o16 = op(**{k: t.bfloat16() for k, t in x.items()})
    ref = reference.dsa(*(t.double() for t in x.values()), spec)
    assert o.shape == (B, T, 4, 16) and rel_err(o, ref) < 1e-4
    assert torch.allclose(packed.view(B, T, 4, 16), o, atol=1e-5)
    ref16 = reference.dsa(*(t.bfloat16().double() for t in x.values()), spec)
    assert o16.dtype == torch.bfloat16 and rel_err(o16, ref16) < 1e-2


def check_gradients(op, x, lens, cu, dtype):
    """dq, dk (and dv) of op against autograd through the float64 reference on op's picks."""
    spec = op.spec
    x = dict(x)
    leaves = [n for n in ("q", "k", "v") if x[n] is not None]
    for n in leaves:
        x[n] = x[n].detach().clone().requires_grad_(True)
    o, idx = op(**x, cu_seqlens=cu, return_indices=True)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = torch.autograd.grad(o, [x[n] for n in leaves], do)
    ref_in = {n: x[n].detach().double().requires_grad_(True) for n in leaves}
    outs, t0 = [], 0
    for n in lens:
        sl = slice(t0, t0 + n)
        outs.append(reference.dsa_sparse_attention(
            spec, ref_in["q"][:, sl], ref_in["k"][:, sl],
            ref_in["v"][:, sl] if "v" in ref_in else None, idx[:, sl]))
        t0 += n
    want = torch.autograd.grad(torch.cat(outs, 1), [ref_in[n] for n in leaves], do.double())
    tol = 1e-4 if dtype == torch.float32 else 5e-3
    for n, a, b in zip(leaves, got, want):
        assert a.dtype == dtype and rel_err(a, b) < tol, (n, rel_err(a, b))


@pytest.mark.parametrize("kv,with_v,dtype", [(1, True, torch.float32), (2, False, torch.float32),
                                              (2, True, torch.float16)])
def test_gradients_match_reference(kv, with_v, dtype):
    """dq, dk, dv of the generated backward against autograd through the float64 reference on
    the same picks, packed sequences; with v=None, v's gradient lands in k's."""
    spec = spec_of(kv=kv, dk=40, dv=32) if not with_v else spec_of(kv=kv)
    op = nsagen.build(spec)
    lens = [30, 7]
    x, cu = dsa_inputs(spec, lens, dtype, "cpu", seed=11 + kv)
    if not with_v:
        x["v"] = None
    check_gradients(op, x, lens, cu, dtype)


@pytest.mark.parametrize("kv,dk,dv,with_v", [(1, 40, 32, False), (2, 24, 16, True),
                                             (1, 576, 512, False), (2, 576, 512, True)])
def test_gradients_keys_as_rows(kv, dk, dv, with_v):
    """The backward's keys-as-rows form (cfg KT: S^T = K Q^T ..., the head dim in column
    chunks, two of 256 for MLA's 576/512) gives the reference's gradients, with v read from k
    and with v its own tensor."""
    spec = spec_of(kv=kv, dk=dk, dv=dv)
    op = nsagen.build(spec)
    lens = [30, 7]
    x, cu = dsa_inputs(spec, lens, torch.float32, "cpu", seed=kv + dk)
    if not with_v:
        x["v"] = None
    op.configs = {"dsa_attention_bwd": dict(op.module.CONFIGS["dsa_attention_bwd"], KT=1,
                                            BH=16, BK=16)}
    try:
        check_gradients(op, x, lens, cu, torch.float32)
    finally:
        op.configs = {}


@pytest.mark.parametrize("kv,hq,dk,dv,with_v,dtype,chunk", [
    (1, 4, 40, 32, False, torch.float32, 0), (2, 4, 24, 16, True, torch.float16, 0),
    (1, 4, 576, 512, False, torch.float32, 5), (1, 40, 24, 16, True, torch.float32, 0),
    (2, 4, 576, 512, True, torch.float32, 0)])
def test_gradients_stored_ds(kv, hq, dk, dv, with_v, dtype, chunk, monkeypatch):
    """The backward's stored-dS form (cfg STORE_DS: P and dS written to a workspace, then dq
    and dK in kernels of their own) gives the reference's gradients: v read from k or its own
    tensor, 40 heads per KV head taken 16 at a time by the dK kernel, and tokens in chunks of
    5 (a workspace of 5 tokens) across packed sequences."""
    spec = spec_of(kv=kv, hq=hq, dk=dk, dv=dv)
    op = nsagen.build(spec)
    lens = [30, 7]
    x, cu = dsa_inputs(spec, lens, dtype, "cpu", seed=kv + hq + dk)
    if not with_v:
        x["v"] = None
    if chunk:
        item = 4 if dtype == torch.float32 else 2
        monkeypatch.setattr(op.module, "DSA_BWD_BYTES", 2 * hq * spec.topk * item * chunk)
    op.configs = {"dsa_attention_bwd": dict(op.module.CONFIGS["dsa_attention_bwd"], STORE_DS=1,
                                            KT=0, BH=16, BK=16, BP=64, BC=16, BHK=16)}
    try:
        check_gradients(op, x, lens, cu, dtype)
    finally:
        op.configs = {}


def test_unsupported_specs_are_refused_by_name(monkeypatch):
    spec = spec_of()
    with pytest.raises(SpecError, match="indexer.topk"):
        nsagen.build(spec.replace(topk=8192))
    # FP8 keys need FP8 tensor cores: a GPU before sm_89 is refused by name
    from nsagen.checks import check_fp8_keys_device
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="float8_e4m3 needs FP8 tensor cores.*sm_80"):
        check_fp8_keys_device(spec.replace(key_dtype="float8_e4m3"), torch.device("cuda", 0))
    check_fp8_keys_device(spec, torch.device("cuda", 0))     # bf16 keys run anywhere


@pytest.mark.parametrize("kv,dk,dtype,dense", [(1, 24, torch.float32, False),
                                               (2, 40, torch.float32, False),
                                               (1, 24, torch.float16, False),
                                               (2, 24, torch.float32, True),
                                               (1, 40, torch.float16, True)])
def test_indexer_loss_and_its_gradient_match_reference(kv, dk, dtype, dense):
    """The loss kernel (sparse stage, or the dense warm-up) and its backward against the
    float64 reference (value and gradients to q_idx, k_idx, w_idx; none to q or k), a batch of
    two."""
    spec = spec_of(kv=kv, dk=dk, topk=16)
    op = nsagen.build(spec)
    g = torch.Generator().manual_seed(kv + dk)
    B, T = 2, 29
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x = dict(q=r(B, T, 4, dk), k=r(B, T, kv, dk), q_idx=r(B, T, 2, 8), k_idx=r(B, T, 8),
             w_idx=r(B, T, 2))
    for n in ("q_idx", "k_idx", "w_idx", "q"):
        x[n].requires_grad_(True)
    loss = op.indexer_loss(**x, dense=dense)
    grads = torch.autograd.grad(loss, [x["q_idx"], x["k_idx"], x["w_idx"]])
    ref_in = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    ref = reference.dsa_indexer_loss(**ref_in, spec=spec, dense=dense)
    want = torch.autograd.grad(ref, [ref_in["q_idx"], ref_in["k_idx"], ref_in["w_idx"]])
    tol = 1e-4 if dtype == torch.float32 else 5e-3
    assert loss.dtype == dtype and abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    for name, a, b in zip(("q_idx", "k_idx", "w_idx"), grads, want):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    assert torch.autograd.grad(loss, x["q"], allow_unused=True)[0] is None


@pytest.mark.parametrize("kv,with_values", [(1, False), (2, True)])
def test_decoding_token_by_token_equals_the_prefill(kv, with_values):
    """A cache prefilled with different lengths per sequence, then one token per step: each
    step's output equals the prefill's row for that token (float64 reference on the same
    sequences), and its picks are the prefill's picks by score."""
    spec = spec_of(kv=kv, topk=8)
    op = nsagen.build(spec)
    g = torch.Generator().manual_seed(7 + kv)
    B, T, L = 2, 19, 24
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(q=r(B, T, 4, 24), k=r(B, T, kv, 24), v=r(B, T, kv, 16) if with_values else None,
             q_idx=r(B, T, 2, 8), k_idx=r(B, T, 8), w_idx=r(B, T, 2))
    ref = reference.dsa(*(None if t is None else t.double() for t in x.values()), spec)
    cache = op.new_cache(B, L, with_values=with_values)
    start = torch.tensor([5, 11])
    cache.prefill(x["k"], x["v"], x["k_idx"], start)
    rows = torch.arange(B)
    steps = T - int(start.max())           # every sequence gets a token each step
    for step in range(steps):
        t = start + step
        pick = lambda n: None if x[n] is None else x[n][rows, t]  # noqa: E731
        o, idx = cache.decode(pick("q"), pick("k"), pick("v"), pick("q_idx"), pick("k_idx"),
                              pick("w_idx"), return_indices=True)
        assert rel_err(o, ref[rows, t]) < 1e-4, (step, rel_err(o, ref[rows, t]))
        assert ((idx >= 0).sum(1) == torch.clamp(t + 1, max=spec.topk)).all()
    assert torch.equal(cache.lens, (start + steps).to(torch.int32))
    cache.rewind(2)
    assert torch.equal(cache.lens, (start + steps - 2).to(torch.int32))


def test_decode_inputs_are_checked_by_name():
    spec = spec_of(kv=2)
    cache = nsagen.build(spec).new_cache(2, 16)
    k_t, v_t, ki = torch.randn(2, 2, 24), torch.randn(2, 2, 16), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"k_t: expected shape \[B, H, Dk\]"):
        cache.append(torch.randn(2, 1, 24), v_t, ki)
    with pytest.raises(ValueError, match="v_t: this cache holds values"):
        cache.append(k_t, None, ki)
    cache.append(k_t, v_t, ki)
    with pytest.raises(TypeError, match="w_idx: expected a floating-point dtype"):
        cache.step(torch.randn(2, 4, 24), torch.randn(2, 2, 8), torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="prefill: k: expected"):
        cache.prefill(torch.randn(3, 4, 2, 24), None, torch.randn(3, 4, 8), torch.tensor([1, 2, 3]))
    # a prefill that raises writes nothing: v, k_idx and lens are checked before k is written
    before = (cache.k.clone(), cache.v.clone(), cache.k_idx.clone(), cache.lens.clone())
    k, v, ki, lens = torch.randn(2, 4, 2, 24), torch.randn(2, 4, 2, 16), torch.randn(2, 4, 8), \
        torch.tensor([4, 2])
    bad = [(dict(v=v[:1]), ValueError, r"prefill: v: expected \[B, T, H, Dv\]"),
           (dict(v=None), ValueError, "prefill: v: this cache holds values"),
           (dict(k_idx=ki[:, :3]), ValueError, r"prefill: k_idx: expected \[B, T, DI\]"),
           (dict(k_idx=ki.long()), TypeError, "prefill: k_idx: expected a floating-point"),
           (dict(lens=torch.tensor([5, 2])), ValueError, "prefill: lens: each must be in 0 .. T = 4"),
           (dict(lens=torch.tensor([1.0, 2.0])), ValueError, "prefill: lens: expected"),
           (dict(k=torch.randn(2, 17, 2, 24), v=torch.randn(2, 17, 2, 16),
                 k_idx=torch.randn(2, 17, 8)), ValueError, "exceed the cache's max_len 16")]
    for change, err, match in bad:
        args = {**dict(k=k, v=v, k_idx=ki, lens=lens), **change}
        with pytest.raises(err, match=match):
            cache.prefill(args["k"], args["v"], args["k_idx"], args["lens"])
        after = (cache.k, cache.v, cache.k_idx, cache.lens)
        assert all(torch.equal(a, b) for a, b in zip(before, after)), match


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kv,di", [(1, 8), (2, 40)])
def test_fp8_indexer_keys(kv, di, dtype):
    """FP8 indexer keys: the picks score as well as the float64 reference's on the quantized
    values (tight), the output is the reference attention on them, and the FP8 picks differ
    from the unquantized ones only where quantization moves scores (by score, loosely)."""
    spec = spec_of(kv=kv, di=di, topk=8).replace(key_dtype="float8_e4m3")
    op = nsagen.build(spec)
    lens = [37, 5]
    x, cu = dsa_inputs(spec, lens, dtype, "cpu", seed=11 + kv)
    check_forward(op, x, lens, dtype)
    with torch.no_grad():
        o, idx = op(*x.values(), cu_seqlens=cu, return_indices=True)
    exact = reference.dsa_index_scores(*(x[n].double() for n in ("q_idx", "k_idx", "w_idx")))[0]
    got = idx[0].long()
    mine = torch.where(got >= 0, exact.gather(1, got.clamp(min=0)), 0.0).sum(1)
    ref_idx = reference.dsa(*(t.double() for t in x.values()), spec, cu_seqlens=cu,
                            return_indices=True)[1][0].long()
    best = torch.where(ref_idx >= 0, exact.gather(1, ref_idx.clamp(min=0)), 0.0).sum(1)
    # the summed exact scores of the FP8 picks fall short of the best by quantization error only
    assert ((best - mine) <= 0.05 * exact.abs().amax()).all()


def test_fp8_keys_decode_cache_stores_fp8_and_matches_the_prefill():
    spec = spec_of(kv=1, topk=8).replace(key_dtype="float8_e4m3")
    op = nsagen.build(spec)
    g = torch.Generator().manual_seed(4)
    B, T = 2, 14
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(q=r(B, T, 4, 24), k=r(B, T, 1, 24), v=r(B, T, 1, 16), q_idx=r(B, T, 2, 8),
             k_idx=r(B, T, 8), w_idx=r(B, T, 2))
    cache = op.new_cache(B, 16)
    assert cache.k_idx.dtype == torch.float8_e4m3fn and cache.k_idx_scale.shape == (B, 16)
    start = torch.tensor([9, 12])
    cache.prefill(x["k"], x["v"], x["k_idx"], start)
    rows = torch.arange(B)
    t = start
    pick = {n: x[n][rows, t] for n in x}
    o, idx = cache.decode(pick["q"], pick["k"], pick["v"], pick["q_idx"], pick["k_idx"],
                          pick["w_idx"], return_indices=True)
    with torch.no_grad():
        full_o, full_idx = op(*x.values(), return_indices=True)
    # the step scores the same quantized keys as the prefill: the same picks, the same output
    assert torch.equal(idx, full_idx[rows, t])
    assert rel_err(o, full_o[rows, t]) < 1e-5


_E4M3_ROWS = None     # the generated module's in-register quantizer, set by the test below


@triton.jit
def _quantize_rows(x_ptr, y_ptr, s_ptr, N: tl.constexpr):
    r = tl.arange(0, 16)[:, None] * N + tl.arange(0, N)[None, :]
    y, s = _E4M3_ROWS(tl.load(x_ptr + r))
    tl.store(y_ptr + r, y.to(tl.float8e4nv).to(tl.float32))
    tl.store(s_ptr + tl.arange(0, 16), s)


def test_fp8_query_rounding_in_registers_equals_the_stored_keys_rounding():
    """The indexer quantizes its query rows in registers exactly as keys are stored (torch's
    round-to-nearest-even float8_e4m3 with a per-row scale): every magnitude from subnormal to
    448, zero rows, ties."""
    global _E4M3_ROWS
    mod = nsagen.build(spec_of().replace(key_dtype="float8_e4m3")).module
    _E4M3_ROWS = mod._e4m3_rows
    N = 256
    x = torch.randn(16, N, generator=torch.Generator().manual_seed(0))
    x *= torch.logspace(-8, 3, 16)[:, None]
    x[0] = torch.arange(N) * (448 / 255)
    x[1, : N // 2] = 1e-30
    x[2] = 0
    x[3, 0], x[3, 1:] = 448, torch.linspace(-0.02, 0.02, N - 1) * 448
    y, s = torch.empty(16, N), torch.empty(16)
    _quantize_rows[(1,)](x, y, s, N)
    k8, scale = mod.quantize_keys(x)
    assert torch.equal(s, scale)
    assert torch.equal(y, k8.float())


def test_training_paths_are_registered_ops_and_the_loss_takes_packed_sequences():
    """The attention and the loss run as torch.library ops (what torch.compile traces); the
    loss of packed sequences (cu_seqlens) is the sum of each sequence's, gradients included."""
    spec = spec_of(kv=2)
    op = nsagen.build(spec)
    name = op.op_name.split("::")[1]
    for suffix in ("_fwd", "_bwd", "_loss", "_loss_bwd"):
        assert hasattr(torch.ops.nsagen, name + suffix), suffix
    lens = [17, 9, 1]
    x, cu = dsa_inputs(spec, lens, torch.float32, "cpu", seed=4)
    del x["v"]
    for n in ("q_idx", "k_idx", "w_idx"):
        x[n].requires_grad_(True)
    loss = op.indexer_loss(**x, cu_seqlens=cu)
    got = torch.autograd.grad(loss, [x["q_idx"], x["k_idx"], x["w_idx"]])
    ref_in = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    ref = sum(reference.dsa_indexer_loss(*(ref_in[n][:, a:a + m] for n in
                                           ("q", "k", "q_idx", "k_idx", "w_idx")), spec)
              for a, m in zip(cu.tolist(), lens))
    want = torch.autograd.grad(ref, [ref_in["q_idx"], ref_in["k_idx"], ref_in["w_idx"]])
    assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4
