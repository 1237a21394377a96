"""nsagen.reference against a naive float64 loop (tests/naive.py) and the invariants of docs/algorithm.md.

All checks run in float64 on tiny shapes with block sizes small enough that selection really
excludes blocks. Relative errors must stay under 1e-10 and block choices must match exactly
(ties are broken the same documented way: lower block index first).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nsagen
from nsagen import reference

from naive import naive_nsa

F64 = torch.float64
TOL = 1e-10
ALL = ("cmp", "slc", "win")
SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(ALL, r)]


# ---------------------------------------------------------------------------------------- helpers
def make_spec(hq=4, h=2, dk=8, dv=8, l=8, d=4, lp=8, n=3, init=1, local=1, w=8, kind="mean",
              branches=ALL, scale=None, kv="shared", dtype="float32"):
    spec = {
        "name": "test",
        "heads": {"q": hq, "kv": h},
        "head_dim": {"qk": dk, "v": dv},
        "dtype": dtype,
        "compression": {"block": l, "stride": d, "kind": kind},
        "selection": {"block": lp, "count": n, "initial": init, "local": local},
        "window": w,
        "branches": list(branches),
        "kv_per_branch": kv,
    }
    if scale is not None:
        spec["scale"] = scale
    return nsagen.Spec.from_dict(spec)


def cu_of(lens):
    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    return torch.tensor(offs, dtype=torch.int32)


def make_inputs(spec, B, T, seed, lens=None, gates=True, requires_grad=False):
    """Fresh random float64 inputs for a prefill call (packed when lens is given)."""
    gen = torch.Generator().manual_seed(seed)
    if lens is not None:
        B, T = 1, sum(lens)

    def rnd(*shape):
        x = torch.randn(*shape, generator=gen, dtype=F64)
        return x.requires_grad_(requires_grad)

    HQ, H, Dk, Dv = spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
    x = dict(q=rnd(B, T, HQ, Dk), k=rnd(B, T, H, Dk), v=rnd(B, T, H, Dv), gates=None,
             k_cmp=None, v_cmp=None, cu_seqlens=None if lens is None else cu_of(lens))
    if gates:
        x["gates"] = torch.rand(B, T, HQ, 3, generator=gen, dtype=F64).requires_grad_(requires_grad)
    if spec.learned_compression and (spec.has("cmp") or spec.has("slc")):
        nc = sum(spec.num_cmp(n) for n in (lens or [T]))
        x["k_cmp"], x["v_cmp"] = rnd(B, nc, H, Dk), rnd(B, nc, H, Dv)
    return x


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def close(a, b, tol=TOL):
    assert a.shape == b.shape
    if b.norm() == 0:
        assert a.norm() == 0
    else:
        err = rel_err(a, b)
        assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


def check_vs_naive(spec, B, T, seed, lens=None, gates=True):
    x = make_inputs(spec, B, T, seed, lens=lens, gates=gates)
    o, idx, score = reference.nsa(**x, spec=spec, return_indices=True, return_scores=True)
    no, nidx, nscore = naive_nsa(**x, spec=spec, return_scores=True)
    Bt, Tt = x["q"].shape[:2]
    assert o.dtype == F64 and o.shape == (Bt, Tt, spec.heads_q, spec.dim_v)
    assert torch.isfinite(o).all()
    close(o, no)
    assert idx.dtype == torch.int32 and idx.shape == (Bt, Tt, spec.heads_kv, spec.slc_count)
    if spec.has("slc"):
        assert torch.equal(idx, nidx)
        close(score, nscore)        # the block importance itself, not only its ranking
    return x, o, idx


def dense_causal(q, k, v, scale, window=None):
    """Full causal GQA attention with torch (query head h uses KV head h // G)."""
    G = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(G, 2)
    v = v.repeat_interleave(G, 2)
    T = q.shape[1]
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    t = torch.arange(T)
    mask = t[None, :] <= t[:, None]
    if window is not None:
        mask &= t[None, :] > t[:, None] - window
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)


