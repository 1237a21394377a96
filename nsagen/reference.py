"""The PyTorch oracle: Native Sparse Attention, and DeepSeek Sparse Attention (section 8), exactly
as docs/algorithm.md pins them.

Vectorised over tokens (queries are processed in chunks only to bound memory), differentiable by
autograd, in any floating dtype (tests use float64). Every generated kernel is checked against it.
The core works on queries at arbitrary positions against a key prefix, so the same code gives the
prefill (positions 0..T-1) and a decode step (one query at position t).
"""
from __future__ import annotations

import torch

from .checks import check_dsa_inputs, check_inputs
from .dsa_spec import DSASpec
from .spec import Spec

_CHUNK_ELEMS = 1 << 24  # bound on score-tensor elements per query chunk


def mean_compress(x: torch.Tensor, spec: Spec) -> torch.Tensor:
    """Parameter-free compression phi = mean over each window: [B, T, H, D] -> [B, Nc, H, D]."""
    B, T, H, D = x.shape
    nc = spec.num_cmp(T)
    if nc == 0:
        return x.new_zeros(B, 0, H, D)
    # unfold -> [B, Nc, H, D, l]
    return x.unfold(1, spec.cmp_block, spec.cmp_stride).mean(-1)


def block_weights(spec: Spec, num_cmp: int, num_blocks: int, device=None,
                  dtype=torch.float64) -> torch.Tensor:
    """W[i, j] = |window_i ∩ block_j| / d: maps compressed probabilities to block importance.

    Counted in stride-sized chunks: window i covers chunks i .. i + l/d - 1, block j covers
    chunks j*l'/d .. (j+1)*l'/d - 1, and each shared chunk contributes d/d = 1.
    """
    r1 = spec.cmp_block // spec.cmp_stride
    r2 = spec.slc_block // spec.cmp_stride
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    lo = torch.maximum(i, j * r2)
    hi = torch.minimum(i + r1 - 1, (j + 1) * r2 - 1)
    return (hi - lo + 1).clamp(min=0).to(dtype)


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to mask; rows with nothing visible give zeros, no NaN."""
    if s.shape[-1] == 0:
        return s * 0  # nothing to attend (e.g. T < l compressed tokens); keeps the autograd graph
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def select_blocks(spec: Spec, score: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Top-n block choice with forced blocks: score [B, Tq, H, NB] -> indices [B, Tq, H, n] int32.

    Forced: j < n_init and jt - n_local < j <= jt (jt = t // l'); the rest by score, ties to the
    lower index; ascending, padded with -1.
    """
    B, Tq, H, NB = score.shape
    n = spec.slc_count
    j = torch.arange(NB, device=score.device)
    jt = (pos // spec.slc_block)[:, None]
    cand = j[None, :] <= jt
    forced = cand & ((j[None, :] < spec.slc_initial) | (j[None, :] > jt - spec.slc_local))
    key = score.detach().to(torch.float64)
    key = torch.where(forced[None, :, None, :], torch.full_like(key, float("inf")), key)
    key = torch.where(cand[None, :, None, :], key, torch.full_like(key, float("-inf")))
    order = torch.sort(key, dim=-1, descending=True, stable=True)
    top_idx = order.indices[..., :n]
    valid = order.values[..., :n] > float("-inf")
    big = NB + n
    top_idx = torch.where(valid, top_idx, torch.full_like(top_idx, big))
    top_idx = torch.sort(top_idx, dim=-1).values
    top_idx = torch.where(top_idx == big, torch.full_like(top_idx, -1), top_idx)
    if top_idx.shape[-1] < n:
        pad = top_idx.new_full((B, Tq, H, n - top_idx.shape[-1]), -1)
        top_idx = torch.cat([top_idx, pad], -1)
    return top_idx.to(torch.int32)


def _chunks(total: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    for a in range(0, total, step):
        yield a, min(total, a + step)


def _slc_attention(spec, qh, pos, k, v, idx, scale):
    """Attention of each query over the tokens of its selected blocks with position <= t."""
    B, Tq, H, G, Dk = qh.shape
    Dv = v.shape[-1]
    Tk = k.shape[1]
    lb = spec.slc_block
    nb = spec.num_blocks(Tk)
    n = idx.shape[-1]
    S = n * lb

    def blocks(x):  # [B, Tk, H, D] -> [B, H, NB, l', D], zero-padded to whole blocks
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nb * lb - Tk))
        return x.view(B, nb, lb, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    kb, vb = blocks(k), blocks(v)
    bi = torch.arange(B, device=k.device)[:, None, None, None]
    hi = torch.arange(H, device=k.device)[None, None, :, None]
    offs = torch.arange(lb, device=k.device)
    outs = []
    for a, b in _chunks(Tq, B * H * G * S):
        ic = idx[:, a:b].long()                                          # [B, c, H, n]
        tok = (ic[..., None] * lb + offs).flatten(-2)                    # [B, c, H, S]
        ok = (ic[..., None] >= 0).expand(*ic.shape, lb).flatten(-2) & (tok <= pos[a:b, None, None])
        ic = ic.clamp(min=0)
        c = ic.shape[1]
        kg = kb[bi, hi, ic].reshape(B, c, H, S, Dk)                      # whole blocks at once
        vg = vb[bi, hi, ic].reshape(B, c, H, S, Dv)
        s = torch.einsum("bqhgd,bqhsd->bqhgs", qh[:, a:b], kg) * scale
        p = _masked_softmax(s, ok[:, :, :, None, :])
        outs.append(torch.einsum("bqhgs,bqhsd->bqhgd", p, vg))
    return torch.cat(outs, 1) if outs else qh.new_zeros(B, 0, H, G, Dv)


def _win_attention(spec, qh, pos, k, v, scale):
    """Sliding-window attention over keys max(0, t-w+1) .. t."""
    B, Tq, H, G, Dk = qh.shape
    w = spec.window
    outs = []
    for a, b in _chunks(Tq, B * H * G * (w + 64)):
        lo = max(0, int(pos[a:b].min()) - w + 1)
        hi = int(pos[a:b].max()) + 1
        kp = torch.arange(lo, hi, device=k.device)
        s = torch.einsum("bqhgd,bkhd->bqhgk", qh[:, a:b], k[:, lo:hi]) * scale
        t = pos[a:b, None]
        ok = (kp[None, :] <= t) & (kp[None, :] > t - w)
        p = _masked_softmax(s, ok[None, :, None, None, :])
        outs.append(torch.einsum("bqhgk,bkhd->bqhgd", p, v[:, lo:hi]))
    return torch.cat(outs, 1)


def _nsa_core(spec: Spec, q, pos, k, v, gates, k_cmp, v_cmp, k_win, v_win, block_indices=None,
              q_cmp=None, branches: list | None = None):
    """NSA for queries q [B, Tq, HQ, Dk] at positions pos [Tq] over keys k [B, Tk, H, Dk];
    q_cmp (default q) is the query of the compressed branch and of the block scores.

    Returns (o, indices, block scores); `block_indices` overrides the top-n choice. A given
    `branches` list receives the three branches' outputs before gating [B, Tq, HQ, Dv] (cmp,
    slc, win; zeros for a branch the spec leaves out).
    """
    B, Tq, HQ, Dk = q.shape
    H, G, Dv = spec.heads_kv, spec.group, spec.dim_v
    scale = spec.softmax_scale
    qh = q.view(B, Tq, H, G, Dk)
    out = q.new_zeros(B, Tq, H, G, Dv)
    g = gates.view(B, Tq, H, G, 3) if gates is not None else None

    parts = [None, None, None]

    def gate(o, col):
        parts[col] = o
        return o if g is None else o * g[..., col:col + 1]

    idx = score = None
    if spec.has("cmp") or spec.has("slc"):
        if k_cmp is None:
            k_cmp, v_cmp = mean_compress(k, spec), mean_compress(v, spec)
        nc = k_cmp.shape[1]
        ci = torch.arange(nc, device=q.device)
        vis = (ci[None, :] * spec.cmp_stride + spec.cmp_block - 1) <= pos[:, None]   # [Tq, Nc]
        qc = qh if q_cmp is None else q_cmp.view(B, Tq, H, G, Dk)
        s = torch.einsum("bqhgd,bchd->bqhgc", qc, k_cmp) * scale
        p_cmp = _masked_softmax(s, vis[None, :, None, None, :])
        if spec.has("cmp"):
            out = out + gate(torch.einsum("bqhgc,bchd->bqhgd", p_cmp, v_cmp), 0)
        if spec.has("slc"):
            nb = spec.num_blocks(k.shape[1])
            w = block_weights(spec, nc, nb, q.device, p_cmp.dtype)
            score = torch.einsum("bqhgc,cj->bqhj", p_cmp.detach(), w)
            idx = select_blocks(spec, score, pos) if block_indices is None else block_indices
            out = out + gate(_slc_attention(spec, qh, pos, k, v, idx, scale), 1)
    if spec.has("win"):
        kw, vw = (k_win, v_win) if k_win is not None else (k, v)
        out = out + gate(_win_attention(spec, qh, pos, kw, vw, scale), 2)
    if branches is not None:
        branches.extend((torch.zeros_like(out) if o is None else o).reshape(B, Tq, HQ, Dv)
                        for o in parts)
    return out.view(B, Tq, HQ, Dv), idx, score


def nsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor | None, spec: Spec,
        k_cmp: torch.Tensor | None = None, v_cmp: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None, return_indices: bool = False,
        k_win: torch.Tensor | None = None, v_win: torch.Tensor | None = None,
        block_indices: torch.Tensor | None = None, return_scores: bool = False,
        q_cmp: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
        return_branches: bool = False):
    """NSA prefill: o [B, T, HQ, Dv] (and block indices [B, T, H, n] int32 if return_indices).

    Shapes and semantics: docs/algorithm.md. Computed in the inputs' dtype; differentiable.
    `q_cmp` [B, T, HQ, Dk] (default q) is the query of the compressed branch and of the block
    scores, e.g. without the rotary embedding the other branches' q carries.
    `block_indices` [B, T, H, n] replaces the top-n choice (to check a kernel's output on the
    blocks it chose when a near-tie flipped one); `return_scores` also returns the group-summed
    block importance [B, T, H, NB] (per-sequence NB, padded with 0 for varlen).
    `cu_seqlens_k` packs the keys apart from the queries: each sequence's queries are its last
    positions. `return_branches` also returns the branches' outputs before gating
    [3, B, T, HQ, Dv] (cmp, slc, win), after the indices and scores.
    """
    prob = check_inputs(spec, q, k, v, gates, k_cmp, v_cmp, cu_seqlens, k_win, v_win, q_cmp,
                        cu_seqlens_k)
    if cu_seqlens is None:
        pos = torch.arange(prob.seq_len, device=q.device)
        parts: list = []
        o, idx, score = _nsa_core(spec, q, pos, k, v, gates, k_cmp, v_cmp, k_win, v_win,
                                  block_indices, q_cmp, parts)
        branches = torch.stack(parts)
    else:
        os_, idxs, scores, per_seq = [], [], [], []
        t0 = k0 = c0 = 0
        for n, nq in zip(prob.seqlens, prob.qlens or prob.seqlens):
            nc = spec.num_cmp(n)
            sl = slice(t0, t0 + nq)     # the sequence's query rows: its last nq positions
            kl = slice(k0, k0 + n)
            cs = slice(c0, c0 + nc)
            pos = torch.arange(n - nq, n, device=q.device)
            parts = []
            o_s, i_s, sc_s = _nsa_core(
                spec, q[:, sl], pos, k[:, kl], v[:, kl],
                None if gates is None else gates[:, sl],
                None if k_cmp is None else k_cmp[:, cs], None if v_cmp is None else v_cmp[:, cs],
                None if k_win is None else k_win[:, kl], None if v_win is None else v_win[:, kl],
                None if block_indices is None else block_indices[:, sl],
                None if q_cmp is None else q_cmp[:, sl], parts)
            per_seq.append(torch.stack(parts))
            os_.append(o_s)
            idxs.append(i_s)
            scores.append(sc_s)
            t0, k0, c0 = t0 + nq, k0 + n, c0 + nc
        o = torch.cat(os_, 1)
        branches = torch.cat(per_seq, 2)
        idx = torch.cat(idxs, 1) if idxs[0] is not None else None
        if scores[0] is not None:
            nb = max(x.shape[-1] for x in scores)
            score = torch.cat([torch.nn.functional.pad(x, (0, nb - x.shape[-1])) for x in scores], 1)
        else:
            score = None
    out = [o]
    if return_indices or return_branches:
        if idx is None:
            idx = q.new_full((prob.batch, prob.seq_len, spec.heads_kv, spec.slc_count), -1,
                             dtype=torch.int32)
        out.append(idx)
    if return_scores:
        out.append(score)
    if return_branches:
        out.append(branches.detach())
    return out[0] if len(out) == 1 else tuple(out)


