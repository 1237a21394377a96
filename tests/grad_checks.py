"""Shared gradient checks of the generated backward against autograd through the reference."""
from __future__ import annotations

import torch

import nsagen
from nsagen import reference

from kernel_checks import TOL, make_inputs, rel_err

GRAD_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


ALL = ("q", "k", "v", "gates", "k_cmp", "v_cmp", "k_win", "v_win", "q_cmp")


def suffix_queries(x: dict, lens, qlens) -> dict:
    """Keep only the last qlens[i] query rows of each packed sequence of `lens` tokens (q,
    gates, q_cmp); the keys keep every row and move to cu_seqlens_k."""
    rows = torch.cat([torch.arange(s + n - m, s + n) for s, n, m in
                      zip(torch.tensor([0] + list(lens)).cumsum(0).tolist(), lens, qlens)])
    y = dict(x)
    for n in ("q", "gates", "q_cmp"):
        if x.get(n) is not None:
            y[n] = x[n][:, rows.to(x[n].device)].contiguous()
    y["cu_seqlens_k"] = x["cu_seqlens"]
    y["cu_seqlens"] = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32,
                                   device=x["q"].device)
    return y


def check_backward(spec, B, T, dtype, device, seed=0, varlen_lens=None, ref_device=None,
                   q_cmp=False, qlens=None, indices=True):
    """Gradients of every differentiable input against float64 autograd on the same blocks;
    with `q_cmp` the compressed branch and block scores get a query of their own; with `qlens`
    sequence i of `varlen_lens` keeps only its last qlens[i] queries (cu_seqlens_k). Without
    `indices` the op is called as a model calls it (no block indices asked for) and the
    reference makes its own block choice."""
    op = nsagen.build(spec)
    x = make_inputs(spec, B, T, dtype, device, seed, varlen_lens)
    x["q_cmp"] = None
    x["cu_seqlens_k"] = None
    if q_cmp:
        gen = torch.Generator(device="cpu").manual_seed(seed + 7)
        x["q_cmp"] = torch.randn(x["q"].shape, generator=gen).to(dtype).to(device)
    if qlens is not None:
        x = suffix_queries(x, varlen_lens, qlens)
    names = [n for n in ALL if x[n] is not None]
    for n in names:
        x[n].requires_grad_(True)
    o = op(x["q"], x["k"], x["v"], x["gates"], x["k_cmp"], x["v_cmp"], x["cu_seqlens"],
           return_indices=indices, k_win=x["k_win"], v_win=x["v_win"], q_cmp=x["q_cmp"],
           cu_seqlens_k=x["cu_seqlens_k"])
    o, idx = o if indices else (o, None)
    blocks = idx is not None and spec.has("slc")
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=gen).to(dtype).to(device)
    grads = torch.autograd.grad(o, [x[n] for n in names], do)
    rd = ref_device or device
    xr = {n: (x[n].detach().to(rd).double().requires_grad_(True) if n in names else None)
          for n in ALL}
    cu = None if x["cu_seqlens"] is None else x["cu_seqlens"].to(rd)
    cu_k = None if x["cu_seqlens_k"] is None else x["cu_seqlens_k"].to(rd)
    ref = reference.nsa(xr["q"], xr["k"], xr["v"], xr["gates"], spec, xr["k_cmp"], xr["v_cmp"],
                        cu, k_win=xr["k_win"], v_win=xr["v_win"],
                        block_indices=idx.to(rd) if blocks else None, q_cmp=xr["q_cmp"],
                        cu_seqlens_k=cu_k)
    if blocks and dtype == torch.float32:   # the blocks are the reference's (q_cmp)
        xd = {n: None if t is None else t.detach() for n, t in xr.items()}
        ref_idx = reference.nsa(xd["q"], xd["k"], xd["v"], xd["gates"], spec, xd["k_cmp"],
                                xd["v_cmp"], cu, return_indices=True, k_win=xd["k_win"],
                                v_win=xd["v_win"], q_cmp=xd["q_cmp"], cu_seqlens_k=cu_k)[1]
        assert torch.equal(idx.to(rd), ref_idx), "block choice differs from the reference"
    assert rel_err(o.detach().to(rd), ref.detach()) < TOL[dtype]
    ref_grads = torch.autograd.grad(ref, [xr[n] for n in names], do.to(rd).double(),
                                    allow_unused=True)
    ref_grads = [torch.zeros_like(xr[n]) if g is None else g for n, g in zip(names, ref_grads)]
    errs = {}
    for n, got, want in zip(names, grads, ref_grads):
        assert got is not None and got.shape == want.shape, n
        assert torch.isfinite(got).all(), f"non-finite gradient of {n}"
        if want.numel() == 0:  # e.g. k_cmp of a sequence shorter than l
            continue
        if want.abs().max() == 0:  # e.g. dq of a query with one key: zero up to rounding
            assert got.abs().max() < 1e-4 * do.abs().max(), n
            continue
        errs[n] = rel_err(got.to(rd), want)
        assert errs[n] < GRAD_TOL[dtype], f"d{n}: relative error {errs[n]:.3g} ({dtype}, T={T})"
    return errs
