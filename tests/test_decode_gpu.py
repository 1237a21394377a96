"""Decoding on a CUDA GPU in bfloat16: token-by-token steps equal the prefill rows, ragged
lengths, several splits per (sequence, KV head), small groups, caches grown past 64k, and steps
captured in a CUDA graph and replayed while the cache grows. Skipped without a GPU."""
import pytest
import torch

import nsagen
from nsagen import reference
from nsagen.decode import DecodeCache

from kernel_checks import SCORE_TOL, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BF16 = torch.bfloat16


def _ref_row(spec, q_t, k, v, g_t, t, idx=None, qc_t=None):
    """float64 reference of one decode query at position t of one sequence: (o [HQ, Dv],
    chosen blocks [H, n], block scores [H, NB]); `idx` [H, n] replaces the top-n choice;
    `qc_t` is the compressed branch's own query (default q_t)."""
    d = torch.float64
    o, ref_idx, score = reference._nsa_core(
        spec, q_t[None, None].to(d), torch.tensor([t], device=q_t.device), k[None, :t + 1].to(d),
        v[None, :t + 1].to(d), g_t[None, None].to(d), None, None, None, None,
        None if idx is None else idx[None, None],
        q_cmp=None if qc_t is None else qc_t[None, None].to(d))
    return o[0, 0], None if ref_idx is None else ref_idx[0, 0], None if score is None else score[0, 0]