def nsa_decode_step(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    gates: torch.Tensor | None, spec: Spec, k_cmp: torch.Tensor | None = None,
                    v_cmp: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None,
                    return_indices: bool = False,
                    k_win: torch.Tensor | None = None, v_win: torch.Tensor | None = None,
                    block_indices: torch.Tensor | None = None, q_cmp: torch.Tensor | None = None):
    """One decode step: q [B, HQ, Dk] at position t = len - 1 over the cache holding tokens 0..t;
    q_cmp [B, HQ, Dk] (default q) is the query of the compressed branch and the block scores.

    k_cache/v_cache are [B, L, H, D]; cache_seqlens [B] (int) gives each row's length (default L),
    so one batch can hold sequences of different lengths. k_cmp/v_cmp [B, Nc(L), H, D] hold each
    row's compressed tokens (rows beyond Nc(len) are ignored). Returns o [B, HQ, Dv], equal to row t
    of the prefill of that sequence. `block_indices` [B, H, n] replaces the top-n choice.
    """
    if q.dim() != 3 or q.shape[1:] != (spec.heads_q, spec.dim_qk):
        raise ValueError(f"q: expected [B, HQ={spec.heads_q}, Dk={spec.dim_qk}], got {tuple(q.shape)}")
    B = q.shape[0]
    if q_cmp is not None and (not isinstance(q_cmp, torch.Tensor) or q_cmp.shape != q.shape):
        raise ValueError(f"q_cmp: expected the shape of q {tuple(q.shape)}, got "
                         f"{tuple(q_cmp.shape) if isinstance(q_cmp, torch.Tensor) else type(q_cmp).__name__}")
    for name, t, d in (("k_cache", k_cache, spec.dim_qk), ("v_cache", v_cache, spec.dim_v)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != (spec.heads_kv, d):
            raise ValueError(f"{name}: expected [B={B}, L, H={spec.heads_kv}, {d}], "
                             f"got {tuple(t.shape)}")
    L = k_cache.shape[1]
    if v_cache.shape[1] != L:
        raise ValueError(f"v_cache: length {v_cache.shape[1]} differs from k_cache's {L}")
    if gates is not None:
        if gates.shape != (B, spec.heads_q, 3):
            raise ValueError(f"gates: expected [B, HQ={spec.heads_q}, 3], got {tuple(gates.shape)}")
        if gates.dtype != q.dtype:
            raise TypeError(f"gates: dtype {gates.dtype} does not match q's dtype {q.dtype}")
    if cache_seqlens is not None and (cache_seqlens.dtype.is_floating_point
                                      or cache_seqlens.dtype == torch.bool):
        raise TypeError(f"cache_seqlens: expected an integer tensor, got {cache_seqlens.dtype}")
    lens = [L] * B if cache_seqlens is None else [int(x) for x in cache_seqlens.tolist()]
    if len(lens) != B or any(n < 1 or n > L for n in lens):
        raise ValueError(f"cache_seqlens: expected {B} lengths in 1..{L}, got {lens}")
    outs, idxs = [], []
    for b in range(B):
        n = lens[b]
        nc = spec.num_cmp(n)
        sl = (slice(b, b + 1), slice(0, n))
        kc = None if k_cmp is None else k_cmp[b:b + 1, :nc]
        vc = None if v_cmp is None else v_cmp[b:b + 1, :nc]
        kw = None if k_win is None else k_win[sl]
        vw = None if v_win is None else v_win[sl]
        # validate the row as a length-n prefill would be validated
        check_inputs(spec, q[b:b + 1, None].expand(1, n, -1, -1), k_cache[sl], v_cache[sl],
                     None, kc, vc, None, kw, vw)
        pos = torch.tensor([n - 1], device=q.device)
        o, idx, _ = _nsa_core(spec, q[b:b + 1, None], pos, k_cache[sl], v_cache[sl],
                              None if gates is None else gates[b:b + 1, None], kc, vc, kw, vw,
                              None if block_indices is None else block_indices[b:b + 1, None],
                              None if q_cmp is None else q_cmp[b:b + 1, None])
        outs.append(o[:, 0])
        idxs.append(idx[:, 0] if idx is not None else
                    q.new_full((1, spec.heads_kv, spec.slc_count), -1, dtype=torch.int32))
    o = torch.cat(outs, 0)
    return (o, torch.cat(idxs, 0)) if return_indices else o


# ---------------------------------------------------------------------------- DSA
def dsa_index_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, w_idx: torch.Tensor,
                     keys: slice | None = None) -> torch.Tensor:
    """The indexer's scores I [B, Tq, Tk] = sum_j w_idx[t, j] relu(q_idx[t, j] . k_idx[s]) for the
    queries given against the keys (all, or `keys`); no causal mask."""
    kk = k_idx if keys is None else k_idx[:, keys]
    return torch.einsum("bqj,bqjs->bqs", w_idx, torch.relu(torch.einsum("bqjd,bsd->bqjs", q_idx, kk)))


def fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """The values FP8 indexer kernels compute with (docs/algorithm.md section 8): each row of
    the last dim scaled so its largest magnitude is 448, rounded to float8_e4m3, scaled back;
    float64. The scale is computed in float32, as the kernels do."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0
    x8 = (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return x8.double() * scale.double()


def dsa_select(spec: DSASpec, score: torch.Tensor) -> torch.Tensor:
    """S_t from index scores [B, T, T] (causal mask applied here): the min(topk, t + 1) keys of
    largest score, ties to the lower position, ascending, padded with -1 -> [B, T, topk] int32."""
    B, T, _ = score.shape
    pos = torch.arange(T, device=score.device)
    causal = pos[None, :] <= pos[:, None]
    key = score.detach().masked_fill(~causal, float("-inf"))
    kk = min(spec.topk, T)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :kk]
    valid = pos[None, :kk] <= pos[:, None]                       # t + 1 picks at most
    order = torch.where(valid, order, torch.full_like(order, T))
    order = torch.sort(order, dim=-1).values
    order = torch.where(order == T, torch.full_like(order, -1), order)
    if kk < spec.topk:
        order = torch.cat([order, order.new_full((B, T, spec.topk - kk), -1)], -1)
    return order.to(torch.int32)


def _dsa_probs(spec: DSASpec, q, k, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention over the selected keys: (probabilities [B, T, H, G, topk], the gathered key rows'
    positions (clamped), validity [B, T, topk])."""
    B, T, HQ, Dk = q.shape
    H, G = spec.heads_kv, spec.group
    ok = idx >= 0
    pos = idx.clamp(min=0).long()
    kg = torch.gather(k, 1, pos.reshape(B, -1)[..., None, None].expand(-1, -1, H, Dk))
    kg = kg.view(B, T, -1, H, Dk)
    s = torch.einsum("bthgd,btshd->bthgs", q.view(B, T, H, G, Dk), kg) * spec.softmax_scale
    return _masked_softmax(s, ok[:, :, None, None, :]), pos, ok


