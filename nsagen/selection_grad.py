"""Training signals for the block selection beyond the NSA paper (the layer's `selection_grad`).

In NSA the top-n choice of blocks is not differentiated: the block scores learn only through the
compressed branch's gated output, so a compressed gate near 0 leaves them without a signal
(docs/layer.md shows it happening). Both signals here reach the scores whatever that gate is.
Both are computed in PyTorch from the compressed queries and keys the layer already has.

`"straight-through"`: the term `(w - stop_gradient(w)) * g_slc * o_slc` (the selected branch's
output before its gate, a constant) is added to the op's output, where `w` is the score of the
blocks the token chose. Its value is exactly 0, so outputs are unchanged; in the backward `w`
receives `g_slc * <dO, o_slc>` summed over the KV head's query heads, the gradient the selected
gate would get per unit of w. When the selected branch helped, the chosen blocks' scores are
pushed up, and when it hurt, down.

`w` for token t and KV head h is the log of the share of the block importance (docs/algorithm.md,
section 4, summed over the KV head's query heads) that falls on the chosen blocks: at most 0, and
exactly 0 when the chosen blocks hold every visible compressed token (short rows, where nothing
was left out). A share, not the blocks' raw log importance: raising every score together leaves
it unchanged, so the signal can only move importance between blocks and never inflate the
scores (an unnormalised score lets it push every logit up without bound until bf16 overflows).
The total importance is `r1 sum_g exp(lse_g)`: each compressed window overlaps blocks for
r1 = l/d chunks in all, and lse_g is the log-sum-exp of query head g's compressed scores.

`"distill"`: the scores learn to rank the chosen blocks as the selected branch's attention
does, as DSA trains its indexer (docs/algorithm.md, the indexer loss). For a sample of query
tokens, the target is the selected branch's attention probability on each chosen block (summed
over the block's tokens, averaged over the KV head's query heads, renormalised over the chosen
blocks that have a visible compressed token). The prediction is the softmax of those blocks' log
importance. The loss is the KL divergence of the prediction from the target, averaged over the
sampled rows with two or more such blocks. Its gradient reaches the compressed queries and
keys only, and the layer passes a detached query and compressed keys made from detached source
keys, so only the learned compression trains on it (docs/layer.md says why).
"""
from __future__ import annotations

import torch

from .spec import Spec

DISTILL_STRIDE = 16     # "distill" samples every 16th query token (the last of each 16)


def chosen_block_log_importance(spec: Spec, q_cmp: torch.Tensor, k_cmp: torch.Tensor,
                                idx: torch.Tensor, pos: torch.Tensor):
    """(log importance [B, T, H, n], has [B, T, H, n]) of the blocks each token chose.

    The importance of block j is `sum_g sum_i W[i, j] exp(scale q_cmp[g] . k_cmp[i])` over the
    visible compressed windows i that overlap it by W[i, j] chunks and the KV head's query heads
    g: the block score of docs/algorithm.md section 4 without the softmax normaliser. `has` is
    False for padding (-1) and for blocks without a visible window, whose log importance is a
    finite stand-in (0), so no NaN reaches a gradient. q_cmp [B, T, HQ, Dk], k_cmp
    [B, Nc, H, Dk] with Nc >= 1, idx [B, T, H, n], pos [T]. Scores at least in float32."""
    B, T, HQ, Dk = q_cmp.shape
    H, G = spec.heads_kv, spec.group
    nc = k_cmp.shape[1]
    r1, r2, d = spec.cmp_block // spec.cmp_stride, spec.slc_block // spec.cmp_stride, spec.cmp_stride
    wide = torch.promote_types(q_cmp.dtype, torch.float32)      # bf16 scores would round
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
    s = torch.einsum("bthgd,bthnmd->bthgnm", qg, kc).to(wide) * spec.softmax_scale
    logw = torch.log(weight.clamp(min=1).to(s.dtype))
    s = torch.where(ok[:, :, :, None], s + logw[:, :, :, None], s.new_tensor(float("-inf")))
    flat = s.permute(0, 1, 2, 4, 3, 5).reshape(B, T, H, n, G * M)
    has = ok.any(-1)                                                   # [B, T, H, n]
    block = torch.logsumexp(torch.where(has[..., None], flat, torch.zeros_like(flat)), -1)
    return torch.where(has, block, torch.zeros_like(block)), has


