"""Shared checks of the generated DSA forward against the float64 reference (CPU and GPU tests).

Outputs are poisoned before the launch, so an element the kernels do not write fails. The
selection is compared by score: where a near-tie in low precision flips the last picks, the
chosen set must score as well as the reference's, and the output is then checked against the
reference attention on the positions the kernels chose. With FP8 indexer keys the reference
scores the values the kernels compute with (`reference.fp8_rows`), so the check stays as tight.
"""
from __future__ import annotations

import torch

from nsagen import reference
from nsagen.launch import pack
from nsagen.layout import build_layout

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SCORE_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def dsa_inputs(spec, lens, dtype, device, seed, with_v=True):
    """Random inputs for sequences of `lens` packed in one row (B = 1) and their cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    x = dict(q=r(1, T, spec.heads_q, spec.dim_qk), k=r(1, T, spec.heads_kv, spec.dim_qk),
             v=r(1, T, spec.heads_kv, spec.dim_v) if with_v else None,
             q_idx=r(1, T, spec.indexer_heads, spec.indexer_dim), k_idx=r(1, T, spec.indexer_dim),
             w_idx=r(1, T, spec.indexer_heads))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    return x, cu


def run_poisoned(op, x, lens):
    """The module's forward on packed inputs with NaN / garbage-filled outputs: (o, idx)."""
    spec, q = op.spec, x["q"]
    n = q.shape[1]
    o = torch.full((n, spec.heads_q, spec.dim_v), float("nan"), dtype=q.dtype, device=q.device)
    idx = torch.full((n, spec.topk), -7, dtype=torch.int32, device=q.device)
    kp = pack(x["k"])
    vp = None if x["v"] is None else pack(x["v"])      # None: v is k's first Dv columns
    lay = build_layout(spec, tuple(lens), q.device)
    op.module.forward(pack(q), kp, vp, pack(x["q_idx"]), pack(x["k_idx"]), pack(x["w_idx"]), lay,
                      configs=op.configs, out=o, idx_out=idx)
    return o, idx


def check_forward(op, x, lens, dtype):
    """Kernel selection and output against the float64 reference, sequence by sequence."""
    spec = op.spec
    o, idx = run_poisoned(op, x, lens)
    assert not torch.isnan(o).any(), "an output element was not written"
    x64 = {k: None if t is None else t.double() for k, t in x.items()}     # on their device
    t0 = 0
    for n in lens:
        sl = slice(t0, t0 + n)
        part = {k: None if t is None else t[:, sl] for k, t in x64.items()}
        qi, ki = part["q_idx"], part["k_idx"]
        if spec.fp8_keys:
            qi, ki = reference.fp8_rows(qi), reference.fp8_rows(ki)
        score = reference.dsa_index_scores(qi, ki, part["w_idx"])[0]
        ref_idx = reference.dsa_select(spec, score[None])[0]
        got = idx[sl].long()
        check_selection(spec, got, ref_idx.long(), score, dtype)
        ref_o = reference.dsa_sparse_attention(spec, part["q"], part["k"], part["v"],
                                               got[None].to(torch.int32))[0]
        err = rel_err(o[sl], ref_o)
        assert err < TOL[dtype], f"output rel err {err:.2e} (sequence of {n})"
        t0 += n


def check_selection(spec, got, ref, score, dtype):
    """Ascending picks, -1 only after them, min(topk, t + 1) of them, none in the future; the
    picks' scores equal the reference's best scores within the dtype's tolerance."""
    T = got.shape[0]
    pos = torch.arange(T, device=got.device)[:, None]
    valid = got >= 0
    assert (valid.sum(1) == torch.clamp(pos[:, 0] + 1, max=spec.topk)).all(), "wrong pick count"
    assert not (valid[:, 1:] & ~valid[:, :-1]).any(), "a -1 before a pick"
    assert ((got[:, 1:] > got[:, :-1]) | ~valid[:, 1:]).all(), "picks not strictly ascending"
    assert ((got <= pos) | ~valid).all(), "a pick after its token"
    scale = score.abs().amax().clamp_min(1.0)
    mine = torch.where(valid, score.gather(1, got.clamp(min=0)), float("-inf"))
    best = torch.where(ref >= 0, score.gather(1, ref.clamp(min=0)), float("-inf"))
    mine, best = mine.sort(1, descending=True).values, best.sort(1, descending=True).values
    fin = torch.isfinite(best)
    diff = (mine - best).abs()[fin].max().item() if fin.any() else 0.0
    assert diff <= SCORE_TOL[dtype] * scale, f"picked scores differ from the best by {diff:.3e}"
