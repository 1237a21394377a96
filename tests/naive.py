"""A deliberately naive float64 NSA, written from docs/algorithm.md alone, to check nsagen.reference.

One query at a time: for each batch row, token t and KV head, it computes the compression branch
of every query head of the group, turns the probabilities into block importances by literally
intersecting token ranges, sums them over the group, picks the blocks, then runs the selected and
window attentions over explicit lists of key positions. Nothing is vectorised over tokens; it is
meant to be obviously right, not fast, and is only used at tiny shapes.
"""
from __future__ import annotations

import numpy as np
import torch


def _np(x):
    return None if x is None else x.detach().cpu().to(torch.float64).numpy()


def _softmax_attend(qv, keys, values, scale):
    """softmax(q . keys * scale) @ values over the given rows; also returns the probabilities."""
    s = keys @ qv * scale
    s = s - s.max()
    e = np.exp(s)
    p = e / e.sum()
    return p @ values, p


def _overlap(a0, a1, b0, b1):
    """Number of integer positions shared by the closed ranges [a0, a1] and [b0, b1]."""
    return len(set(range(a0, a1 + 1)) & set(range(b0, b1 + 1)))


def num_cmp(T, l, d):
    return (T - l) // d + 1 if T >= l else 0


def _mean_windows(x, l, d):
    """x [T, H, D] -> [Nc, H, D]: window i is the mean of tokens i*d .. i*d + l - 1."""
    T, H, D = x.shape
    nc = num_cmp(T, l, d)
    out = np.zeros((nc, H, D))
    for i in range(nc):
        for h in range(H):
            acc = np.zeros(D)
            for s in range(i * d, i * d + l):
                acc += x[s, h]
            out[i, h] = acc / l
    return out


