"""A straight-through path from the selected branch to the block scores (beyond the NSA paper).

In NSA the top-n choice of blocks is not differentiated: the block scores learn only through the
compressed branch's output. The layer's `selection_grad="straight-through"` adds a second
signal: the term `(w - stop_gradient(w)) * g_slc * o_slc` (the selected branch's output before
its gate, a constant) is added to the op's output, where `w` is the score of the blocks the
token chose. Its value is exactly 0, so outputs are unchanged; in the backward `w` receives
`g_slc * <dO, o_slc>` summed over the KV head's query heads, the gradient the selected gate would
get per unit of w. When the selected branch helped, the chosen blocks' scores are pushed up, and
when it hurt, down.

`w` for token t and KV head h is the mean, over the chosen blocks j that have a visible
compressed token, of `log sum_{query heads of h} sum_i W[i, j] exp(scale * q_cmp . k_cmp[i])`:
the log of the block's group-summed importance (docs/algorithm.md, section 4) without the
softmax normaliser, which is the same for every block of a row and so never changes the choice.
"""
from __future__ import annotations

import torch

from .spec import Spec


def chosen_block_score(spec: Spec, q_cmp: torch.Tensor, k_cmp: torch.Tensor,
                       idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """w [B, T, H]: the log importance of the blocks each token chose, averaged over them.

    q_cmp [B, T, HQ, Dk] (the query of the block scores), k_cmp [B, Nc, H, Dk], idx [B, T, H, n]
    (the op's block indices, -1 padded), pos [T] (each token's position). Differentiable in
    q_cmp and k_cmp; 0 where a token chose no block with a visible compressed token.
    Memory: B T HQ n (l'/d + l/d - 1) scores."""
    B, T, HQ, Dk = q_cmp.shape
    H, G = spec.heads_kv, spec.group
    nc = k_cmp.shape[1]
    if nc == 0:     # sequences shorter than l: no block has a visible compressed token
        return q_cmp.new_zeros(B, T, H)
    r1, r2, d = spec.cmp_block // spec.cmp_stride, spec.slc_block // spec.cmp_stride, spec.cmp_stride
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
    qg = q_cmp.view(B, T, H, G, Dk)
    s = torch.einsum("bthgd,bthnmd->bthgnm", qg, kc) * spec.softmax_scale
    logw = torch.log(weight.clamp(min=1).to(s.dtype))
    s = torch.where(ok[:, :, :, None], s + logw[:, :, :, None], s.new_tensor(float("-inf")))
    flat = s.permute(0, 1, 2, 4, 3, 5).reshape(B, T, H, n, G * M)
    has = ok.any(-1)                                                   # [B, T, H, n]
    # a block with no visible window: finite stand-ins, so no NaN reaches the gradient
    block = torch.logsumexp(torch.where(has[..., None], flat, torch.zeros_like(flat)), -1)
    block = torch.where(has, block, torch.zeros_like(block))
    return block.sum(-1) / has.sum(-1).clamp(min=1)


__all__ = ["chosen_block_score"]