def const_gates(B, T, HQ, cmp, slc, win):
    return torch.tensor([cmp, slc, win], dtype=F64).expand(B, T, HQ, 3).contiguous()


# ------------------------------------------------------------------------- reference vs naive loop
@pytest.mark.parametrize("T", [1, 2, 5, 7, 8, 9, 12, 31, 64, 97])
def test_lengths(T):
    check_vs_naive(make_spec(), B=2, T=T, seed=T)


@pytest.mark.parametrize("hq,h", [(2, 2), (4, 2), (4, 1), (16, 1), (32, 2)])
def test_group_sizes(hq, h):
    check_vs_naive(make_spec(hq=hq, h=h), B=1, T=45, seed=hq + h)


@pytest.mark.parametrize("dk,dv", [(12, 5), (4, 16), (3, 3)])
def test_head_dims(dk, dv):
    check_vs_naive(make_spec(dk=dk, dv=dv), B=2, T=39, seed=dk * dv)


@pytest.mark.parametrize("branches", SUBSETS, ids=["+".join(s) for s in SUBSETS])
@pytest.mark.parametrize("kind", ["mean", "mlp"])
def test_branch_subsets(branches, kind):
    check_vs_naive(make_spec(branches=branches, kind=kind, hq=4, h=2), B=2, T=53, seed=len(branches))


BLOCKS = [
    # l, d, l', n, initial, local, w
    (8, 4, 8, 3, 1, 1, 8),
    (8, 4, 16, 4, 1, 2, 16),
    (8, 4, 8, 4, 1, 2, 12),
    (4, 4, 4, 3, 1, 1, 5),      # l = d = l': importance is the identity
    (16, 4, 8, 3, 1, 1, 9),     # window longer than a selection block
    (8, 8, 16, 3, 1, 1, 7),     # non-overlapping windows
    (4, 2, 8, 3, 0, 0, 3),      # pure top-n, nothing forced
    (8, 4, 8, 3, 2, 0, 8),      # initial blocks only
    (8, 4, 8, 3, 0, 2, 8),      # local blocks only
    (8, 4, 8, 1, 0, 1, 4),      # only the query's own block
    (8, 4, 8, 1, 0, 0, 4),      # one block, by score
    (8, 4, 8, 3, 3, 0, 1),      # w = 1
]


@pytest.mark.parametrize("l,d,lp,n,init,local,w", BLOCKS)
def test_block_configs(l, d, lp, n, init, local, w):
    spec = make_spec(l=l, d=d, lp=lp, n=n, init=init, local=local, w=w)
    check_vs_naive(spec, B=2, T=71, seed=l * 100 + lp * 10 + n)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("T", [3, 8, 50])
def test_learned_compression(kind, T):
    check_vs_naive(make_spec(kind=kind, dk=6, dv=10), B=2, T=T, seed=T)


def test_explicit_scale_and_no_gates():
    check_vs_naive(make_spec(scale=0.9), B=2, T=40, seed=3)
    check_vs_naive(make_spec(), B=2, T=40, seed=4, gates=False)


@pytest.mark.parametrize("kind", ["mean", "mlp"])
@pytest.mark.parametrize("lens", [[1, 17, 9, 40], [23], [7, 1, 1, 33, 8], [16, 12]])
def test_varlen(kind, lens):
    check_vs_naive(make_spec(kind=kind), B=None, T=None, seed=sum(lens), lens=lens)


