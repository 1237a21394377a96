"""Token-by-token decoding equals the prefill rows: the reference fallback and the generated
kernels (under TRITON_INTERPRET=1), ragged batches, lengths crossing emission points, T < l."""
import os

import pytest
import torch

import nsagen

from kernel_checks import SCORE_TOL, TOL, make_inputs, rel_err, scaled
from nsagen.decode import DecodeCache

INTERP = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


def _check_by_score(spec, idx, ref_idx, ref_score, pos, dtype):
    """Decode indices [B, H, n]: ascending, padded with -1, forced blocks present, no future
    block, the count min(n, candidates), and a total reference score as good as the reference's
    choice up to the dtype's slack."""
    jt = (pos // spec.slc_block)[:, None, None]
    valid = idx >= 0
    assert not (valid[..., 1:] & ~valid[..., :-1]).any()
    assert ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all()
    assert (idx <= jt).all()
    assert (valid.sum(-1) == torch.clamp(jt[..., 0] + 1, max=spec.slc_count)).all()
    for f in list(range(spec.slc_initial)) + [-r for r in range(spec.slc_local)]:
        j = f if f >= 0 else jt + f
        need = (j >= 0) & (j <= jt) if f < 0 else (jt >= f)
        assert ((idx == j).any(-1, keepdim=True) | ~need).all()

    def total(ix):
        return torch.where(ix >= 0, ref_score.gather(-1, ix.clamp(min=0).long()), 0.0).sum(-1)

    got, best = total(idx), total(ref_idx)
    assert (got >= best - SCORE_TOL[dtype] * best.clamp_min(1e-6)).all()


def _pad1(t):
    """[B, Nc, H, D] with one more zero row (the token of steps that emit none)."""
    return torch.cat([t, t.new_zeros(t.shape[0], 1, *t.shape[2:])], 1)


def _decode_vs_prefill(spec, prompt_lens, T, dtype=torch.float32, seed=0, splits=None,
                      configs=None, zero_q=False):
    """Prefill each row with its prompt, decode the rest one token at a time, compare each step
    with the reference prefill row of the full sequence. float32 must choose exactly the
    reference's blocks; in float16 a near-tie may flip, so the chosen set is checked by score
    and the output on the blocks the kernels chose. `zero_q`: every compressed key scores
    alike, so blocks tie and must go to the lower index."""
    B = len(prompt_lens)
    op = nsagen.build(spec)
    x = make_inputs(spec, B, T, dtype, "cpu", seed)
    q, k, v, gates = x["q"], x["k"], x["v"], x["gates"]
    if zero_q:
        q = torch.zeros_like(q)
    kc_all, vc_all = x["k_cmp"], x["v_cmp"]     # learned compression a branch reads
    kw, vw = x["k_win"], x["v_win"]

    def d(t):
        return None if t is None else t.double()

    ref, ref_idx, ref_score = nsagen.reference.nsa(
        d(q), d(k), d(v), d(gates), spec, d(kc_all), d(vc_all), return_indices=True,
        return_scores=True, k_win=d(kw), v_win=d(vw))
    if configs is not None:     # the shared small tiles of the kernels this spec has
        configs = {name: cfg for name, cfg in configs.items() if name in op.module.DECODE_CONFIGS}
    cache = DecodeCache(op, B, T, device="cpu", dtype=dtype, splits=splits, configs=configs)
    for buf in (cache._work or {}).values():   # scratch read before it is written shows as NaN
        if isinstance(buf, torch.Tensor) and buf.is_floating_point():
            buf.fill_(float("nan"))
        elif isinstance(buf, torch.Tensor) and buf.dtype == torch.int64:
            buf.fill_(-7)                      # top-n candidates: written before they are read
    P = max(prompt_lens)
    cache.prefill(k[:, :P], v[:, :P], torch.tensor(prompt_lens, dtype=torch.int32),
                  k_cmp=None if kc_all is None else kc_all[:, :spec.num_cmp(P)],
                  v_cmp=None if vc_all is None else vc_all[:, :spec.num_cmp(P)],
                  k_win=None if kw is None else kw[:, :P], v_win=None if vw is None else vw[:, :P])
    pos = list(prompt_lens)
    worst = 0.0
    # rows advance together; a row whose prompt is shorter is still at an earlier position
    for _ in range(T - P):
        rows = torch.arange(B)
        t = torch.tensor(pos)
        extra = {}
        if kc_all is not None:     # a step that emits nothing passes a token never read
            i = torch.clamp((t + 1 - spec.cmp_block) // spec.cmp_stride, 0, kc_all.shape[1])
            extra = dict(k_cmp_t=_pad1(kc_all)[rows, i], v_cmp_t=_pad1(vc_all)[rows, i])
        if kw is not None:
            extra.update(k_win_t=kw[rows, t], v_win_t=vw[rows, t])
        cache.append(k[rows, t], v[rows, t], **extra)
        o, idx = cache.step(q[rows, t], gates[rows, t], return_indices=True)
        assert torch.isfinite(o).all()
        want = ref[rows, t]
        if spec.has("slc"):
            if dtype in (torch.float32, torch.float64):
                assert torch.equal(idx, ref_idx[rows, t]), (pos, idx, ref_idx[rows, t])
            else:
                _check_by_score(spec, idx, ref_idx[rows, t], ref_score[rows, t], t, dtype)
                if not torch.equal(idx, ref_idx[rows, t]):
                    want = torch.cat([nsagen.reference.nsa_decode_step(
                        d(q[b:b + 1, p]), d(k[b:b + 1]), d(v[b:b + 1]), d(gates[b:b + 1, p]),
                        spec, None if kc_all is None else d(kc_all[b:b + 1]),
                        None if vc_all is None else d(vc_all[b:b + 1]),
                        cache_seqlens=torch.tensor([p + 1]), block_indices=idx[b:b + 1],
                        k_win=None if kw is None else d(kw[b:b + 1]),
                        v_win=None if vw is None else d(vw[b:b + 1]))
                        for b, p in enumerate(pos)])
        worst = max(worst, rel_err(o, want))
        pos = [p + 1 for p in pos]
    assert worst < TOL.get(dtype, 1e-4), worst
    return worst


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
@pytest.mark.parametrize("name", ["nsa-d128", "nsa-fla", "nsa-paper"])
def test_kernels_decode_equals_prefill(name):
    spec = scaled(nsagen.load_spec(name))
    _decode_vs_prefill(spec, [3, 9], T=30, seed=1)


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
def test_kernels_decode_separate_kv_and_short_prompt():
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(kv_per_branch="separate")
    _decode_vs_prefill(spec, [1, 2], T=12, seed=2)  # starts with T < l, crosses emission points


def test_reference_fallback_decode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = scaled(nsagen.load_spec("nsa-paper"))
    _decode_vs_prefill(spec, [4, 11], T=24, dtype=torch.float64, seed=3)


def test_cache_emission_rule_and_capacity():
    spec = scaled(nsagen.load_spec("nsa-d128"))  # l=8, d=4
    cache = nsagen.build(spec).new_cache(1, 13, dtype=torch.float32)
    emitted = []
    for t in range(13):
        emitted.append(bool(cache.emits()[0]))
        cache.append(torch.randn(1, spec.heads_kv, spec.dim_qk), torch.randn(1, spec.heads_kv, spec.dim_v))
    # a compressed token appears when t + 1 >= l and (t + 1 - l) % d == 0
    assert [t for t, e in enumerate(emitted) if e] == [7, 11]
    with pytest.raises(ValueError, match="cache full"):
        cache.append(torch.randn(1, spec.heads_kv, spec.dim_qk), torch.randn(1, spec.heads_kv, spec.dim_v))
    with pytest.raises(ValueError, match="q:"):
        cache.step(torch.randn(2, spec.heads_q, spec.dim_qk))


# small tiles so that chunks span several tiles on small shapes: 8 compressed keys (2 selection
# blocks of the scaled specs) per step, 16-key steps over the window and gathered selected keys,
# scores and top-n candidates in tiles of 4 blocks (several tiles merged by the last one), 8
# heads x 16 columns per combine program (and 16-column steps of the merge in decode_slc),
# partials merged 4 at a time
SMALL_TILES = {"decode_cmp": {"BC": 8, "BW": 16}, "decode_select": {"BNB": 4},
               "decode_slc": {"BK": 16}, "decode_win": {"BK": 16},
               "decode_combine": {"BDVC": 16, "RB": 8, "SB": 4}}


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
@pytest.mark.parametrize("name,splits", [
    # G=16: three compressed chunks of one tile, three selected blocks per program, window
    # chunks of 16 keys
    ("nsa-d128", dict(cmp=3, cmp_quantum=2, slc_blocks=3, win_keys=16)),
    # G=2: chunks of two tiles, every selected block and window chunk its own program
    ("nsa-g2", dict(cmp=2, cmp_quantum=2, slc_blocks=1, win_keys=16)),
    # G=1: more splits than chunks, one program for all selected blocks
    ("nsa-g1", dict(cmp=5, cmp_quantum=4, slc_blocks=4, win_keys=32)),
])
def test_kernels_decode_split_keys(name, splits):
    """Several splits per (sequence, KV head) on small shapes: ragged rows, one starting below
    l (no compressed key yet), lengths crossing emission points, chunks of several tiles (the
    running max moves between tiles) and windows reaching across chunk edges."""
    spec = scaled(nsagen.load_spec(name))
    # the longest row ends with 8 selection blocks: its free picks span two score tiles
    _decode_vs_prefill(spec, [2, 37, 122], T=128, seed=11, splits=splits, configs=SMALL_TILES)


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
@pytest.mark.parametrize("knobs", [
    # the merge in decode_slc's last program, 2 partials per load and 8-column steps (several
    # rounds of both), with the top-n picked by sequential maxima
    {"decode_slc": {"MERGE": 1, "SB": 2, "BDVC": 8}, "decode_select": {"RANK_MAX": 0}},
    # the merge in decode_slc's last program with every partial in one tile; the top-n
    # picked by rank
    {"decode_slc": {"MERGE": 1, "SB": 64, "BDVC": 16}, "decode_select": {"RANK_MAX": 128}},
    # the merge in its own launch (decode_combine), every partial in one tile
    {"decode_slc": {"MERGE": 0}, "decode_combine": {"SB": 64, "RB": 8, "BDVC": 16}},
])
def test_kernels_decode_merge_and_pick_variants(knobs):
    """Where the branches' partials are merged and how the top-n is picked are launch configs:
    every choice decodes the same rows. The longest row holds more blocks than the top-n, so
    every selected-block group (the last one included) has keys to merge."""
    spec = scaled(nsagen.load_spec("nsa-d128"))
    configs = {name: dict(SMALL_TILES.get(name, {}), **c) for name, c in knobs.items()}
    configs = dict(SMALL_TILES, **configs)
    _decode_vs_prefill(spec, [5, 70, 200], T=212, seed=21,
                       splits=dict(cmp=3, cmp_quantum=2, slc_blocks=3, win_keys=16),
                       configs=configs)


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
@pytest.mark.parametrize("small", [True, False], ids=["tiles-of-4", "default"])
def test_kernels_decode_ties_go_to_the_lower_block(small):
    """Zero queries weigh every compressed key alike, so the blocks inside a row tie: the top-n
    (tiles of 4 blocks merged by the last one, or the default tiles and splits) must take the
    lowest free blocks, as the prefill does."""
    spec = scaled(nsagen.load_spec("nsa-d128"))
    splits = dict(cmp=3, cmp_quantum=2, slc_blocks=3, win_keys=16)
    _decode_vs_prefill(spec, [40, 150], T=160, seed=5, zero_q=True,
                       configs=SMALL_TILES if small else None, splits=splits if small else None)


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
def test_kernels_decode_split_keys_float16():
    spec = scaled(nsagen.load_spec("nsa-d128"))
    _decode_vs_prefill(spec, [5, 66], T=70, dtype=torch.float16, seed=12,
                       splits=dict(cmp=4, cmp_quantum=2, slc_blocks=2, win_keys=16),
                       configs=SMALL_TILES)


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
@pytest.mark.parametrize("branches", [("slc", "win"), ("cmp",), ("cmp", "win"), ("win",)])
def test_kernels_decode_branch_subsets(branches):
    """Importance without the compressed output, and specs without selection."""
    spec = scaled(nsagen.load_spec("nsa-g2")).replace(
        branches=branches, window=24 if "win" in branches else None)
    _decode_vs_prefill(spec, [6, 30], T=36, seed=13,
                       splits=dict(cmp=3, cmp_quantum=2, slc_blocks=2, win_keys=16),
                       configs=SMALL_TILES)


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
def test_window_only_cache_of_a_learned_spec_takes_no_compressed_tokens():
    """A learned compression kind that no branch reads (window only): the contiguous and the
    paged cache take no compressed tokens, prefill and steps alike."""
    spec = scaled(nsagen.load_spec("nsa-paper")).replace(branches=("win",))
    assert spec.learned_compression and not spec.reads_cmp
    _decode_vs_prefill(spec, [5, 20], T=26, seed=14)
    op = nsagen.build(spec)
    pc = op.new_paged_cache(num_pages=8, page_size=8, max_len=32, device="cpu",
                            dtype=torch.float32)
    x = make_inputs(spec, 1, 9, torch.float32, "cpu", 15)
    sid = pc.add(x["k"][0, :8], x["v"][0, :8])
    o = pc.decode([sid], x["q"][:, 8], x["k"][:, 8], x["v"][:, 8], x["gates"][:, 8])
    want = nsagen.reference.nsa(x["q"].double(), x["k"].double(), x["v"].double(),
                                x["gates"].double(), spec)[:, 8]
    assert rel_err(o, want) < 1e-5


def test_decode_splits_fill_the_gpu():
    """The IR's split rule: more programs per (sequence, KV head) for small batches, never more
    compressed chunks than tiles at full length, balanced selected-block groups."""
    import dataclasses

    from nsagen.ir.passes import decode_programs, decode_splits, lower_decode
    from nsagen.target import current

    spec = nsagen.load_spec("nsa-d128")
    small, big = decode_splits(spec, 8, 65536), decode_splits(spec, 64, 65536)
    assert small["cmp"] > big["cmp"] >= 1 and small["slc_blocks"] < big["slc_blocks"]
    progs = decode_programs(spec, 8, 65536, small)
    # the window rides in the compressed pass's launch; the selected groups fill every SM
    n_win = -(-spec.window // small["win_keys"])
    assert progs["decode_cmp"] == 32 * (small["cmp"] + n_win) >= 2 * 132
    assert progs["decode_slc"] >= 132 and "decode_win" not in progs
    assert "decode_win" in decode_programs(spec.replace(branches=("win",)), 8, 65536, small)
    assert decode_splits(spec, 1, 256)["cmp"] == 1          # 4 blocks: one tile is enough
    # B=1, 64k: one wave would hold a program for each of the 64 tiles, but each partial costs
    # the merge a read, so the rule stops short of one tile a program
    one = decode_splits(spec, 1, 65536)
    assert 16 <= one["cmp"] < 64 and one["cmp"] > small["cmp"]
    half = dataclasses.replace(current(), sm_count=66)
    assert decode_splits(spec, 8, 65536, half)["cmp"] < small["cmp"]
    for b in (1, 3, 8, 64):
        sp = decode_splits(spec, b, 65536)
        n_prog = -(-spec.slc_count // sp["slc_blocks"])
        assert n_prog * sp["slc_blocks"] - spec.slc_count < sp["slc_blocks"]
        assert sp["win_keys"] % 64 == 0
    # two programs per SM instead of the shared-memory estimate: B=8, 64k takes one wave
    two = decode_splits(spec, 8, 65536, resident={"cmp": 2, "slc": 2})
    n_win2 = -(-spec.window // two["win_keys"])
    assert two["cmp"] < small["cmp"] and 32 * (two["cmp"] + n_win2) <= 2 * 132
    text = "\n".join(lower_decode(spec).decisions)
    assert "splits at B=8" in text and "decode_cmp" in text
    explained = nsagen.codegen.explain(spec)                  # nsagen generate SPEC --explain
    assert "decode decisions:" in explained and "decode_select <- templates/" in explained
    assert "decode_score" not in explained                    # scores and top-n: one launch


def test_programs_per_sm_counts_registers_and_shared_memory():
    """Residency of a compiled kernel: registers (allocated per warp in units of 256), shared
    memory (plus the driver's 1 KiB a program), warp and program slots, never below one."""
    from nsagen.occupancy import programs_per_sm

    assert programs_per_sm(221, 4, 20000) == 2     # 224 x 32 x 4 = 28672 of 65536 registers
    assert programs_per_sm(168, 4, 20000) == 3
    assert programs_per_sm(128, 4, 100 * 1024) == 2  # shared memory binds first
    assert programs_per_sm(32, 4, 0) == 16           # 64 warps an SM
    assert programs_per_sm(16, 1, 0) == 32           # 32 programs an SM
    assert programs_per_sm(255, 32, 0) == 1          # too big for one SM still runs one


def test_occupancy_inspection_never_fails_a_cache(caplog):
    """A step whose launches cannot be recorded or compiled leaves the split model on its
    shared-memory count (an empty answer and a warning), never an error."""
    from nsagen.occupancy import decode_residency

    def broken_step():
        raise RuntimeError("no GPU here")

    with caplog.at_level("WARNING", logger="nsagen"):
        assert decode_residency(broken_step) == {}
    assert "occupancy" in caplog.text and "no GPU here" in caplog.text


@pytest.mark.parametrize("name,variant", [("nsa-d128", {}), ("nsa-paper", {}),
                                          ("nsa-d128", {"kv_per_branch": "separate"}),
                                          ("nsa-fla", {})])
def test_append_kernel_equals_the_torch_append(name, variant, monkeypatch):
    """The generated append (one launch: k, v, the window's own k, v, the compressed token when
    due, lens) leaves the cache exactly as the PyTorch append does, over ragged rows that cross
    emission points; rewind drops tokens on the device."""
    from nsagen import decode as decode_mod

    spec = scaled(nsagen.load_spec(name)).replace(**variant)
    op = nsagen.build(spec)
    B, cap, H = 3, 40, spec.heads_kv
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    caches = [DecodeCache(op, B, cap, dtype=torch.float32) for _ in range(2)]
    prompt = (rnd(B, 9, H, spec.dim_qk), rnd(B, 9, H, spec.dim_v))
    extra = {}
    if spec.learned_compression:
        nc = spec.num_cmp(9)
        extra = dict(k_cmp=rnd(B, nc, H, spec.dim_qk), v_cmp=rnd(B, nc, H, spec.dim_v))
    if caches[0].separate:
        extra.update(k_win=rnd(B, 9, H, spec.dim_qk), v_win=rnd(B, 9, H, spec.dim_v))
    for c in caches:
        c.prefill(*prompt, seqlens=torch.tensor([9, 4, 0]), **extra)
    for _ in range(2 * spec.cmp_block + 3):
        tok = dict(k_t=rnd(B, H, spec.dim_qk), v_t=rnd(B, H, spec.dim_v))
        if spec.learned_compression:
            tok.update(k_cmp_t=rnd(B, H, spec.dim_qk), v_cmp_t=rnd(B, H, spec.dim_v))
        if caches[0].separate:
            tok.update(k_win_t=rnd(B, H, spec.dim_qk), v_win_t=rnd(B, H, spec.dim_v))
        caches[0].append(**tok)                                   # the generated kernel
        with monkeypatch.context() as m:
            m.setattr(decode_mod, "kernels_available", lambda device: False)
            caches[1].append(**tok)                               # the PyTorch ops
    names = ["k", "v", "k_cmp", "v_cmp", "lens"] + (["k_win", "v_win"] if caches[0].separate else [])
    for n in names:
        torch.testing.assert_close(getattr(caches[0], n), getattr(caches[1], n), rtol=1e-6,
                                   atol=1e-6, msg=n)
    assert caches[0].lens.tolist() == [9 + 2 * spec.cmp_block + 3, 4 + 2 * spec.cmp_block + 3,
                                       2 * spec.cmp_block + 3]
    caches[0].rewind(10)
    assert caches[0].lens.tolist() == [n - 10 for n in caches[1].lens.tolist()]


def _tokens_vs_prefill(spec, prompt_lens, T, chunks, dtype=torch.float32, seed=0,
                       configs=None):
    """Steps of several new tokens per sequence (chunks: S of each step) from ragged prompts:
    every new token's output equals its row of the float64 prefill."""
    B = len(prompt_lens)
    op = nsagen.build(spec)
    x = make_inputs(spec, B, T, dtype, "cpu", seed)
    q, k, v, gates = x["q"], x["k"], x["v"], x["gates"]
    kc_all, vc_all = x["k_cmp"], x["v_cmp"]     # learned compression a branch reads
    kw, vw = x["k_win"], x["v_win"]

    def d(t):
        return None if t is None else t.double()

    ref, ref_idx = nsagen.reference.nsa(d(q), d(k), d(v), d(gates), spec, d(kc_all), d(vc_all),
                                        k_win=d(kw), v_win=d(vw), return_indices=True)
    if configs is not None:
        configs = {n: c for n, c in configs.items() if n in op.module.DECODE_CONFIGS}
    cache = DecodeCache(op, B, T, device="cpu", dtype=dtype, configs=configs)
    P = max(prompt_lens)
    cache.prefill(k[:, :P], v[:, :P], torch.tensor(prompt_lens, dtype=torch.int32),
                  k_cmp=None if kc_all is None else kc_all[:, :spec.num_cmp(P)],
                  v_cmp=None if vc_all is None else vc_all[:, :spec.num_cmp(P)],
                  k_win=None if kw is None else kw[:, :P], v_win=None if vw is None else vw[:, :P])
    pos = torch.tensor(prompt_lens)
    rows = torch.arange(B)
    for S in chunks:
        t = pos[:, None] + torch.arange(S)                       # [B, S] positions
        pick = lambda a: None if a is None else a[rows[:, None], t]  # noqa: E731
        extra = {}
        if kc_all is not None:
            i = torch.clamp((t + 1 - spec.cmp_block) // spec.cmp_stride, 0, kc_all.shape[1])
            extra = dict(k_cmp_t=_pad1(kc_all)[rows[:, None], i],
                         v_cmp_t=_pad1(vc_all)[rows[:, None], i])
        if kw is not None:
            extra.update(k_win_t=pick(kw), v_win_t=pick(vw))
        o, idx = cache.decode(pick(q), pick(k), pick(v), pick(gates), return_indices=True,
                              **extra)
        assert o.shape == (B, S, spec.heads_q, spec.dim_v)
        if spec.has("slc") and dtype == torch.float32:    # the reference's own blocks
            assert torch.equal(idx, ref_idx[rows[:, None], t]), S
        err = rel_err(o, ref[rows[:, None], t])
        assert err < TOL.get(dtype, 1e-4), (S, err)
        pos = pos + S
    assert torch.equal(cache.lens, pos.to(torch.int32))


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper"])
def test_kernels_decode_several_tokens_per_step(name):
    """S = 3, 1, 5, 2 new tokens per step from ragged prompts (one below l): the drafts see
    the cache and the drafts before them, crossing emission points and block edges."""
    spec = scaled(nsagen.load_spec(name))
    _tokens_vs_prefill(spec, [2, 21, 40], T=52, chunks=[3, 1, 5, 2], seed=5,
                       configs=SMALL_TILES)


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
def test_kernels_decode_several_tokens_separate_kv():
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(kv_per_branch="separate")
    _tokens_vs_prefill(spec, [6, 13], T=24, chunks=[4, 4], seed=6)


def test_reference_fallback_several_tokens(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = scaled(nsagen.load_spec("nsa-paper"))
    _tokens_vs_prefill(spec, [4, 11], T=24, chunks=[3, 4], dtype=torch.float64, seed=7)


def test_several_tokens_refused_calls_change_nothing():
    spec = scaled(nsagen.load_spec("nsa-d128"))
    cache = nsagen.build(spec).new_cache(2, 12, dtype=torch.float32)
    H, HQ = spec.heads_kv, spec.heads_q
    q = torch.randn(2, 3, HQ, spec.dim_qk)
    k_t, v_t = torch.randn(2, 3, H, spec.dim_qk), torch.randn(2, 3, H, spec.dim_v)
    with pytest.raises(ValueError, match="like q"):
        cache.decode(q, k_t[:, :2], v_t)
    with pytest.raises(ValueError, match="v_t: expected"):
        cache.decode(q, k_t, v_t[..., :3])
    for _ in range(4):
        cache.decode(q, k_t, v_t)
    with pytest.raises(ValueError, match="cache full"):
        cache.decode(q[:, :1], k_t[:, :1], v_t[:, :1])
    assert cache.lens.tolist() == [12, 12]


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper"])
def test_kernels_decode_with_the_compressed_branchs_own_query(name):
    """q_cmp drives the compressed branch and the block scores in decoding too: one-token
    steps, an S-token step and the paged step equal the prefill rows with the same q_cmp."""
    spec = scaled(nsagen.load_spec(name))
    op = nsagen.build(spec)
    B, T = 2, 40
    x = make_inputs(spec, B, T, torch.float32, "cpu", 17)
    q, k, v, gates = x["q"], x["k"], x["v"], x["gates"]
    q_cmp = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    kc_all, vc_all = x["k_cmp"], x["v_cmp"]     # learned compression a branch reads

    def d(t):
        return None if t is None else t.double()

    ref = nsagen.reference.nsa(d(q), d(k), d(v), d(gates), spec, d(kc_all), d(vc_all),
                               q_cmp=d(q_cmp))
    plain = nsagen.reference.nsa(d(q), d(k), d(v), d(gates), spec, d(kc_all), d(vc_all))
    assert rel_err(plain, ref) > 1e-2          # q_cmp matters here
    cache = op.new_cache(B, T, dtype=torch.float32)
    start = [20, 31]
    cache.prefill(k[:, :31], v[:, :31], torch.tensor(start, dtype=torch.int32),
                  k_cmp=None if kc_all is None else kc_all[:, :spec.num_cmp(31)],
                  v_cmp=None if vc_all is None else vc_all[:, :spec.num_cmp(31)])
    rows = torch.arange(B)
    pos = torch.tensor(start)

    def extra(t):
        if not spec.learned_compression:
            return {}
        i = torch.clamp((t + 1 - spec.cmp_block) // spec.cmp_stride, min=0)
        r = rows if t.dim() == 1 else rows[:, None]
        return dict(k_cmp_t=kc_all[r, i], v_cmp_t=vc_all[r, i])

    for _ in range(3):                       # one token per step
        o = cache.decode(q[rows, pos], k[rows, pos], v[rows, pos], gates[rows, pos],
                         q_cmp=q_cmp[rows, pos], **extra(pos))
        assert rel_err(o, ref[rows, pos]) < 1e-4
        pos = pos + 1
    t = pos[:, None] + torch.arange(4)       # four at once
    r = rows[:, None]
    o = cache.decode(q[r, t], k[r, t], v[r, t], gates[r, t], q_cmp=q_cmp[r, t], **extra(t))
    assert rel_err(o, ref[r, t]) < 1e-4
    # the paged step over the same tokens
    from nsagen.paged import to_pages
    kp, vp, kcp, vcp, table, ctable, lens = to_pages(cache, 8)
    o = op.decode_paged(q[rows, t[:, -1]], gates[rows, t[:, -1]], kp, vp, kcp, vcp, table,
                        ctable, lens, q_cmp=q_cmp[rows, t[:, -1]])
    assert rel_err(o, ref[rows, t[:, -1]]) < 1e-4
