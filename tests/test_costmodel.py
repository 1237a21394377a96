"""The sympy cost model against brute-force counts by loops and the reference's own arithmetic."""
import functools

import pytest
import sympy as sp
import torch

import nsagen
from nsagen import costmodel as S, reference
from nsagen.spec import Spec


def _spec(name, *, l=32, d=16, lb=64, n=4, init=1, local=2, w=40, branches=("cmp", "slc", "win"),
          hq=4, h=2, dk=16, dv=8, kv="shared", dtype="float32"):
    d_ = {"name": name, "heads": {"q": hq, "kv": h}, "head_dim": {"qk": dk, "v": dv},
          "dtype": dtype, "compression": {"block": l, "stride": d, "kind": "mean"},
          "selection": {"block": lb, "count": n, "initial": init, "local": local},
          "branches": list(branches), "kv_per_branch": kv}
    if w is not None:
        d_["window"] = w
    return Spec.from_dict(d_)


SPECS = [
    _spec("paper-small"),
    _spec("fla-like", l=16, d=16, lb=16, n=3, w=None, branches=("cmp", "slc")),
    _spec("odd-ratio", l=24, d=8, lb=16, n=3, init=0, local=1, w=7, hq=6, h=3, dtype="bfloat16"),
    _spec("no-local", l=8, d=4, lb=8, n=2, init=0, local=0, branches=("slc",)),
    _spec("win-only", branches=("win",), w=5),
    _spec("sep", kv="separate", dtype="float16"),
]
LENGTHS = [1, 2, 7, 15, 16, 23, 31, 32, 33, 47, 64, 65, 100, 129, 257]


def _ids(specs):
    return [s.name for s in specs]


# ---------------------------------------------------------------------------- brute force
def _brute_cmp(spec, t):
    nc = spec.num_cmp(t + 1 + spec.cmp_block)  # more than enough tokens
    return sum(1 for i in range(nc) if i * spec.cmp_stride + spec.cmp_block - 1 <= t)


def _brute_win(spec, t):
    return sum(1 for k in range(t + 1) if k > t - spec.window)


def _brute_slc(spec, T, seed=0):
    """Selected tokens <= t for every query t, with random block scores through the reference."""
    g = torch.Generator().manual_seed(seed)
    nb = spec.num_blocks(T)
    score = torch.rand(1, T, spec.heads_kv, nb, generator=g, dtype=torch.float64)
    pos = torch.arange(T)
    idx = reference.select_blocks(spec, score, pos)[0, :, 0]  # [T, n]
    out = []
    for t in range(T):
        toks = [blk * spec.slc_block + o for blk in idx[t].tolist() if blk >= 0
                for o in range(spec.slc_block)]
        out.append(sum(1 for k in toks if k <= t))
    return out


@functools.lru_cache(maxsize=None)
def _brute_keys(spec, T, seed=0):
    """Per-query key counts of every branch (cmp scores counted whenever cmp or slc is present)."""
    slc = _brute_slc(spec, T, seed) if spec.has("slc") else [0] * T
    return {
        "cmp": [_brute_cmp(spec, t) for t in range(T)],
        "slc": slc,
        "win": [_brute_win(spec, t) if spec.has("win") else 0 for t in range(T)],
    }


def _counted_keys(spec, T):
    """Brute-force keys, with the documented bound for selection without forced local blocks."""
    keys = dict(_brute_keys(spec, T))
    if spec.has("slc") and spec.slc_local < 1:
        keys["slc"] = [min(spec.slc_count * spec.slc_block, t + 1) for t in range(T)]
    return keys