@pytest.mark.parametrize("init,local", [(0, 1), (1, 0), (0, 0), (2, 1)])
def test_ties_go_to_the_lower_block(init, local):
    """Identical keys make every fully covered block score the same: the lowest indices win."""
    spec = make_spec(l=4, d=4, lp=4, n=4, init=init, local=local, hq=2, h=1)
    B, T = 1, 40
    x = make_inputs(spec, B, T, seed=1)
    # small integers: every dot product is exact, whatever the summation order
    x["q"] = (2 * x["q"]).round()
    x["k"] = (2 * x["k"][:, :1]).round().expand(B, T, 1, spec.dim_qk).contiguous()
    o, idx = reference.nsa(**x, spec=spec, return_indices=True)
    no, nidx = naive_nsa(**x, spec=spec)
    close(o, no)
    assert torch.equal(idx, nidx)
    for t in range(T):
        jt = t // 4
        forced = {j for j in range(jt + 1) if j < init or jt - local < j <= jt}
        # block jt is fully covered only at its last token; before that it scores 0
        full = [j for j in range(jt + 1) if j * 4 + 3 <= t and j not in forced]
        free = full + [j for j in range(jt + 1) if j not in forced and j not in full]
        want = sorted(forced | set(free[: 4 - len(forced)]))
        assert idx[0, t, 0].tolist() == want + [-1] * (4 - len(want)), t


def test_separate_kv_per_branch():
    spec = make_spec(kv="separate")
    x = make_inputs(spec, 2, 37, seed=5)
    gen = torch.Generator().manual_seed(6)
    x["k_win"] = torch.randn(x["k"].shape, generator=gen, dtype=F64)
    x["v_win"] = torch.randn(x["v"].shape, generator=gen, dtype=F64)
    o, idx = reference.nsa(**x, spec=spec, return_indices=True)
    no, nidx = naive_nsa(**x, spec=spec)
    close(o, no)
    assert torch.equal(idx, nidx)


def test_query_chunking(monkeypatch):
    """The reference processes queries in chunks to bound memory; tiny chunks give the same."""
    spec = make_spec(n=4, local=2, w=11)
    x = make_inputs(spec, 2, 45, seed=9)
    whole, whole_idx = reference.nsa(**x, spec=spec, return_indices=True)
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 1)
    o, idx = reference.nsa(**x, spec=spec, return_indices=True)
    no, _ = naive_nsa(**x, spec=spec)
    close(o, no)
    close(o, whole)
    assert torch.equal(idx, whole_idx)


