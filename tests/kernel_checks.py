"""Shared checks of generated forward kernels against the float64 reference (CPU and GPU tests).

Outputs are poisoned before the launch so an unwritten element fails. Block choices are compared
by score: where a near-tie flips the n-th block in low precision, the chosen set must score as
well as the reference's, and the output is then checked on the blocks the kernel chose.
"""
from __future__ import annotations

import torch

import nsagen
from nsagen import reference
from nsagen.layout import build_layout

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SCORE_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(spec, B, T, dtype, device, seed, varlen_lens=None):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(device)

    if varlen_lens is not None:
        B, T = 1, sum(varlen_lens)
    HQ, H, Dk, Dv = spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
    q, k, v = rnd(B, T, HQ, Dk), rnd(B, T, H, Dk), rnd(B, T, H, Dv)
    gates = torch.rand(B, T, HQ, 3, generator=gen).to(dtype).to(device)
    cu = None
    if varlen_lens is not None:
        cu = torch.tensor([0] + list(torch.tensor(varlen_lens).cumsum(0)), dtype=torch.int32,
                          device=device)
    k_cmp = v_cmp = k_win = v_win = None
    if spec.learned_compression and (spec.has("cmp") or spec.has("slc")):
        lens = varlen_lens or [T]
        nc = sum(spec.num_cmp(n) for n in lens)
        k_cmp, v_cmp = rnd(B, nc, H, Dk), rnd(B, nc, H, Dv)
    if spec.kv_per_branch == "separate" and spec.has("win"):
        k_win, v_win = rnd(B, T, H, Dk), rnd(B, T, H, Dv)
    return dict(q=q, k=k, v=v, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp, cu_seqlens=cu,
                k_win=k_win, v_win=v_win)


def check_indices(spec, idx, ref_idx, ref_score, lens, dtype):
    """Structural invariants, then the chosen set's score against the reference's best."""
    n, lb = spec.slc_count, spec.slc_block
    pos = torch.cat([torch.arange(L, device=idx.device) for L in lens])
    pos = pos.view(idx.shape[0], idx.shape[1], 1, 1)
    valid = idx >= 0
    assert idx.shape == ref_idx.shape
    # -1 only as trailing padding, ascending valid entries, never a future block
    assert not (valid[..., 1:] & ~valid[..., :-1]).any(), "a -1 before a valid index"
    d = idx[..., 1:] - idx[..., :-1]
    assert ((d > 0) | ~valid[..., 1:]).all(), "indices not strictly ascending"
    assert (idx <= pos // lb).all(), "a future block was selected"
    # the number chosen is min(n, candidates)
    count = valid.sum(-1)
    want = torch.clamp(pos[..., 0] // lb + 1, max=n)
    assert (count == want).all(), "wrong number of selected blocks"
    # forced blocks always present
    jt = pos // lb
    for f in range(spec.slc_initial):
        has = (idx == f).any(-1, keepdim=True)
        assert (has | (jt < f)).all(), f"initial block {f} missing"
    for r in range(spec.slc_local):
        jf = jt - r
        has = (idx == jf).any(-1, keepdim=True)
        assert (has | (jf < 0)).all(), f"local block jt-{r} missing"
    # chosen by score: total reference importance of the kernel's set vs the reference's set
    if ref_score is None:
        return
    sc = ref_score.double()

    def total(ix):
        return torch.where(ix >= 0, sc.gather(-1, ix.clamp(min=0).long()), 0.0).sum(-1)

    got, best = total(idx), total(ref_idx.to(idx.device))
    slack = SCORE_TOL[dtype] * best.clamp_min(1e-6)
    bad = got < best - slack
    assert not bad.any(), (f"{int(bad.sum())} rows chose a block set scoring below the reference "
                           f"(worst {float((best - got)[bad].max()):.3g})")


def check_forward(spec, B, T, dtype, device, seed=0, varlen_lens=None, ref_device=None):
    """Run the generated forward on fresh inputs and compare with the float64 reference."""
    op = nsagen.build(spec)
    x = make_inputs(spec, B, T, dtype, device, seed, varlen_lens)
    lens = tuple(varlen_lens) if varlen_lens is not None else (T,) * B
    Bx, Tx = x["q"].shape[:2]
    lay = build_layout(spec, lens, x["q"].device)

    def pack(t):
        return None if t is None else t.reshape(-1, *t.shape[2:]).contiguous()

    out = torch.full((Bx * Tx, spec.heads_q, spec.dim_v), float("nan"), dtype=dtype, device=device)
    idx_out = torch.full((Bx * Tx, spec.heads_kv, spec.slc_count), 7777, dtype=torch.int32,
                         device=device)
    with torch.no_grad():
        o, idx, _ = op.module.forward(
            pack(x["q"]), pack(x["k"]), pack(x["v"]), pack(x["gates"]), pack(x["k_cmp"]),
            pack(x["v_cmp"]), lay, pack(x["k_win"]), pack(x["v_win"]), out=out, idx_out=idx_out)
        o = o.view(Bx, Tx, spec.heads_q, spec.dim_v)
        assert torch.isfinite(o).all(), "non-finite (or unwritten) output"
        rd = ref_device or device
        xr = {k_: (v_.to(rd).double() if v_ is not None and v_.is_floating_point() else
                   (v_.to(rd) if v_ is not None else None)) for k_, v_ in x.items()}
        ref_o, ref_idx, ref_score = reference.nsa(
            xr["q"], xr["k"], xr["v"], xr["gates"], spec, xr["k_cmp"], xr["v_cmp"],
            xr["cu_seqlens"], return_indices=True, return_scores=True,
            k_win=xr["k_win"], v_win=xr["v_win"])
        if spec.has("slc"):
            idx = idx.view(Bx, Tx, spec.heads_kv, spec.slc_count)
            check_indices(spec, idx.to(rd), ref_idx, ref_score, lens, dtype)
            if not torch.equal(idx.to(rd), ref_idx):
                ref_o = reference.nsa(
                    xr["q"], xr["k"], xr["v"], xr["gates"], spec, xr["k_cmp"], xr["v_cmp"],
                    xr["cu_seqlens"], k_win=xr["k_win"], v_win=xr["v_win"],
                    block_indices=idx.to(rd))
        err = rel_err(o.to(rd), ref_o)
    assert err < TOL[dtype], f"relative error {err:.3g} >= {TOL[dtype]:g} ({dtype}, T={T}, B={B})"
    return err


def scaled(spec, kv_heads: int = 1, dim: int = 32):
    """A small version of a shipped spec with the same structure: G, block ratios, branches,
    Dk/Dv ratio (so Dk=192 stays a non-power-of-two), and compression kind."""
    d = 4
    ratio = spec.dim_qk / spec.dim_v
    return spec.replace(
        name=spec.name + "-small", heads_kv=kv_heads, heads_q=kv_heads * spec.group,
        dim_qk=int(dim * ratio) if ratio >= 1 else dim, dim_v=dim if ratio >= 1 else int(dim / ratio),
        cmp_stride=d, cmp_block=d * (spec.cmp_block // spec.cmp_stride),
        slc_block=d * (spec.slc_block // spec.cmp_stride), slc_count=4,
        slc_initial=min(spec.slc_initial, 1), slc_local=min(spec.slc_local, 2),
        window=None if spec.window is None else 24)