def _brute_fwd_flops(spec, T, batch):
    keys = _counted_keys(spec, T)
    dk, dv = spec.dim_qk, spec.dim_v
    nnz = (reference.block_weights(spec, spec.num_cmp(T + 4 * spec.slc_block),
                                   spec.num_blocks(T + 4 * spec.slc_block)) > 0).sum(1).max().item()
    f = 0
    for t in range(T):
        if spec.has("cmp") or spec.has("slc"):
            f += 2 * dk * keys["cmp"][t]            # q . k_cmp, once for both uses
        if spec.has("cmp"):
            f += 2 * dv * keys["cmp"][t]
        if spec.has("slc"):
            f += 2 * nnz * keys["cmp"][t]           # importance map
            f += 2 * (dk + dv) * keys["slc"][t]
        if spec.has("win"):
            f += 2 * (dk + dv) * keys["win"][t]
    return batch * spec.heads_q * f


# ---------------------------------------------------------------------------- index arithmetic
@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_num_cmp_and_blocks_match_spec(spec):
    for n in list(range(1, 100)) + [127, 128, 129, 255, 256, 257, 1000, 4097]:
        assert S.evaluate(S.num_cmp_expr(spec), T=n) == spec.num_cmp(n)
        assert S.evaluate(S.num_blocks_expr(spec), T=n) == spec.num_blocks(n)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_visible_keys_per_query_match_loops(spec):
    T = 140
    brute = _brute_keys(spec, T)
    kpq = S.keys_per_query(spec)
    assert set(kpq) == set(spec.branches) | {"total"}
    for t in range(T):
        assert S.evaluate(S.cmp_visible(spec), t=t) == brute["cmp"][t]
        if spec.has("win"):
            assert S.evaluate(kpq["win"], t=t) == brute["win"][t]
        if spec.has("slc"):
            got = S.evaluate(kpq["slc"], t=t)
            if spec.slc_local >= 1:
                assert got == brute["slc"][t], t
            else:
                assert brute["slc"][t] <= got == min(spec.slc_count * spec.slc_block, t + 1)
        total = sum(S.evaluate(kpq[b], t=t) for b in spec.branches)
        assert S.evaluate(kpq["total"], t=t) == total


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_causal_sums_match_loops(spec):
    brute = _brute_keys(spec, max(LENGTHS))
    for T in LENGTHS:
        for b in ("cmp", "slc", "win"):
            got = S.evaluate(S.causal_keys(spec, b), T=T)
            if b == "slc" and spec.has("slc") and spec.slc_local < 1:
                bound = sum(min(spec.slc_count * spec.slc_block, t + 1) for t in range(T))
                assert sum(brute[b][:T]) <= got == bound
            elif b != "slc" or spec.has("slc"):
                assert got == sum(brute[b][:T]), (b, T)