@st.composite
def problems(draw):
    G = draw(st.sampled_from([1, 2, 4, 16]))
    H = 1 if G == 16 else draw(st.integers(1, 2))
    d = draw(st.sampled_from([1, 2, 4]))
    l = d * draw(st.integers(1, 3))
    lp = d * draw(st.integers(1, 4))
    n = draw(st.integers(1, 5))
    init = draw(st.integers(0, n))
    local = draw(st.integers(0, n - init))
    spec = make_spec(hq=G * H, h=H, dk=draw(st.integers(1, 9)), dv=draw(st.integers(1, 9)),
                     l=l, d=d, lp=lp, n=n, init=init, local=local, w=draw(st.integers(1, 20)),
                     kind=draw(st.sampled_from(["mean", "mlp"])),
                     branches=draw(st.sampled_from(SUBSETS)))
    tmax = 24 if G == 16 else 60
    if draw(st.booleans()):
        lens = draw(st.lists(st.integers(1, tmax // 2), min_size=1, max_size=4))
        return spec, None, None, lens
    return spec, draw(st.integers(1, 2)), draw(st.integers(1, tmax)), None


@settings(max_examples=40, deadline=None, derandomize=True)
@given(problems(), st.integers(0, 2 ** 16))
def test_random_problems(problem, seed):
    spec, B, T, lens = problem
    check_vs_naive(spec, B, T, seed, lens=lens)


# ------------------------------------------------------------------------------ invariants (sec. 6)
@pytest.mark.parametrize("kind", ["mean", "mlp"])
@pytest.mark.parametrize("hq,h,n,init,local", [(4, 2, 6, 1, 2), (4, 1, 6, 0, 0), (2, 2, 7, 1, 1)])
def test_selection_covering_everything_is_dense(kind, hq, h, n, init, local):
    spec = make_spec(hq=hq, h=h, lp=8, n=n, init=init, local=local, kind=kind)
    B, T = 2, min(45, n * 8)
    assert spec.slc_count * spec.slc_block >= T
    x = make_inputs(spec, B, T, seed=n)
    x["gates"] = const_gates(B, T, hq, 0, 1, 0)
    o = reference.nsa(**x, spec=spec)
    close(o, dense_causal(x["q"], x["k"], x["v"], spec.softmax_scale))
    # with only the slc branch and no gates, likewise
    only = make_spec(hq=hq, h=h, lp=8, n=n, init=init, local=local, kind=kind, branches=["slc"])
    x["gates"] = None
    close(reference.nsa(**x, spec=only), dense_causal(x["q"], x["k"], x["v"], spec.softmax_scale))


@pytest.mark.parametrize("T,w", [(30, 30), (17, 40), (1, 1)])
def test_window_covering_everything_is_dense(T, w):
    spec = make_spec(w=w, hq=4, h=2)
    B = 2
    x = make_inputs(spec, B, T, seed=T)
    x["gates"] = const_gates(B, T, 4, 0, 0, 1)
    close(reference.nsa(**x, spec=spec), dense_causal(x["q"], x["k"], x["v"], spec.softmax_scale))


def test_window_branch_is_banded_attention():
    spec = make_spec(w=6, branches=["win"])
    x = make_inputs(spec, 2, 33, seed=1, gates=False)
    close(reference.nsa(**x, spec=spec),
          dense_causal(x["q"], x["k"], x["v"], spec.softmax_scale, window=6))


@pytest.mark.parametrize("kind", ["mean", "mlp"])
@pytest.mark.parametrize("l,d,lp,n,init,local", [(8, 4, 8, 3, 1, 1), (8, 4, 16, 4, 1, 2),
                                                  (4, 2, 4, 4, 2, 1), (8, 4, 8, 2, 0, 0)])
def test_index_invariants(kind, l, d, lp, n, init, local):
    spec = make_spec(hq=8, h=2, l=l, d=d, lp=lp, n=n, init=init, local=local, kind=kind)
    B, T = 2, 100
    x = make_inputs(spec, B, T, seed=lp + n)
    _, idx = reference.nsa(**x, spec=spec, return_indices=True)
    assert idx.dtype == torch.int32 and idx.shape == (B, T, spec.heads_kv, n)
    for b, t, g in itertools.product(range(B), range(T), range(spec.heads_kv)):
        row = idx[b, t, g].tolist()
        jt = t // lp
        valid = [j for j in row if j >= 0]
        assert row == valid + [-1] * (n - len(valid)), row          # -1 only at the end
        assert valid == sorted(set(valid)), row                     # strictly ascending
        assert all(0 <= j <= jt for j in valid), (t, row)           # never a future block
        assert len(valid) == min(n, jt + 1), (t, row)
        forced = {j for j in range(jt + 1) if j < init or jt - local < j <= jt}
        assert forced <= set(valid), (t, row, forced)


def test_group_heads_attend_to_the_same_blocks():
    """o_slc of every query head is attention over the blocks of its KV head's index row."""
    spec = make_spec(hq=8, h=2, lp=8, n=3, init=1, local=1)
    B, T, G, lp = 2, 50, spec.group, spec.slc_block
    x = make_inputs(spec, B, T, seed=11)
    x["gates"] = const_gates(B, T, spec.heads_q, 0, 1, 0)
    o, idx = reference.nsa(**x, spec=spec, return_indices=True)
    q, k, v = x["q"], x["k"], x["v"]
    assert idx.shape == (B, T, spec.heads_kv, spec.slc_count)
    excluded = 0
    for b, t, h in itertools.product(range(B), range(T), range(spec.heads_q)):
        blocks = [j for j in idx[b, t, h // G].tolist() if j >= 0]
        pos = [s for j in blocks for s in range(j * lp, (j + 1) * lp) if s <= t]
        excluded += (t + 1) - len(pos)
        p = (k[b, pos, h // G] @ q[b, t, h] * spec.softmax_scale).softmax(0)
        close(o[b, t, h], p @ v[b, pos, h // G])
    assert excluded > 0  # selection did drop tokens


@pytest.mark.parametrize("kind", ["mean", "mlp"])
def test_packed_varlen_equals_per_sequence_loop(kind):
    spec = make_spec(kind=kind)
    lens = [1, 30, 8, 19, 45]
    x = make_inputs(spec, None, None, seed=2, lens=lens)
    o, idx = reference.nsa(**x, spec=spec, return_indices=True)
    t0 = c0 = 0
    for n in lens:
        nc = spec.num_cmp(n)
        part = {key: x[key][:, t0:t0 + n] for key in ("q", "k", "v", "gates")}
        if x["k_cmp"] is not None:
            part["k_cmp"], part["v_cmp"] = x["k_cmp"][:, c0:c0 + nc], x["v_cmp"][:, c0:c0 + nc]
        o_s, idx_s = reference.nsa(**part, spec=spec, return_indices=True)
        close(o[:, t0:t0 + n], o_s, tol=1e-13)
        assert torch.equal(idx[:, t0:t0 + n], idx_s)
        t0, c0 = t0 + n, c0 + nc


def test_batch_rows_are_independent():
    spec = make_spec()
    x = make_inputs(spec, 3, 29, seed=8)
    o = reference.nsa(**x, spec=spec)
    for b in range(3):
        row = {key: (None if val is None else val[b:b + 1]) for key, val in x.items()
               if key != "cu_seqlens"}
        close(o[b:b + 1], reference.nsa(**row, spec=spec), tol=1e-13)


# ----------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("kind", ["mean", "mlp"])
@pytest.mark.parametrize("branches", [ALL, ("slc",), ("cmp", "win")])
def test_decode_equals_prefill_rows(kind, branches):
    spec = make_spec(kind=kind, branches=branches, hq=4, h=2, dk=6, dv=5)
    B, T = 2, 37
    x = make_inputs(spec, B, T, seed=21)
    o, idx = reference.nsa(**x, spec=spec, return_indices=True)
    for t in range(T):
        nc = spec.num_cmp(t + 1)
        kc = None if x["k_cmp"] is None else x["k_cmp"][:, :nc]
        vc = None if x["v_cmp"] is None else x["v_cmp"][:, :nc]
        o_t, idx_t = reference.nsa_decode_step(
            x["q"][:, t], x["k"][:, :t + 1], x["v"][:, :t + 1], x["gates"][:, t], spec,
            k_cmp=kc, v_cmp=vc, return_indices=True)
        assert o_t.shape == (B, spec.heads_q, spec.dim_v)
        close(o_t, o[:, t], tol=1e-12)
        if spec.has("slc"):
            assert torch.equal(idx_t, idx[:, t])


@pytest.mark.parametrize("kind", ["mean", "mlp"])
def test_decode_ragged_cache_seqlens(kind):
    spec = make_spec(kind=kind)
    B, L = 4, 30
    lens = [30, 9, 1, 17]
    x = make_inputs(spec, B, L, seed=31)
    o = reference.nsa(**x, spec=spec)
    # poison everything past each row's length: it must never be read
    k_cache, v_cache = x["k"].clone(), x["v"].clone()
    k_cmp = None if x["k_cmp"] is None else x["k_cmp"].clone()
    v_cmp = None if x["v_cmp"] is None else x["v_cmp"].clone()
    for b, n in enumerate(lens):
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
        if k_cmp is not None:
            k_cmp[b, spec.num_cmp(n):] = float("nan")
            v_cmp[b, spec.num_cmp(n):] = float("nan")
    rows = torch.tensor(lens) - 1
    bi = torch.arange(B)
    o_t = reference.nsa_decode_step(x["q"][bi, rows], k_cache, v_cache, x["gates"][bi, rows], spec,
                                    k_cmp=k_cmp, v_cmp=v_cmp,
                                    cache_seqlens=torch.tensor(lens, dtype=torch.int32))
    assert torch.isfinite(o_t).all()
    close(o_t, o[bi, rows], tol=1e-12)


# ------------------------------------------------------------------------------ NaN-free, gradients
@pytest.mark.parametrize("kind", ["mean", "mlp"])
def test_no_visible_compressed_token_gives_zero(kind):
    spec = make_spec(kind=kind, branches=["cmp"], l=8, d=4)
    for T in (1, 7):   # T < l: no compressed token at all
        x = make_inputs(spec, 2, T, seed=T)
        o = reference.nsa(**x, spec=spec)
        assert torch.equal(o, torch.zeros_like(o))
    x = make_inputs(spec, 2, 20, seed=3)
    o = reference.nsa(**x, spec=spec)
    assert torch.equal(o[:, :7], torch.zeros_like(o[:, :7]))     # t < l - 1
    assert (o[:, 7:].abs().sum(-1) > 0).all()
    close(o, naive_nsa(**x, spec=spec)[0])


@pytest.mark.parametrize("kind", ["mean", "mlp"])
@pytest.mark.parametrize("T", [1, 5, 7, 8, 30])
@pytest.mark.parametrize("mag", [1.0, 60.0])
def test_gradients_are_finite(kind, T, mag):
    spec = make_spec(kind=kind)
    x = make_inputs(spec, 2, T, seed=T)
    with torch.no_grad():
        x["q"] *= mag
        x["k"] *= mag
    names = [key for key in ("q", "k", "v", "gates", "k_cmp", "v_cmp") if x[key] is not None]
    for key in names:
        x[key].requires_grad_(True)
    o = reference.nsa(**x, spec=spec)
    assert torch.isfinite(o).all()
    grads = torch.autograd.grad(o, [x[key] for key in names], torch.randn_like(o))
    for key, gr in zip(names, grads):
        assert gr.shape == x[key].shape
        assert torch.isfinite(gr).all(), key


GRADCHECK_SPECS = {
    "all-mean": dict(hq=2, h=1, dk=3, dv=2, l=4, d=2, lp=4, n=3, init=1, local=1, w=3),
    "all-mlp": dict(hq=4, h=2, dk=3, dv=4, l=4, d=2, lp=4, n=3, init=1, local=1, w=5, kind="mlp"),
    "slc-topn": dict(hq=2, h=1, dk=2, dv=3, l=4, d=2, lp=4, n=2, init=0, local=0, w=3,
                     branches=["slc"]),
    "cmp-win-mlp": dict(hq=2, h=2, dk=3, dv=2, l=4, d=2, lp=4, n=2, w=4, kind="mlp",
                        branches=["cmp", "win"]),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_SPECS))
def test_gradcheck(name):
    spec = make_spec(**GRADCHECK_SPECS[name])
    x = make_inputs(spec, 1, 13, seed=7, requires_grad=True)
    names = [key for key in ("q", "k", "v", "gates", "k_cmp", "v_cmp") if x[key] is not None]

    def f(*args):
        return reference.nsa(**dict(x, **dict(zip(names, args))), spec=spec)

    assert torch.autograd.gradcheck(f, tuple(x[key] for key in names), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ bad tensors
def _bad(spec=None, **changes):
    spec = spec or make_spec()
    x = make_inputs(spec, 1, 20, seed=0)
    x.update(changes)
    return spec, x


def _f64(*shape):
    return torch.randn(*shape, dtype=F64)


BAD = {
    "q-rank": (dict(q=_f64(20, 4, 8)), ValueError, r"^q: .*4-d"),
    "q-heads": (dict(q=_f64(1, 20, 6, 8)), ValueError, r"^q: .*HQ=4"),
    "q-dk": (dict(q=_f64(1, 20, 4, 7)), ValueError, r"^q: .*Dk=8"),
    "k-heads": (dict(k=_f64(1, 20, 3, 8)), ValueError, r"^k: "),
    "k-len": (dict(k=_f64(1, 19, 2, 8)), ValueError, r"^k: "),
    "k-rank": (dict(k=_f64(20, 2, 8)), ValueError, r"^k: "),
    "v-dv": (dict(v=_f64(1, 20, 2, 7)), ValueError, r"^v: "),
    "k-dtype": (dict(k=torch.randn(1, 20, 2, 8)), TypeError, r"^k: .*float32"),
    "gates-shape": (dict(gates=_f64(1, 20, 4, 2)), ValueError, r"^gates: "),
    "gates-dtype": (dict(gates=torch.rand(1, 20, 4, 3)), TypeError, r"^gates: "),
    "cu-dtype": (dict(cu_seqlens=torch.tensor([0, 5, 20])), TypeError, r"^cu_seqlens: .*int32"),
    "cu-not-increasing": (dict(cu_seqlens=torch.tensor([0, 12, 12, 20], dtype=torch.int32)),
                          ValueError, r"^cu_seqlens: .*increasing"),
    "cu-decreasing": (dict(cu_seqlens=torch.tensor([0, 12, 8, 20], dtype=torch.int32)),
                      ValueError, r"^cu_seqlens: "),
    "cu-end": (dict(cu_seqlens=torch.tensor([0, 5, 19], dtype=torch.int32)),
               ValueError, r"^cu_seqlens: .*end"),
    "cu-start": (dict(cu_seqlens=torch.tensor([3, 5, 20], dtype=torch.int32)),
                 ValueError, r"^cu_seqlens: "),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tensors(case):
    changes, exc, match = BAD[case]
    spec, x = _bad(**changes)
    with pytest.raises(exc, match=match):
        reference.nsa(**x, spec=spec)


def test_cu_seqlens_needs_batch_one():
    spec = make_spec()
    x = make_inputs(spec, 2, 20, seed=0)
    x["cu_seqlens"] = torch.tensor([0, 5, 20], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^cu_seqlens: .*B=2"):
        reference.nsa(**x, spec=spec)


def test_learned_compression_needs_k_cmp():
    spec = make_spec(kind="mlp")
    x = make_inputs(spec, 1, 20, seed=0)
    with pytest.raises(ValueError, match=r"k_cmp"):
        reference.nsa(**dict(x, k_cmp=None, v_cmp=None), spec=spec)
    with pytest.raises(ValueError, match=r"k_cmp, v_cmp"):
        reference.nsa(**dict(x, v_cmp=None), spec=spec)
    # 20 tokens with l=8, d=4 give Nc = 4 compressed tokens
    assert spec.num_cmp(20) == 4 and x["k_cmp"].shape[1] == 4
    with pytest.raises(ValueError, match=r"^k_cmp: .*\(1, 5, 2, 8\)"):
        reference.nsa(**dict(x, k_cmp=_f64(1, 5, 2, 8)), spec=spec)
    with pytest.raises(ValueError, match=r"^v_cmp: "):
        reference.nsa(**dict(x, v_cmp=_f64(1, 3, 2, 8)), spec=spec)
    with pytest.raises(TypeError, match=r"^k_cmp: "):
        reference.nsa(**dict(x, k_cmp=x["k_cmp"].float()), spec=spec)
    # packed: Nc is the sum over sequences (Nc(12) + Nc(8) = 2 + 1)
    cu = torch.tensor([0, 12, 20], dtype=torch.int32)
    reference.nsa(**dict(x, cu_seqlens=cu, k_cmp=_f64(1, 3, 2, 8), v_cmp=_f64(1, 3, 2, 8)),
                  spec=spec)
    with pytest.raises(ValueError, match=r"^k_cmp: "):
        reference.nsa(**dict(x, cu_seqlens=cu), spec=spec)


def _decode_args(case):
    spec = make_spec()
    x = make_inputs(spec, 2, 10, seed=0)
    args = dict(q=x["q"][:, -1], k_cache=x["k"], v_cache=x["v"], gates=x["gates"][:, -1],
                spec=spec, cache_seqlens=None)
    cases = {
        "q-prefill-shaped": dict(q=x["q"]),
        "gates-prefill-shaped": dict(gates=x["gates"]),
        "seqlens-too-long": dict(cache_seqlens=torch.tensor([10, 11], dtype=torch.int32)),
        "seqlens-zero": dict(cache_seqlens=torch.tensor([0, 3], dtype=torch.int32)),
        "seqlens-count": dict(cache_seqlens=torch.tensor([4], dtype=torch.int32)),
        "k-dk": dict(k_cache=x["k"][..., :5]),
        "k-dtype": dict(k_cache=x["k"].float()),
        "gates-dtype": dict(gates=x["gates"][:, -1].float()),
        "k-rank": dict(k_cache=x["k"][0]),
        "k-batch": dict(k_cache=torch.cat([x["k"], x["k"][:1]]),
                        v_cache=torch.cat([x["v"], x["v"][:1]])),
        "seqlens-float": dict(cache_seqlens=torch.tensor([3.5, 2.0])),
    }
    return dict(args, **cases[case])


BAD_DECODE = {
    "q-prefill-shaped": (ValueError, r"^q: "),
    "gates-prefill-shaped": (ValueError, r"^gates: "),
    "seqlens-too-long": (ValueError, r"^cache_seqlens: "),
    "seqlens-zero": (ValueError, r"^cache_seqlens: "),
    "seqlens-count": (ValueError, r"^cache_seqlens: "),
    "k-dk": (ValueError, r"^k(_cache)?: "),
    "k-dtype": (TypeError, r"^k(_cache)?: "),
    # the prefill rejects gates of another dtype; so must a decode step
    "gates-dtype": (TypeError, r"^gates: "),
    # a 3-d cache is a k_cache mistake, not a cache_seqlens one
    "k-rank": (ValueError, r"^k(_cache)?: "),
    # a cache with more rows than q has queries is a mistake, not something to ignore
    "k-batch": (ValueError, r"^k(_cache)?: "),
    # lengths are integers: 3.5 must not be truncated to 3
    "seqlens-float": (TypeError, r"^cache_seqlens: "),
}


@pytest.mark.parametrize("case", list(BAD_DECODE))
def test_bad_decode_arguments(case):
    exc, match = BAD_DECODE[case]
    with pytest.raises(exc, match=match):
        reference.nsa_decode_step(**_decode_args(case))


def test_queries_that_end_each_sequence_are_the_full_rows():
    """cu_seqlens_k: sequence i keeps its last qlens[i] queries; their outputs are those rows of
    the full sequences, to float64 rounding (the reference against itself, so the kernels'
    oracle holds)."""
    spec = make_spec()
    lens, qlens = [20, 13], [7, 13]
    x = make_inputs(spec, 1, 0, seed=3, lens=lens)
    cu_k = x.pop("cu_seqlens")
    full = reference.nsa(**x, spec=spec, cu_seqlens=cu_k)
    rows = torch.cat([torch.arange(s + n - m, s + n) for s, n, m in zip((0, 20), lens, qlens)])
    sub = dict(x, q=x["q"][:, rows], gates=x["gates"][:, rows])
    got = reference.nsa(**sub, spec=spec, cu_seqlens=torch.tensor([0, 7, 20], dtype=torch.int32),
                        cu_seqlens_k=cu_k)
    torch.testing.assert_close(got, full[:, rows], rtol=1e-12, atol=1e-12)


def test_cu_seqlens_k_refusals():
    spec = make_spec()
    x = make_inputs(spec, 1, 20, seed=0)
    x.pop("cu_seqlens")
    cu = torch.tensor([0, 20], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^cu_seqlens_k: requires cu_seqlens"):
        reference.nsa(**x, spec=spec, cu_seqlens_k=cu)
    q8 = dict(x, q=x["q"][:, :8], gates=x["gates"][:, :8])
    with pytest.raises(ValueError, match=r"^cu_seqlens_k: 2 sequences, but cu_seqlens has 1"):
        reference.nsa(**q8, spec=spec, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32),
                      cu_seqlens_k=torch.tensor([0, 10, 20], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^cu_seqlens_k: sequence 1 has 6 queries but only 5"):
        reference.nsa(**q8, spec=spec, cu_seqlens=torch.tensor([0, 2, 8], dtype=torch.int32),
                      cu_seqlens_k=torch.tensor([0, 15, 20], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^cu_seqlens_k: must end at the packed length T=20"):
        reference.nsa(**q8, spec=spec, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32),
                      cu_seqlens_k=torch.tensor([0, 19], dtype=torch.int32))