def _only(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x where `keep`, -inf elsewhere along the last dim; a row with nothing kept becomes 0s
    (finite), so a softmax or log-sum-exp over it gives no NaN, in value or gradient."""
    out = torch.where(keep, x, x.new_tensor(float("-inf")))
    return torch.where(keep.any(-1, keepdim=True), out, torch.zeros_like(x))


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
    block, has = chosen_block_log_importance(spec, q_cmp, k_cmp, idx, pos)
    # the total: every visible window of every query head of the group, r1 chunks each
    r1 = spec.cmp_block // spec.cmp_stride
    ci = torch.arange(nc, device=idx.device)
    vis = (ci[None, :] * spec.cmp_stride + spec.cmp_block - 1) <= pos[:, None]      # [T, Nc]
    s_all = torch.einsum("bthgd,bchd->bthgc", q_cmp.view(B, T, H, G, Dk), k_cmp)
    s_all = s_all.to(block.dtype) * spec.softmax_scale
    s_all = torch.where(vis[None, :, None, None, :], s_all, s_all.new_tensor(float("-inf")))
    any_vis = vis.any(-1)[None, :, None]                                             # [1, T, 1]
    flat_all = s_all.flatten(-2)
    flat_all = torch.where(any_vis[..., None], flat_all, torch.zeros_like(flat_all))
    log_total = torch.logsumexp(flat_all, -1) + torch.log(s_all.new_tensor(float(r1)))
    some = has.any(-1)
    chosen = torch.logsumexp(_only(block, has), -1)
    return torch.where(some & any_vis, chosen - log_total, torch.zeros_like(chosen))


def distill_loss(spec: Spec, q: torch.Tensor, k: torch.Tensor, q_cmp: torch.Tensor,
                 k_cmp: torch.Tensor, idx: torch.Tensor, stride: int) -> torch.Tensor:
    """The "distill" loss (a scalar) over the query tokens stride-1, 2 stride-1, ... of every
    row: KL(target || softmax of the chosen blocks' log importance), the target being the
    selected branch's attention mass per chosen block, computed without gradient.

    q [B, T, HQ, Dk] and k [B, T, H, Dk] are what the selected branch attends with (rotated, if
    the layer rotates it); q_cmp, k_cmp are the block scores' query and compressed keys;
    idx [B, T, H, n] the op's block indices. Memory: B (T / stride) H n l' (Dk + G) values."""
    B, T, HQ, Dk = q.shape
    H, G, bs = spec.heads_kv, spec.group, spec.slc_block
    nc = k_cmp.shape[1]
    pos = torch.arange(stride - 1, T, stride, device=q.device)
    if nc == 0 or pos.numel() == 0:
        return q_cmp.new_zeros(()).float()
    block, has = chosen_block_log_importance(spec, q_cmp[:, pos], k_cmp, idx[:, pos], pos)
    with torch.no_grad():
        blk = idx[:, pos].long()                                       # [B, S, H, n]
        tok = blk[..., None] * bs + torch.arange(bs, device=q.device)  # [B, S, H, n, l']
        live = (blk[..., None] >= 0) & (tok <= pos[None, :, None, None, None])
        rows = torch.arange(B, device=q.device)[:, None, None, None, None]
        heads = torch.arange(H, device=q.device)[None, None, :, None, None]
        kt = k[rows, tok.clamp(0, T - 1), heads]                       # [B, S, H, n, l', Dk]
        qs = q[:, pos].view(B, -1, H, G, Dk)
        z = torch.einsum("bshgd,bshnld->bshgnl", qs, kt).to(block.dtype) * spec.softmax_scale
        z = torch.where(live[:, :, :, None], z, z.new_tensor(float("-inf")))
        p = torch.softmax(z.flatten(-2), -1).view_as(z).sum(-1).mean(3)  # [B, S, H, n]
        p = torch.where(has, p, torch.zeros_like(p))
        target = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        use = has.sum(-1) >= 2                                         # something to rank
    logp = torch.where(has, torch.log_softmax(_only(block, has), -1), torch.zeros_like(block))
    kl = (target * (torch.log(target.clamp_min(1e-30)) - logp)).sum(-1)  # [B, S, H]
    kl = torch.where(use, kl, torch.zeros_like(kl))
    return kl.sum() / use.sum().clamp_min(1)


class _AddLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_like = (loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.loss_like
        return grad, torch.ones((), dtype=dtype, device=device)


def with_loss(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """x unchanged; in the backward `loss` (a scalar) receives gradient 1, as if it were added
    to the loss the backward started from (how the "distill" loss joins a user's training)."""
    return _AddLoss.apply(x, loss)


__all__ = ["DISTILL_STRIDE", "chosen_block_log_importance", "chosen_block_score", "distill_loss",
           "with_loss"]