def test_causal_keys_rejects_unknown_branch():
    with pytest.raises(ValueError, match="unknown branch"):
        S.causal_keys(SPECS[0], "dense")


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_block_weights_agree_with_reference(spec):
    w = S.block_weights(spec)
    assert w.shape[0] == 1 and all(isinstance(x, sp.Integer) for x in w)
    first, last = S.block_weight_span(spec)
    nb = 6
    ref = reference.block_weights(spec, (nb * spec.slc_block) // spec.cmp_stride + 1, nb)
    for jj in range(1, nb):
        lo, hi = int(first.subs(S.j, jj)), int(last.subs(S.j, jj))
        col = ref[:, jj]
        assert [int(x) for x in col[lo:hi + 1]] == list(w), jj
        assert col[:max(lo, 0)].sum() == 0 and col[hi + 1:].sum() == 0
    # the symbolic entry agrees everywhere, including the first block
    expr = S.block_weight_expr(spec)
    for ii in range(ref.shape[0]):
        for jj in range(nb):
            assert int(expr.subs({S.i: ii, S.j: jj})) == int(ref[ii, jj])
    assert S.blocks_per_cmp_token(spec) == int((ref > 0).sum(1).max())


def test_block_weights_examples():
    paper = nsagen.load_spec("nsa-paper")
    assert list(S.block_weights(paper)) == [1, 2, 2, 2, 1]
    first, last = S.block_weight_span(paper)
    assert (first, last) == (4 * S.j - 1, 4 * S.j + 3)
    assert list(S.block_weights(nsagen.load_spec("nsa-fla"))) == [1]


# ---------------------------------------------------------------------------- FLOPs and bytes
@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
@pytest.mark.parametrize("T", [1, 7, 31, 33, 100, 129])
def test_fwd_and_bwd_flops_match_loops(spec, T):
    assert S.evaluate(S.fwd_flops(spec), T=T, B=3) == _brute_fwd_flops(spec, T, 3)
    keys = _counted_keys(spec, T)
    mm = sum(2 * (spec.dim_qk + spec.dim_v) * sum(keys[b]) for b in spec.branches)
    assert S.evaluate(S.bwd_flops(spec), T=T, B=2) == 2 * spec.heads_q * mm * 5 // 2


def _numel_bytes(*tensors):
    return sum(x.numel() * x.element_size() for x in tensors if x is not None)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
@pytest.mark.parametrize("T", [1, 33, 100])
def test_bytes_match_tensor_sizes(spec, T):
    Bt, HQ, H, Dk, Dv = 2, spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
    dt = getattr(torch, spec.dtype)
    nc = spec.num_cmp(T)
    e = lambda *shape: torch.empty(*shape, dtype=dt)  # noqa: E731
    q, o, gates = e(Bt, T, HQ, Dk), e(Bt, T, HQ, Dv), e(Bt, T, HQ, 3)
    kv = [e(Bt, T, H, Dk), e(Bt, T, H, Dv)] if spec.has("slc") or spec.has("win") else []
    if spec.kv_per_branch == "separate" and spec.has("slc") and spec.has("win"):
        kv += [e(Bt, T, H, Dk), e(Bt, T, H, Dv)]
    kc = e(Bt, nc, H, Dk) if spec.has("cmp") or spec.has("slc") else None
    vc = e(Bt, nc, H, Dv) if spec.has("cmp") else None
    idx = torch.empty(Bt, T, H, spec.slc_count, dtype=torch.int32) if spec.has("slc") else None
    inputs = _numel_bytes(q, *kv, kc, vc, gates)
    assert S.evaluate(S.fwd_bytes(spec), T=T, B=Bt) == inputs + _numel_bytes(o) + 2 * _numel_bytes(idx)
    lse = torch.empty(Bt, T, HQ, len(spec.branches), dtype=torch.float32)
    assert S.evaluate(S.bwd_bytes(spec), T=T, B=Bt) == (
        2 * inputs + 2 * _numel_bytes(o) + _numel_bytes(lse) + _numel_bytes(idx))


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
@pytest.mark.parametrize("T", [1, 2, 31, 32, 33, 100, 257])
def test_decode_is_the_last_prefill_row(spec, T):
    tokens = S.evaluate(S.decode_tokens(spec), T=T)
    kpq = S.keys_per_query(spec)
    assert tokens == S.evaluate(kpq["total"], t=T - 1)
    assert tokens <= sum([spec.num_cmp(T) if spec.has("cmp") else 0,
                          spec.slc_count * spec.slc_block if spec.has("slc") else 0,
                          spec.window if spec.has("win") else 0])
    # decode FLOPs = prefill FLOPs of T tokens minus those of T - 1 tokens
    fwd = S.fwd_flops(spec)
    prev = S.evaluate(fwd, T=T - 1, B=2) if T > 1 else 0
    assert S.evaluate(S.decode_flops(spec), T=T, B=2) == S.evaluate(fwd, T=T, B=2) - prev
    # bytes: visible K/V per KV head plus q, gates, o
    e = S.DTYPE_BYTES[spec.dtype]
    k = _brute_keys(spec, T)
    uses_c = spec.has("cmp") or spec.has("slc")
    kv = (k["cmp"][-1] * (spec.dim_qk + (spec.dim_v if spec.has("cmp") else 0)) if uses_c else 0)
    kv += (S.evaluate(kpq["slc"], t=T - 1) if spec.has("slc") else 0) * (spec.dim_qk + spec.dim_v)
    kv += k["win"][-1] * (spec.dim_qk + spec.dim_v)
    want = 2 * e * (spec.heads_kv * kv + spec.heads_q * (spec.dim_qk + spec.dim_v + 3))
    assert S.evaluate(S.decode_bytes(spec), T=T, B=2) == want


def test_paper_decode_bound():
    paper = nsagen.load_spec("specs/nsa-paper.yaml")
    assert S.evaluate(S.num_cmp_expr(paper), T=65536) == 4095
    assert S.evaluate(S.decode_tokens(paper), T=65536) == 4095 + 1024 + 512 == 5631
    s = S.summary(paper, 65536)
    assert s["num_cmp"] == 4095 and s["num_blocks"] == 1024
    assert s["keys_per_query_last"] == {"cmp": 4095, "slc": 1024, "win": 512, "total": 5631}
    assert s["decode_tokens_per_kv_head"] == 5631
    assert round(s["decode_speedup_bound"], 1) == 11.6
    assert s["decode_bytes"] < s["dense_decode_bytes"]
    assert 0 < s["fwd_flops"] < s["dense_fwd_flops"]
    assert s["bwd_flops"] > s["fwd_flops"]


def test_summary_small_and_batched():
    spec = SPECS[0]
    s1, s4 = S.summary(spec, 33), S.summary(spec, 33, batch=4)
    assert s1["num_cmp"] == spec.num_cmp(33) == 1
    for key in ("fwd_flops", "fwd_bytes", "bwd_flops", "bwd_bytes", "decode_flops", "decode_bytes"):
        assert s4[key] == 4 * s1[key], key
    assert s1["decode_tokens_per_kv_head"] == s4["decode_tokens_per_kv_head"]
    one = S.summary(spec, 1)
    assert one["num_cmp"] == 0 and one["keys_per_query_last"]["cmp"] == 0


def test_evaluate():
    assert S.evaluate(S.T * S.B, T=3, B=4) == 12
    assert isinstance(S.evaluate(S.T / 2, T=3), float)
    with pytest.raises(ValueError, match="free symbols"):
        S.evaluate(S.T * S.B, T=3)


def test_context_parallel_model():
    """All-gather-KV context parallelism: a rank receives the (W - 1) / W of k and v it does
    not hold (and gives back as much in the reduce-scatter); one rank moves nothing; what a
    layer keeps per rank is its share of the query-side tensors plus the whole k and v."""
    from nsagen import costmodel as cm

    spec = nsagen.load_spec("nsa-d128")
    T = 1 << 16
    kv = T * spec.heads_kv * (spec.dim_qk + spec.dim_v) * 2          # bf16 k and v
    moved = cm.cp_bytes(spec)
    assert cm.evaluate(moved["all_gather"], T=T, B=1, W=1) == 0
    assert cm.evaluate(moved["all_gather"], T=T, B=1, W=4) == kv * 3 // 4
    assert cm.evaluate(moved["reduce_scatter"], T=T, B=2, W=2) == kv
    mem = [cm.evaluate(cm.cp_memory_bytes(spec), T=T, B=1, W=w) for w in (1, 2, 8)]
    assert mem[0] > mem[1] > mem[2] > kv
    learned = nsagen.load_spec("nsa-paper")
    nc = learned.num_cmp(T)
    extra = nc * learned.heads_kv * (learned.dim_qk + learned.dim_v) * 2
    kv_p = T * learned.heads_kv * (learned.dim_qk + learned.dim_v) * 2
    assert cm.evaluate(cm.cp_bytes(learned)["all_gather"], T=T, B=1, W=2) == (kv_p + extra) // 2
