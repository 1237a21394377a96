"""Paged KV for serving engines (op.append_paged, op.decode_paged): token-by-token decoding over
page pools equals the prefill rows of the float64 reference, with ragged lengths, shuffled page
tables, pages shared by two sequences (a common prefix), learned compression, the generated
kernels under the interpreter and the reference fallback; bad pools and tables are refused by
name."""
import os

import pytest
import torch

import nsagen

from kernel_checks import TOL, make_inputs, rel_err, scaled

INTERP = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
SMALL_TILES = {"decode_cmp": {"BC": 8, "BW": 16}, "decode_select": {"BNB": 4},
               "decode_slc": {"BK": 16}, "decode_win": {"BK": 16},
               "decode_combine": {"BDVC": 16, "RB": 8, "SB": 4}}


class Pools:
    """Page pools and tables for B sequences of up to `max_len` tokens: pages handed out in a
    shuffled order, pool pages left unused between them, and (with `shared`) the first
    `shared` raw pages of sequence 1 being those of sequence 0."""

    def __init__(self, spec, B, max_len, page, dtype, seed, shared=0):
        g = torch.Generator().manual_seed(seed)
        n_raw = -(-max_len // page)
        n_cmp = max(1, -(-spec.num_cmp(n_raw * page) // page))
        perm = torch.randperm(2 * B * (n_raw + n_cmp) + 5, generator=g).to(torch.int32)
        self.table = perm[:B * n_raw].view(B, n_raw).clone()
        self.cmp_table = perm[B * n_raw:B * (n_raw + n_cmp)].view(B, n_cmp).clone()
        if shared:
            self.table[1, :shared] = self.table[0, :shared]
        n_pages = perm.numel()
        H = spec.heads_kv
        nan = float("nan")    # a pool row the kernels read without writing it first shows
        self.k = torch.full((n_pages, page, H, spec.dim_qk), nan, dtype=dtype)
        self.v = torch.full((n_pages, page, H, spec.dim_v), nan, dtype=dtype)
        self.kc = torch.full((n_pages, page, H, spec.dim_qk), nan, dtype=dtype)
        self.vc = torch.full((n_pages, page, H, spec.dim_v), nan, dtype=dtype)
        self.page = page

    def write(self, b, pos, k, v, table=None):
        """Tokens at positions pos (1-d) of sequence b."""
        table = self.table if table is None else table
        pg, off = table[b, pos // self.page].long(), pos % self.page
        return pg, off

    def args(self, seq_lens):
        return (self.k, self.v, self.kc, self.vc, self.table, self.cmp_table, seq_lens)


def _learned_tokens(spec, kc_all, vc_all, rows, t) -> dict:
    """The compressed tokens that tokens t of rows complete (learned compression), else {}."""
    if kc_all is None:
        return {}
    # a row that completes none passes a token never read (one zero row past the last)
    pad = lambda a: torch.cat([a, a.new_zeros(a.shape[0], 1, *a.shape[2:])], 1)  # noqa: E731
    i = torch.clamp((t + 1 - spec.cmp_block) // spec.cmp_stride, 0, kc_all.shape[1])
    return dict(k_cmp_t=pad(kc_all)[rows, i], v_cmp_t=pad(vc_all)[rows, i])


def _paged_vs_prefill(spec, prompt_lens, T, dtype, seed, page=8, shared=0, configs=None):
    B = len(prompt_lens)
    op = nsagen.build(spec)
    x = make_inputs(spec, B, T, dtype, "cpu", seed)
    q, k, v, gates = x["q"], x["k"], x["v"], x["gates"]
    if shared:    # sequences 0 and 1 share their first `shared` pages: the same tokens there
        n = shared * page
        k[1, :n], v[1, :n] = k[0, :n], v[0, :n]
        q[1, :n], gates[1, :n] = q[0, :n], gates[0, :n]
    kc_all, vc_all = x["k_cmp"], x["v_cmp"]     # learned compression a branch reads

    def d(t):
        return None if t is None else t.double()

    ref = nsagen.reference.nsa(d(q), d(k), d(v), d(gates), spec, d(kc_all), d(vc_all))
    pools = Pools(spec, B, T, page, dtype, seed, shared)
    # the prompt, as an engine's prefill leaves it: tokens and compressed tokens in their pages
    kc_ref = (kc_all if kc_all is not None else nsagen.reference.mean_compress(k, spec))
    vc_ref = (vc_all if vc_all is not None else nsagen.reference.mean_compress(v, spec))
    for b, n in enumerate(prompt_lens):
        pos = torch.arange(n)
        pg, off = pools.write(b, pos, None, None)
        pools.k[pg, off], pools.v[pg, off] = k[b, :n], v[b, :n]
        c = torch.arange(spec.num_cmp(n))
        pg, off = pools.write(b, c, None, None, pools.cmp_table)
        pools.kc[pg, off], pools.vc[pg, off] = kc_ref[b, c].to(dtype), vc_ref[b, c].to(dtype)
    if configs is not None:
        op.configs = {n: c for n, c in configs.items() if n in op.module.DECODE_CONFIGS}
    try:
        pos = torch.tensor(prompt_lens)
        rows = torch.arange(B)
        worst = 0.0
        while int(pos.max()) < T:
            live = pos < T
            t = pos.clamp(max=T - 1)
            seq_lens = (t + 1).to(torch.int32)
            extra = _learned_tokens(spec, kc_all, vc_all, rows, t)
            op.append_paged(k[rows, t], v[rows, t], *pools.args(seq_lens), **extra)
            o = op.decode_paged(q[rows, t], gates[rows, t], *pools.args(seq_lens))
            assert o.shape == (B, spec.heads_q, spec.dim_v) and o.dtype == dtype
            err = rel_err(o[live], ref[rows, t][live])
            worst = max(worst, err)
            pos = pos + 1
    finally:
        op.configs = {}
    assert worst < TOL.get(dtype, 1e-4), worst
    return pools


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
@pytest.mark.parametrize("name,page", [("nsa-d128", 8), ("nsa-paper", 16), ("nsa-fla", 4)])
def test_paged_decode_equals_prefill(name, page):
    """Ragged rows (one starting below l), shuffled pages, lengths crossing page boundaries and
    emission points; small tiles so a step reads several pages per tile."""
    spec = scaled(nsagen.load_spec(name))
    _paged_vs_prefill(spec, [3, 21, 40], T=48, dtype=torch.float32, seed=1, page=page,
                      configs=SMALL_TILES)


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
def test_paged_shared_prefix_pages_stay_untouched():
    """Two sequences share their first two pages (a common prompt): both decode correctly,
    and appends never write a shared page."""
    spec = scaled(nsagen.load_spec("nsa-d128"))
    B, page = 3, 8
    pools = _paged_vs_prefill(spec, [17, 19, 5], T=36, dtype=torch.float32, seed=4, page=page,
                              shared=2, configs=SMALL_TILES)
    shared_rows = pools.table[0, :2].long()
    # the shared pages still hold sequence 0's first 16 tokens
    x = make_inputs(spec, B, 36, torch.float32, "cpu", 4)
    assert torch.equal(pools.k[shared_rows].reshape(16, *pools.k.shape[2:]), x["k"][0, :16])


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
def test_paged_decode_half_precision_and_learned_compression():
    spec = scaled(nsagen.load_spec("nsa-d128"))
    _paged_vs_prefill(spec, [9, 30], T=40, dtype=torch.float16, seed=5, page=8,
                      configs=SMALL_TILES)
    # bfloat16: the append in PyTorch, the kernels on float32 copies (the interpreter's rule)
    _paged_vs_prefill(spec, [11, 4], T=20, dtype=torch.bfloat16, seed=8, page=8)
    learned = scaled(nsagen.load_spec("nsa-d128")).replace(cmp_kind="mlp")
    _paged_vs_prefill(learned, [2, 25], T=34, dtype=torch.float32, seed=6, page=16)


def test_paged_reference_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = scaled(nsagen.load_spec("nsa-paper"))
    _paged_vs_prefill(spec, [4, 13], T=22, dtype=torch.float64, seed=7, page=8)


def test_paged_inputs_are_checked_by_name():
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    B, H = 2, spec.heads_kv
    pools = Pools(spec, B, 64, 8, torch.float32, 0)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    k_t, v_t = torch.randn(B, H, spec.dim_qk), torch.randn(B, H, spec.dim_v)
    q, gates = torch.randn(B, spec.heads_q, spec.dim_qk), torch.rand(B, spec.heads_q, 3)
    a = list(pools.args(lens))
    cases = [
        (0, pools.k[:, :, :, :4], ValueError, "k_pages: expected"),
        (1, pools.v.half(), TypeError, "v_pages: dtype"),
        (2, pools.kc[:, :4].contiguous(), ValueError, "k_cmp_pages: pages of 4 tokens"),
        (4, pools.table.long(), ValueError, "block_table: expected an int32"),
        (5, pools.cmp_table[:, :1], ValueError, "cmp_block_table: 1 pages"),
        (6, lens.long(), ValueError, "seq_lens: expected an int32"),
        (0, pools.k.transpose(0, 1), ValueError, "k_pages"),
    ]
    for i, bad, err, msg in cases:
        args = list(a)
        args[i] = bad
        with pytest.raises(err, match=msg):
            op.decode_paged(q, gates, *args)
    with pytest.raises(ValueError, match="v_t: expected"):
        op.append_paged(k_t, v_t[:, :, :3], *a)
    with pytest.raises(ValueError, match="k_cmp_t, v_cmp_t: only accepted"):
        op.append_paged(k_t, v_t, *a, k_cmp_t=k_t, v_cmp_t=v_t)
    sep = nsagen.build(spec.replace(kv_per_branch="separate"))
    with pytest.raises(ValueError, match="kv_per_branch: separate"):
        sep.decode_paged(q, gates, *a)


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
def test_a_contiguous_cache_moved_to_pages_decodes_the_same():
    """paged.to_pages copies a DecodeCache into shuffled pages: the paged step then equals the
    cache's step (same kernels, same splits), and the append writes where the cache would."""
    from nsagen.paged import to_pages
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    B, L = 2, 40
    x = make_inputs(spec, B, L, torch.float32, "cpu", 9)
    splits = op._paged_steps().state(B, L, torch.device("cpu"))[0]
    cache = op.new_cache(B, L, dtype=torch.float32)
    cache.splits = dict(splits)
    cache.prefill(x["k"][:, :30], x["v"][:, :30], torch.tensor([30, 17], dtype=torch.int32))
    rows, t = torch.arange(B), torch.tensor([30, 17])
    kp, vp, kcp, vcp, table, ctable, lens = to_pages(cache, 8)
    cache.append(x["k"][rows, t], x["v"][rows, t])
    op.append_paged(x["k"][rows, t], x["v"][rows, t], kp, vp, kcp, vcp, table, ctable, lens + 1)
    want = cache.step(x["q"][rows, t], x["gates"][rows, t])
    got = op.decode_paged(x["q"][rows, t], x["gates"][rows, t], kp, vp, kcp, vcp, table, ctable,
                          lens + 1)
    assert rel_err(got, want) < 1e-6
    moved = to_pages(cache, 8)
    for a, b in zip(moved[:4], (kp, vp, kcp, vcp)):
        assert torch.equal(a, b)


def _reference_rows(spec, k, v, q, gates):
    d = torch.float64
    return nsagen.reference.nsa(q[None].to(d), k[None].to(d), v[None].to(d), gates[None].to(d),
                                spec)[0]


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
def test_paged_cache_continuous_batching_fork_and_free():
    """PagedCache: sequences join with prompts, decode together, one forks (the branches share
    full pages, copy the partial one, then diverge), one leaves and a new one joins on its
    pages; every step equals each sequence's own prefill row."""
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    op.configs = {n: c for n, c in SMALL_TILES.items() if n in op.module.DECODE_CONFIGS}
    g = torch.Generator().manual_seed(31)
    H, HQ, Dk, Dv = spec.heads_kv, spec.heads_q, spec.dim_qk, spec.dim_v

    def seq(T):
        return dict(k=torch.randn(T, H, Dk, generator=g), v=torch.randn(T, H, Dv, generator=g),
                    q=torch.randn(T, HQ, Dk, generator=g), g=torch.rand(T, HQ, 3, generator=g))

    try:
        cache = op.new_paged_cache(num_pages=40, page_size=8, max_len=64, dtype=torch.float32)
        toks = {}
        for T, prompt in ((40, 13), (40, 3)):
            s = seq(T)
            sid = cache.add(s["k"][:prompt], s["v"][:prompt])
            toks[sid] = s

        def step(ids):
            n = [cache.length(i) for i in ids]
            pick = {key: torch.stack([toks[i][key][p] for i, p in zip(ids, n)])
                    for key in ("q", "k", "v", "g")}
            o = cache.decode(ids, pick["q"], pick["k"], pick["v"], pick["g"])
            for b, (i, p) in enumerate(zip(ids, n)):
                want = _reference_rows(spec, toks[i]["k"][:p + 1], toks[i]["v"][:p + 1],
                                       toks[i]["q"][:p + 1], toks[i]["g"][:p + 1])[p]
                assert rel_err(o[b], want) < 1e-4, (i, p, rel_err(o[b], want))

        for _ in range(6):
            step([0, 1])
        # fork sequence 0 at 19 tokens: the branch takes sequence 0's first 19 tokens, then
        # tokens of its own
        fork = cache.fork(0)
        branch = seq(40)
        for key in branch:
            branch[key][:19] = toks[0][key][:19]
        toks[fork] = branch
        before = cache.free_pages
        for _ in range(7):
            step([1, fork, 0])
        cache.free(1)
        late = cache.add(seq(1)["k"][:0], seq(1)["v"][:0])     # joins empty, then decodes
        toks[late] = seq(30)
        for _ in range(5):
            step([late, 0, fork])
        assert cache.length(0) == 13 + 6 + 7 + 5 and cache.length(fork) == 19 + 7 + 5
        assert before[0] > cache.free_pages[0]
        for i in (0, fork, late):
            cache.free(i)
        assert cache.free_pages[0] == 40       # every page back, the shared ones once
    finally:
        op.configs = {}


def test_paged_cache_refuses_by_name_and_changes_nothing():
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    H, HQ = spec.heads_kv, spec.heads_q
    cache = op.new_paged_cache(num_pages=3, page_size=8, max_len=32, dtype=torch.float32)
    sid = cache.add(torch.randn(16, H, spec.dim_qk), torch.randn(16, H, spec.dim_v))
    q, gates = torch.randn(1, HQ, spec.dim_qk), torch.rand(1, HQ, 3)
    k_t, v_t = torch.randn(1, H, spec.dim_qk), torch.randn(1, H, spec.dim_v)
    free = cache.free_pages
    with pytest.raises(ValueError, match="v_t: expected"):
        cache.decode([sid], q, k_t, v_t[:, :, :2], gates)
    with pytest.raises(ValueError, match="gates: expected"):
        cache.decode([sid], q, k_t, v_t, gates[:, :2])
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.add(torch.randn(17, H, spec.dim_qk), torch.randn(17, H, spec.dim_v))
    with pytest.raises(KeyError, match="no sequence 7"):
        cache.free(7)
    with pytest.raises(ValueError, match="k: expected"):
        cache.add(torch.randn(4, H + 1, spec.dim_qk), torch.randn(4, H, spec.dim_v))
    assert cache.free_pages == free and cache.length(sid) == 16


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper"])
def test_paged_several_tokens_per_step(name):
    """S new tokens per sequence (seq_lens counting all of them) over shuffled pages: written
    in order, every draft equals its prefill row."""
    spec = scaled(nsagen.load_spec(name))
    op = nsagen.build(spec)
    B, T, page = 2, 40, 8
    x = make_inputs(spec, B, T, torch.float32, "cpu", 13)
    q, k, v, gates = x["q"], x["k"], x["v"], x["gates"]
    kc_all, vc_all = (x["k_cmp"], x["v_cmp"]) if spec.learned_compression else (None, None)

    def d(t):
        return None if t is None else t.double()

    ref = nsagen.reference.nsa(d(q), d(k), d(v), d(gates), spec, d(kc_all), d(vc_all))
    pools = Pools(spec, B, T, page, torch.float32, 13)
    kc_ref = kc_all if kc_all is not None else nsagen.reference.mean_compress(k, spec)
    vc_ref = vc_all if vc_all is not None else nsagen.reference.mean_compress(v, spec)
    prompt = [5, 17]
    for b, n in enumerate(prompt):
        pg, off = pools.write(b, torch.arange(n), None, None)
        pools.k[pg, off], pools.v[pg, off] = k[b, :n], v[b, :n]
        c = torch.arange(spec.num_cmp(n))
        pg, off = pools.write(b, c, None, None, pools.cmp_table)
        pools.kc[pg, off], pools.vc[pg, off] = kc_ref[b, c], vc_ref[b, c]
    op.configs = {n: c for n, c in SMALL_TILES.items() if n in op.module.DECODE_CONFIGS}
    try:
        pos, rows = torch.tensor(prompt), torch.arange(B)[:, None]
        for S in (3, 1, 6):
            t = pos[:, None] + torch.arange(S)
            lens = (pos + S).to(torch.int32)
            extra = _learned_tokens(spec, kc_all, vc_all, rows, t)
            op.append_paged(k[rows, t], v[rows, t], *pools.args(lens), **extra)
            o = op.decode_paged(q[rows, t], gates[rows, t], *pools.args(lens))
            assert o.shape == (B, S, spec.heads_q, spec.dim_v)
            assert rel_err(o, ref[rows, t]) < 1e-4, (S, rel_err(o, ref[rows, t]))
            pos = pos + S
    finally:
        op.configs = {}