def _naive_sequence(spec, q, k, v, gates, k_cmp, v_cmp, k_win, v_win):
    """One sequence: q [T, HQ, Dk], k/v [T, H, D].

    Returns o [T, HQ, Dv], idx [T, H, n] and the group-summed block scores [T, H, NB] (zero for
    blocks after the query's own)."""
    T, HQ, Dk = q.shape
    H = k.shape[1]
    Dv = v.shape[2]
    G = HQ // H
    l, d = spec.cmp_block, spec.cmp_stride
    lp, n = spec.slc_block, spec.slc_count
    n_init, n_local = spec.slc_initial, spec.slc_local
    w = spec.window
    scale = spec.scale if spec.scale is not None else Dk ** -0.5
    branches = set(spec.branches)
    if gates is None:
        gates = np.ones((T, HQ, 3))
    if k_win is None:
        k_win, v_win = k, v

    use_cmp = "cmp" in branches or "slc" in branches
    if use_cmp and k_cmp is None:
        if spec.cmp_kind != "mean":
            raise ValueError("learned compression needs k_cmp and v_cmp")
        k_cmp, v_cmp = _mean_windows(k, l, d), _mean_windows(v, l, d)
    nc = num_cmp(T, l, d)
    if use_cmp:
        assert k_cmp.shape[0] == nc and v_cmp.shape[0] == nc

    # |window_i ∩ block_j|, by intersecting the token ranges themselves
    nb = -(-T // lp)
    overlap = [[_overlap(i * d, i * d + l - 1, j * lp, (j + 1) * lp - 1) for j in range(nb)]
               for i in range(nc)]

    o = np.zeros((T, HQ, Dv))
    idx = np.full((T, H, n), -1, dtype=np.int64)
    scores = np.zeros((T, H, nb))
    for t in range(T):
        jt = t // lp
        for g in range(H):
            heads = [g * G + r for r in range(G)]
            o_cmp = {h: np.zeros(Dv) for h in heads}
            score = [0.0] * (jt + 1)        # group-summed importance of candidate blocks 0..jt
            if use_cmp:
                visible = [i for i in range(nc) if i * d + l - 1 <= t]
                for h in heads:
                    if not visible:
                        continue            # o_cmp = 0, importance 0
                    oc, p = _softmax_attend(q[t, h], k_cmp[visible, g], v_cmp[visible, g], scale)
                    o_cmp[h] = oc
                    for j in range(jt + 1):
                        for pi, i in zip(p, visible):
                            score[j] += pi * overlap[i][j] / d

            scores[t, g, : jt + 1] = score
            chosen = []
            if "slc" in branches:
                forced = [j for j in range(jt + 1) if j < n_init or jt - n_local < j <= jt]
                rest = [j for j in range(jt + 1) if j not in forced]
                rest.sort(key=lambda j: (-score[j], j))     # best first, ties to the lower index
                chosen = sorted(forced + rest[: max(0, n - len(forced))])
                assert len(chosen) <= n
                for m, j in enumerate(chosen):
                    idx[t, g, m] = j

            for h in heads:
                out = np.zeros(Dv)
                if "cmp" in branches:
                    out += gates[t, h, 0] * o_cmp[h]
                if "slc" in branches:
                    pos = [s for j in chosen for s in range(j * lp, (j + 1) * lp) if s <= t]
                    os_, _ = _softmax_attend(q[t, h], k[pos, g], v[pos, g], scale)
                    out += gates[t, h, 1] * os_
                if "win" in branches:
                    pos = list(range(max(0, t - w + 1), t + 1))
                    ow, _ = _softmax_attend(q[t, h], k_win[pos, g], v_win[pos, g], scale)
                    out += gates[t, h, 2] * ow
                o[t, h] = out
    return o, idx, scores


def naive_nsa(q, k, v, gates, spec, k_cmp=None, v_cmp=None, cu_seqlens=None,
              k_win=None, v_win=None, return_scores=False):
    """NSA by loops, in float64. Returns (o [B, T, HQ, Dv], indices [B, T, H, n] int32).

    With cu_seqlens (B == 1) every sequence is computed on its own; k_cmp/v_cmp are packed per
    sequence and block indices count from each sequence's first token. When 'slc' is not a branch
    the indices are all -1. With return_scores, also the group-summed block importance
    [B, T, H, NB] (NB of the longest sequence; zero where a block is not a candidate).
    """
    q, k, v, gates = _np(q), _np(k), _np(v), _np(gates)
    k_cmp, v_cmp, k_win, v_win = _np(k_cmp), _np(v_cmp), _np(k_win), _np(v_win)
    B, T, HQ, _ = q.shape
    H, Dv, n = k.shape[2], v.shape[3], spec.slc_count
    o = np.zeros((B, T, HQ, Dv))
    idx = np.full((B, T, H, n), -1, dtype=np.int64)
    offs = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    lens = [e - a for a, e in zip(offs[:-1], offs[1:])]
    scores = np.zeros((B, T, H, -(-max(lens) // spec.slc_block)))

    def pick(x, b, sl):
        return None if x is None else x[b, sl]

    if cu_seqlens is None:
        for b in range(B):
            every = slice(None)
            o[b], idx[b], scores[b] = _naive_sequence(
                spec, q[b], k[b], v[b], pick(gates, b, every), pick(k_cmp, b, every),
                pick(v_cmp, b, every), pick(k_win, b, every), pick(v_win, b, every))
    else:
        assert B == 1
        c0 = 0
        for a, e in zip(offs[:-1], offs[1:]):
            nc = num_cmp(e - a, spec.cmp_block, spec.cmp_stride)
            sl, cs = slice(a, e), slice(c0, c0 + nc)
            o[0, sl], idx[0, sl], sc = _naive_sequence(
                spec, q[0, sl], k[0, sl], v[0, sl], pick(gates, 0, sl),
                pick(k_cmp, 0, cs), pick(v_cmp, 0, cs), pick(k_win, 0, sl), pick(v_win, 0, sl))
            scores[0, sl, :, : sc.shape[-1]] = sc
            c0 += nc
        if k_cmp is not None:
            assert c0 == k_cmp.shape[1]
    out = (torch.from_numpy(o), torch.from_numpy(idx).to(torch.int32))
    return out + (torch.from_numpy(scores),) if return_scores else out