def dsa_sparse_attention(spec: DSASpec, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """The attention of a DSA layer over given selected positions idx [B, T, topk] (-1 padded;
    one sequence per batch row): o [B, T, HQ, Dv]. `v=None` means v = k[..., :Dv]. Lets a test
    check a kernel's output on the positions the kernel chose."""
    B, T, HQ, Dk = q.shape
    H, Dv = spec.heads_kv, spec.dim_v
    v = k[..., :Dv] if v is None else v
    p, pos, _ = _dsa_probs(spec, q, k, idx)
    vg = torch.gather(v, 1, pos.reshape(B, -1)[..., None, None].expand(-1, -1, H, Dv))
    o = torch.einsum("bthgs,btshd->bthgd", p, vg.view(B, T, -1, H, Dv))
    return o.reshape(B, T, HQ, Dv)


def _dsa_core(spec: DSASpec, q, k, v, q_idx, k_idx, w_idx):
    idx = dsa_select(spec, dsa_index_scores(q_idx, k_idx, w_idx))
    return dsa_sparse_attention(spec, q, k, v, idx), idx


def dsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, q_idx: torch.Tensor,
        k_idx: torch.Tensor, w_idx: torch.Tensor, spec: DSASpec,
        cu_seqlens: torch.Tensor | None = None, return_indices: bool = False):
    """DSA prefill: o [B, T, HQ, Dv] (and the selected positions [B, T, topk] int32, -1 padded,
    when `return_indices`). `v=None` means v = k[..., :Dv]. With `cu_seqlens` (B = 1) each
    packed sequence is its own layer call and positions count from its start. Computed in the
    inputs' dtype (tests use float64); differentiable to q, k, v (the selection is not)."""
    prob = check_dsa_inputs(spec, q, k, v, q_idx, k_idx, w_idx, cu_seqlens)
    if cu_seqlens is None:
        o, idx = _dsa_core(spec, q, k, v, q_idx, k_idx, w_idx)
    else:
        outs, idxs, t0 = [], [], 0
        for n in prob.seqlens:
            sl = slice(t0, t0 + n)
            o_, i_ = _dsa_core(spec, q[:, sl], k[:, sl], None if v is None else v[:, sl],
                               q_idx[:, sl], k_idx[:, sl], w_idx[:, sl])
            outs.append(o_)
            idxs.append(i_)
            t0 += n
        o, idx = torch.cat(outs, 1), torch.cat(idxs, 1)
    return (o, idx) if return_indices else o


