"""A straight-through path from the selected branch to the block scores (beyond the NSA paper).

In NSA the top-n choice of blocks is not differentiated: the block scores learn only through the
compressed branch's output. The layer's `selection_grad="straight-through"` adds a second
signal: the term `(w - stop_gradient(w)) * g_slc * o_slc` (the selected branch's output before
its gate, a constant) is added to the op's output, where `w` is the score of the blocks the
token chose. Its value is exactly 0, so outputs are unchanged; in the backward `w` receives
`g_slc * <dO, o_slc>` summed over the KV head's query heads, the gradient the selected gate would
get per unit of w. When the selected branch helped, the chosen blocks' scores are pushed up, and
when it hurt, down.

`w` for token t and KV head h is the log of the share of the block importance (docs/algorithm.md,
section 4, summed over the KV head's query heads) that falls on the chosen blocks: at most 0, and
exactly 0 when the chosen blocks hold every visible compressed token (short rows, where nothing
was left out). A share, not the blocks' raw log importance: raising every score together leaves
it unchanged, so the signal can only move importance between blocks and never inflate the
scores (an unnormalised score lets it push every logit up without bound until bf16 overflows).
The total importance is `r1 sum_g exp(lse_g)`: each compressed window overlaps blocks for
r1 = l/d chunks in all, and lse_g is the log-sum-exp of query head g's compressed scores.
"""
from __future__ import annotations

import torch

from .spec import Spec


def chosen_block_score(spec: Spec, q_cmp: torch.Tensor, k_cmp: torch.Tensor,
                       idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """w [B, T, H]: the log share of the block importance on the blocks each token chose.

    q_cmp [B, T, HQ, Dk] (the query of the block scores), k_cmp [B, Nc, H, Dk], idx [B, T, H, n]
    (the op's block indices, -1 padded), pos [T] (each token's position). Differentiable in
    q_cmp and k_cmp; 0 where a token has no visible compressed token or chose no block with
    one. Memory: B T HQ (Nc + n (l'/d + l/d - 1)) scores."""
    B, T, HQ, Dk = q_cmp.shape
    H, G = spec.heads_kv, spec.group
    nc = k_cmp.shape[1]
    if nc == 0:     # sequences shorter than l: no block has a visible compressed token
        return q_cmp.new_zeros(B, T, H)
    r1, r2, d = spec.cmp_block // spec.cmp_stride, spec.slc_block // spec.cmp_stride, spec.cmp_stride
    qg = q_cmp.view(B, T, H, G, Dk)
    # the total: every visible window of every query head of the group
    ci_all = torch.arange(nc, device=idx.device)
    vis_all = (ci_all[None, :] * d + spec.cmp_block - 1) <= pos[:, None]          # [T, Nc]
    wide = torch.promote_types(q_cmp.dtype, torch.float32)      # bf16 scores would round
    s_all = torch.einsum("bthgd,bchd->bthgc", qg, k_cmp).to(wide) * spec.softmax_scale
    s_all = torch.where(vis_all[None, :, None, None, :], s_all, s_all.new_tensor(float("-inf")))
    any_vis = vis_all.any(-1)[None, :, None]                                         # [1, T, 1]
    flat_all = torch.where(any_vis[..., None], s_all.flatten(-2), torch.zeros_like(s_all.flatten(-2)))
    log_total = torch.logsumexp(flat_all, -1) + torch.log(s_all.new_tensor(float(r1)))
    # the chosen blocks: the windows touching block j, weighted by their overlap in chunks
    m = torch.arange(r1 + r2 - 1, device=idx.device)
    blk = idx.long()                                                   # [B, T, H, n]
    ci = blk[..., None] * r2 - (r1 - 1) + m                            # windows touching block j
    # overlap of window i (chunks i .. i+r1-1) with block j (chunks j r2 .. (j+1) r2 - 1)
    lo = torch.maximum(ci, blk[..., None] * r2)
    hi = torch.minimum(ci + r1 - 1, (blk[..., None] + 1) * r2 - 1)
    weight = (hi - lo + 1).clamp(min=0)
    visible = (ci >= 0) & (ci < nc) & (ci * d + spec.cmp_block - 1 <= pos[None, :, None, None, None])
    ok = visible & (weight > 0) & (blk[..., None] >= 0)                # [B, T, H, n, M]
    n, M = blk.shape[-1], m.numel()
    heads = torch.arange(H, device=idx.device)[None, None, :, None, None]
    rows = torch.arange(B, device=idx.device)[:, None, None, None, None]
    kc = k_cmp[rows, ci.clamp(0, max(nc - 1, 0)), heads]               # [B, T, H, n, M, Dk]
    s = torch.einsum("bthgd,bthnmd->bthgnm", qg, kc).to(wide) * spec.softmax_scale
    logw = torch.log(weight.clamp(min=1).to(s.dtype))
    s = torch.where(ok[:, :, :, None], s + logw[:, :, :, None], s.new_tensor(float("-inf")))
    flat = s.permute(0, 1, 2, 4, 3, 5).reshape(B, T, H, n * G * M)
    has = ok.flatten(-2).any(-1)                                       # [B, T, H]
    # rows with nothing chosen: finite stand-ins, so no NaN reaches the gradient
    chosen = torch.logsumexp(torch.where(has[..., None], flat, torch.zeros_like(flat)), -1)
    return torch.where(has & any_vis, chosen - log_total, torch.zeros_like(chosen))


__all__ = ["chosen_block_score"]