def _check_step(spec, o_b, idx_b, q_t, k, v, g_t, t, qc_t=None):
    """One row of a step: the chosen blocks score like the reference's (a near-tie may flip in
    bf16), and the output equals the reference on the blocks the kernels chose."""
    if spec.has("slc"):
        _, ref_idx, score = _ref_row(spec, q_t, k, v, g_t, t, qc_t=qc_t)

        def total(ix):
            return torch.where(ix >= 0, score.gather(-1, ix.clamp(min=0).long()), 0.0).sum(-1)

        best = total(ref_idx)
        assert (total(idx_b) >= best - SCORE_TOL[BF16] * best.clamp_min(1e-6)).all(), (t, idx_b, ref_idx)
        assert ((idx_b >= 0).sum(-1) == min(spec.slc_count, t // spec.slc_block + 1)).all()
    want, _, _ = _ref_row(spec, q_t, k, v, g_t, t, idx_b if spec.has("slc") else None, qc_t)
    err = rel_err(o_b, want)
    assert err < 2e-2, (t, err)


def _run(spec, prompt_lens, T, steps, seed=0, splits=None, configs=None):
    torch.manual_seed(seed)
    B = len(prompt_lens)
    H, HQ, Dk, Dv = spec.heads_kv, spec.heads_q, spec.dim_qk, spec.dim_v
    q = torch.randn(B, T, HQ, Dk, device="cuda", dtype=BF16)
    k = torch.randn(B, T, H, Dk, device="cuda", dtype=BF16)
    v = torch.randn(B, T, H, Dv, device="cuda", dtype=BF16)
    gates = torch.rand(B, T, HQ, 3, device="cuda", dtype=BF16)
    op = nsagen.build(spec)
    cache = DecodeCache(op, B, T, device="cuda", dtype=BF16, splits=splits, configs=configs)
    P = max(prompt_lens)
    cache.prefill(k[:, :P], v[:, :P], torch.tensor(prompt_lens, dtype=torch.int32, device="cuda"))
    pos = list(prompt_lens)
    rows = torch.arange(B, device="cuda")
    for _ in range(steps):
        t = torch.tensor(pos, device="cuda")
        cache.append(k[rows, t], v[rows, t])
        o, idx = cache.step(q[rows, t], gates[rows, t], return_indices=True)
        assert torch.isfinite(o).all()
        for b, tb in enumerate(pos):
            _check_step(spec, o[b], idx[b], q[b, tb], k[b], v[b], gates[b, tb], tb)
        pos = [p + 1 for p in pos]
    return cache


def test_decode_equals_prefill_ragged():
    # crosses emission points and selection-block edges; one row starts below l
    _run(nsagen.load_spec("nsa-d128"), [20, 1000, 1517], T=1600, steps=40)


@pytest.mark.parametrize("name", ["nsa-g1", "nsa-g2", "nsa-fla"])
def test_decode_small_groups_and_identity_map(name):
    _run(nsagen.load_spec(name), [700, 2049], T=2100, steps=20, seed=3)


def test_decode_forced_small_splits():
    """Many short chunks (chunk edges everywhere), three selected blocks per program, window
    chunks of 64 keys: the same results as the IR's choice."""
    _run(nsagen.load_spec("nsa-d128"), [333, 4100], T=4200, steps=20, seed=4,
         splits=dict(cmp=13, cmp_quantum=16, slc_blocks=3, win_keys=64))


def test_decode_past_64k():
    _run(nsagen.load_spec("nsa-d128"), [65530], T=65600, steps=12, seed=1)


def test_decode_batch8_64k_ragged():
    """The benchmark shape: B=8, caches around 64k, ragged."""
    _run(nsagen.load_spec("nsa-d128"), [65536 - 97 * b for b in range(8)], T=65560, steps=3,
         seed=2)


def test_splits_follow_the_compiled_kernels_occupancy():
    """An untuned cache counts waves with the programs per SM its compiled decode_cmp and
    decode_slc leave room for (registers included), not the shared-memory estimate."""
    from nsagen.ir.passes import decode_splits
    from nsagen.occupancy import decode_residency
    from nsagen.target import Target

    spec = nsagen.load_spec("nsa-d128")
    op = nsagen.build(spec)
    target = Target.from_device(0)
    # explicit configs skip the tuned table, not the occupancy
    cache = DecodeCache(op, 8, 65536, device="cuda", dtype=BF16, configs=op.configs)
    base = decode_splits(spec, 8, 65536, target)
    q = torch.randn(8, spec.heads_q, spec.dim_qk, device="cuda", dtype=BF16)
    gates = torch.rand(8, spec.heads_q, 3, device="cuda", dtype=BF16)
    fixed = DecodeCache(op, 8, 65536, device="cuda", dtype=BF16, configs=op.configs, splits=base)
    resident = decode_residency(lambda: fixed.step(q, gates), target)
    assert set(resident) == {"cmp", "slc"} and all(1 <= n <= 32 for n in resident.values())
    assert cache.splits == decode_splits(spec, 8, 65536, target, resident)


def test_step_captured_in_cuda_graph():
    """A step captured once replays correctly while the cache grows (lengths and compressed
    tokens change on the device only), and an eager step never synchronises with the host."""
    spec = nsagen.load_spec("nsa-d128")
    op = nsagen.build(spec)
    B, P, extra = 8, 8190, 40
    cache = op.new_cache(B, P + extra, device="cuda", dtype=BF16)
    cache.prefill(torch.randn(B, P, 4, 128, device="cuda", dtype=BF16),
                  torch.randn(B, P, 4, 128, device="cuda", dtype=BF16),
                  torch.tensor([P - 13 * b for b in range(B)], dtype=torch.int32, device="cuda"))
    cache.append(torch.randn(B, 4, 128, device="cuda", dtype=BF16),
                 torch.randn(B, 4, 128, device="cuda", dtype=BF16))
    q = torch.randn(B, 64, 128, device="cuda", dtype=BF16)
    gates = torch.rand(B, 64, 3, device="cuda", dtype=BF16)
    cache.step(q, gates)         # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = cache.step(q, gates)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = torch.empty_like(eager)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out.copy_(cache.step(q, gates))
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out.copy_(cache.step(q, gates))
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    for _ in range(extra - 1):   # crosses emission points (every 16 tokens) and block edges
        cache.append(torch.randn(B, 4, 128, device="cuda", dtype=BF16),
                     torch.randn(B, 4, 128, device="cuda", dtype=BF16))
        q.normal_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, cache.step(q, gates))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm_90 or later")
def test_dependent_launches_change_no_result():
    """The decode kernels chain with programmatic dependent launch on sm_90+: each waits for
    the previous one before reading anything and lets the next one launch after its main loop.
    A graph of B=8 steps at 64k replayed many times gives,
    bit for bit, what the kernels launched one after another give."""
    spec = nsagen.load_spec("nsa-d128")
    op = nsagen.build(spec)
    mod = op.module
    assert mod.DECODE_PDL and mod._decode_pdl(torch.device("cuda"))
    B, P = 8, 65536
    cache = op.new_cache(B, P, device="cuda", dtype=BF16)
    cache.prefill(torch.randn(B, P - 1, 4, 128, device="cuda", dtype=BF16),
                  torch.randn(B, P - 1, 4, 128, device="cuda", dtype=BF16),
                  torch.tensor([P - 1 - 977 * b for b in range(B)], dtype=torch.int32,
                               device="cuda"))
    cache.append(torch.randn(B, 4, 128, device="cuda", dtype=BF16),
                 torch.randn(B, 4, 128, device="cuda", dtype=BF16))
    q = torch.randn(B, 64, 128, device="cuda", dtype=BF16)
    gates = torch.rand(B, 64, 3, device="cuda", dtype=BF16)
    try:
        mod.DECODE_PDL = False
        serial, serial_idx = cache.step(q, gates, return_indices=True)
        mod.DECODE_PDL = True
        out = torch.full_like(serial, float("nan"))
        idx = torch.full_like(serial_idx, -7)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            cache.step(q, gates)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            o_g, i_g = cache.step(q, gates, return_indices=True)
            out.copy_(o_g)
            idx.copy_(i_g)
        for _ in range(50):
            out.fill_(float("nan"))
            idx.fill_(-7)
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(idx, serial_idx)
            assert torch.equal(out, serial)
        eager, eager_idx = cache.step(q, gates, return_indices=True)
    finally:
        mod.DECODE_PDL = True
    assert torch.equal(eager, serial) and torch.equal(eager_idx, serial_idx)
    for b in (0, B - 1):
        t = int(cache.lens[b]) - 1
        _check_step(spec, serial[b], serial_idx[b], q[b], cache.k[b], cache.v[b], gates[b], t)


def test_paged_decode_equals_the_contiguous_cache_and_replays_in_a_graph():
    """Shuffled 64-token pages (the first two shared by sequences 0 and 1, which have the same
    prompt there): append_paged + decode_paged equal a contiguous cache's steps with the same
    splits, eagerly and replayed from a CUDA graph."""
    spec = nsagen.load_spec("nsa-d128")
    op = nsagen.build(spec)
    B, T, page = 4, 5000, 64
    H, HQ, Dk, Dv = spec.heads_kv, spec.heads_q, spec.dim_qk, spec.dim_v
    torch.manual_seed(3)
    q = torch.randn(B, T, HQ, Dk, device="cuda", dtype=BF16)
    k = torch.randn(B, T, H, Dk, device="cuda", dtype=BF16)
    v = torch.randn(B, T, H, Dv, device="cuda", dtype=BF16)
    gates = torch.rand(B, T, HQ, 3, device="cuda", dtype=BF16)
    k[1, :2 * page], v[1, :2 * page] = k[0, :2 * page], v[0, :2 * page]
    n_raw = -(-T // page)
    n_cmp = -(-spec.num_cmp(n_raw * page) // page)
    perm = torch.randperm(B * (n_raw + n_cmp) + 7, device="cuda").to(torch.int32)
    table = perm[:B * n_raw].view(B, n_raw).clone()
    table[1, :2] = table[0, :2]
    cmp_table = perm[B * n_raw:B * (n_raw + n_cmp)].view(B, n_cmp).clone()
    pools = [torch.zeros(perm.numel(), page, H, d, device="cuda", dtype=BF16)
             for d in (Dk, Dv, Dk, Dv)]
    splits = op._paged_steps().state(B, n_raw * page, torch.device("cuda"))[0]
    cache = DecodeCache(op, B, n_raw * page, device="cuda", dtype=BF16, splits=dict(splits))
    prompt = torch.tensor([4000, 4000, 123, 4990], dtype=torch.int32, device="cuda")
    cache.prefill(k[:, :4990], v[:, :4990], prompt)
    # the engine's prefill: the contiguous cache's rows copied into their pages
    for b in range(B):
        n, nc = int(prompt[b]), spec.num_cmp(int(prompt[b]))
        for pool, src, tab, m in ((pools[0], cache.k, table, n), (pools[1], cache.v, table, n),
                                  (pools[2], cache.k_cmp, cmp_table, nc),
                                  (pools[3], cache.v_cmp, cmp_table, nc)):
            pos = torch.arange(m, device="cuda")
            pool[tab[b, pos // page].long(), pos % page] = src[b, :m]
    rows = torch.arange(B, device="cuda")
    seq_lens = prompt.clone()
    xin = dict(q=q[rows, prompt.long()].clone(), k=k[rows, prompt.long()].clone(),
               v=v[rows, prompt.long()].clone(), g=gates[rows, prompt.long()].clone())

    def paged_step():
        seq_lens.add_(1)
        op.append_paged(xin["k"], xin["v"], *pools, table, cmp_table, seq_lens)
        return op.decode_paged(xin["q"], xin["g"], *pools, table, cmp_table, seq_lens)

    def feed(t):
        for n, src in (("q", q), ("k", k), ("v", v), ("g", gates)):
            xin[n].copy_(src[rows, t])

    for step in range(2):                      # eager
        t = (prompt + step).long()
        feed(t)
        o = paged_step()
        want = cache.decode(xin["q"], xin["k"], xin["v"], xin["g"])
        assert rel_err(o, want) < 1e-3, (step, rel_err(o, want))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):              # warm-up on a copy of the lengths
        saved = seq_lens.clone()
        paged_step()
        seq_lens.copy_(saved)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_step()
    for step in range(2, 5):                   # replays
        t = (prompt + step).long()
        feed(t)
        graph.replay()
        want = cache.decode(xin["q"], xin["k"], xin["v"], xin["g"])
        assert torch.equal(seq_lens, cache.lens)
        assert rel_err(out, want) < 1e-3, (step, rel_err(out, want))


def _prefilled_d128(prompt, T, seed):
    """An nsa-d128 cache of len(prompt) rows, each prefilled to its prompt length, with the
    random bf16 q, k, v, gates [B, T, ...] its rows come from."""
    spec = nsagen.load_spec("nsa-d128")
    B = len(prompt)
    torch.manual_seed(seed)
    q = torch.randn(B, T, spec.heads_q, spec.dim_qk, device="cuda", dtype=BF16)
    k = torch.randn(B, T, spec.heads_kv, spec.dim_qk, device="cuda", dtype=BF16)
    v = torch.randn(B, T, spec.heads_kv, spec.dim_v, device="cuda", dtype=BF16)
    gates = torch.rand(B, T, spec.heads_q, 3, device="cuda", dtype=BF16)
    cache = nsagen.build(spec).new_cache(B, T, device="cuda", dtype=BF16)
    P = max(prompt)
    cache.prefill(k[:, :P], v[:, :P], torch.tensor(prompt, dtype=torch.int32, device="cuda"))
    return cache, q, k, v, gates


def test_several_tokens_per_step_bf16():
    """Four draft tokens per sequence over a 5000-token cache: each one's picks score like the
    reference's, and its output is the reference's on them."""
    spec = nsagen.load_spec("nsa-d128")
    B, S = 2, 4
    prompt = [4000, 4093]
    cache, q, k, v, gates = _prefilled_d128(prompt, T=5000, seed=8)
    rows = torch.arange(B, device="cuda")[:, None]
    t = torch.tensor(prompt, device="cuda")[:, None] + torch.arange(S, device="cuda")
    o, idx = cache.decode(q[rows, t], k[rows, t], v[rows, t], gates[rows, t],
                          return_indices=True)
    assert o.shape == (B, S, spec.heads_q, spec.dim_v)
    for b in range(B):
        for s in range(S):
            p = int(t[b, s])
            # the picks score like the reference's; the output is the reference's on them
            _check_step(spec, o[b, s], idx[b, s], q[b, p], k[b], v[b], gates[b, p], p)


def test_decode_with_the_compressed_branchs_own_query_bf16():
    """q_cmp drives the compressed branch and the block scores in decoding: a one-token step
    and a three-token step over a 3000-token cache equal the reference with the same q_cmp
    (which here differs from q enough to change the result)."""
    spec = nsagen.load_spec("nsa-d128")
    B = 2
    prompt = [2500, 2941]
    cache, q, k, v, gates = _prefilled_d128(prompt, T=3000, seed=21)
    q_cmp = torch.randn_like(q)
    rows = torch.arange(B, device="cuda")
    t = torch.tensor(prompt, device="cuda")
    o, idx = cache.decode(q[rows, t], k[rows, t], v[rows, t], gates[rows, t],
                          q_cmp=q_cmp[rows, t], return_indices=True)
    plain, _, _ = _ref_row(spec, q[0, prompt[0]], k[0], v[0], gates[0, prompt[0]], prompt[0])
    assert rel_err(o[0], plain) > 5e-2          # q_cmp matters at these inputs
    for b in range(B):
        p = prompt[b]
        _check_step(spec, o[b], idx[b], q[b, p], k[b], v[b], gates[b, p], p, q_cmp[b, p])
    r = rows[:, None]
    t3 = t[:, None] + 1 + torch.arange(3, device="cuda")
    o, idx = cache.decode(q[r, t3], k[r, t3], v[r, t3], gates[r, t3], q_cmp=q_cmp[r, t3],
                          return_indices=True)
    for b in range(B):
        for s in range(3):
            p = int(t3[b, s])
            _check_step(spec, o[b, s], idx[b, s], q[b, p], k[b], v[b], gates[b, p], p,
                        q_cmp[b, p])