def dsa_indexer_loss(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                     w_idx: torch.Tensor, spec: DSASpec, dense: bool = False) -> torch.Tensor:
    """The indexer's training loss, summed over batch and tokens: KL(p[t] || softmax(I[t])) where
    p[t] is the main attention's probabilities summed over the HQ heads and L1-normalised. Sparse
    stage: over S_t, both distributions renormalised there; `dense` (warm-up): over every s <= t
    with dense causal attention. The gradient reaches q_idx, k_idx and w_idx only."""
    check_dsa_inputs(spec, q, k, None, q_idx, k_idx, w_idx, values=False)
    B, T, HQ, Dk = q.shape
    H, G = spec.heads_kv, spec.group
    score = dsa_index_scores(q_idx, k_idx, w_idx)                           # [B, T, T]
    tpos = torch.arange(T, device=q.device)
    q_, k_ = q.detach(), k.detach()
    if dense:
        keys = tpos[None, :].expand(T, T)
        ok = (keys <= tpos[:, None])[None].expand(B, T, T)
        s = torch.einsum("bthgd,bshd->bthgs", q_.view(B, T, H, G, Dk), k_) * spec.softmax_scale
        p = _masked_softmax(s, ok[:, :, None, None, :])
        logit = score
    else:
        idx = dsa_select(spec, score)
        p, pos, ok = _dsa_probs(spec, q_, k_, idx)
        logit = torch.gather(score, 2, pos)
    target = p.sum((2, 3))
    target = target / target.sum(-1, keepdim=True)
    logq = torch.log_softmax(logit.masked_fill(~ok, float("-inf")), -1)
    kl = torch.where(ok & (target > 0), target * (torch.log(target.clamp_min(1e-300)) - logq),
                     torch.zeros_like(target))
    return kl.sum()
