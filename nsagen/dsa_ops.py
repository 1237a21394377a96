"""The DSA op a model calls: validation, packing, dispatch to the generated kernels or the
reference (docs/algorithm.md section 8).

`nsagen.build(spec)` returns a :class:`DSAOp` for an `attention: dsa` spec. It runs the
generated indexer, top-k and sparse-attention kernels on CUDA tensors (or on the CPU with
TRITON_INTERPRET=1), and the reference otherwise; autograd reaches q, k and v through the
generated backward (the selection is not differentiated). `indexer_loss` runs the generated
loss kernels (sparse stage, or the dense warm-up), differentiable to the indexer's inputs.
`new_cache` gives a decode cache whose steps run the same kernels.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from . import reference
from .checks import check_dsa_inputs, check_fp8_keys_device
from .dsa_decode import DSACache
from .dsa_spec import DSASpec
from .launch import (direct_launches, fallback_notice, interpreted_in_float32,
                     kernels_available, pack)
from .layout import build_layout
from .target import Target


class DSAOp:
    """DeepSeek Sparse Attention for one spec, backed by a generated, cached Triton module."""

    def __init__(self, spec: DSASpec, module: ModuleType, path: Path, target: Target):
        self.spec = spec
        self.module = module
        self.path = path
        self.target = target
        self.name = module.URI
        self.module_name = module.__name__
        self.configs: dict[str, dict] = {}     # explicit per-kernel launch configs

    def __repr__(self) -> str:
        return f"DSAOp({self.spec.name!r}, module={self.path})"

    def new_cache(self, batch: int, max_len: int, device=None, dtype: torch.dtype | None = None,
                  with_values: bool = True) -> DSACache:
        """An empty decode cache (nsagen.dsa_decode.DSACache) for `batch` sequences of up to
        `max_len` tokens; `with_values=False` keeps no values (v = k[..., :Dv], as MLA)."""
        return DSACache(self, batch, max_len, device, dtype, with_values)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                 q_idx: torch.Tensor, k_idx: torch.Tensor, w_idx: torch.Tensor,
                 cu_seqlens: torch.Tensor | None = None, return_indices: bool = False):
        """o [B, T, HQ, Dv] (and the selected positions [B, T, topk] int32, ascending and -1
        padded, with `return_indices`). `v=None` means v = k[..., :Dv] (read in place)."""
        spec = self.spec
        prob = check_dsa_inputs(spec, q, k, v, q_idx, k_idx, w_idx, cu_seqlens)
        if not kernels_available(q.device):
            fallback_notice(q.device)
            return reference.dsa(q, k, v, q_idx, k_idx, w_idx, spec, cu_seqlens, return_indices)
        check_fp8_keys_device(spec, q.device)
        dtype = q.dtype
        q, k, v, q_idx, k_idx = _kernel_dtypes(q, k, v, q_idx, k_idx)
        B, T = prob.batch, prob.seq_len
        lay = build_layout(spec, prob.seqlens, q.device)
        with direct_launches():
            o, idx = _SparseAttention.apply(pack(q), pack(k), pack(v), pack(q_idx), pack(k_idx),
                                            pack(w_idx), self, lay)
        o = o.view(B, T, spec.heads_q, spec.dim_v).to(dtype)
        return (o, idx.view(B, T, spec.topk)) if return_indices else o

    def indexer_loss(self, q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor,
                     k_idx: torch.Tensor, w_idx: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """The indexer's training loss (summed over batch and tokens), differentiable to q_idx,
        k_idx and w_idx only (docs/algorithm.md section 8), from the generated kernels: the
        sparse stage over the forward's picks with its LSE, or (`dense=True`, the warm-up) over
        every earlier key with the dense attention's LSE."""
        spec = self.spec
        prob = check_dsa_inputs(spec, q, k, None, q_idx, k_idx, w_idx, values=False)
        if not kernels_available(q.device):
            fallback_notice(q.device)
            return reference.dsa_indexer_loss(q, k, q_idx, k_idx, w_idx, spec, dense=dense)
        check_fp8_keys_device(spec, q.device)
        dtype = q_idx.dtype
        q, k, _, q_idx, k_idx = _kernel_dtypes(q.detach(), k.detach(), None, q_idx, k_idx)
        lay = build_layout(spec, prob.seqlens, q.device)
        qp, kp, qi, ki, wi = pack(q), pack(k), pack(q_idx), pack(k_idx), pack(w_idx)
        with torch.no_grad(), direct_launches():
            if dense:
                idx = None
                lse = self.module.dense_lse(qp, kp, lay, configs=self.configs)
            else:
                # the attention's LSE does not depend on v: any value rows do (k's, if they fit)
                vp = (kp[..., :spec.dim_v] if spec.dim_v <= spec.dim_qk else
                      kp.new_zeros(kp.shape[0], spec.heads_kv, spec.dim_v))
                _, idx, lse = self.module.forward(qp, kp, vp, qi.detach(), ki.detach(),
                                                  wi.detach(), lay, configs=self.configs)
        with direct_launches():
            loss = _IndexerLoss.apply(qi, ki, wi, qp, kp, idx, lse, self, lay, dense)
        return loss.to(dtype)


def _kernel_dtypes(q, k, v, q_idx, k_idx):
    """The inputs as the kernels take them: float32 where the interpreter would compute
    bfloat16 wrongly, and the indexer's query and keys in one dtype (differentiable casts)."""
    if interpreted_in_float32(q):
        q, k = q.float(), k.float()
        v = None if v is None else v.float()
    if interpreted_in_float32(q_idx) or q_idx.dtype != k_idx.dtype:
        q_idx, k_idx = q_idx.float(), k_idx.float()
    return q, k, v, q_idx, k_idx


class _SparseAttention(torch.autograd.Function):
    """The generated forward on packed tensors, differentiable to q, k and v by the generated
    backward; v None means v = k[..., :Dv], read in place (its gradient lands in dk)."""

    @staticmethod
    def forward(ctx, q, k, v, q_idx, k_idx, w_idx, op, lay):
        dv = op.spec.dim_v
        o, idx, lse = op.module.forward(q, k, k[..., :dv] if v is None else v, q_idx, k_idx,
                                        w_idx, lay, configs=op.configs)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.op, ctx.lay = op, lay
        ctx.mark_non_differentiable(idx)
        return o, idx

    @staticmethod
    def backward(ctx, do, _didx):
        q, k, v, idx, o, lse = ctx.saved_tensors
        with direct_launches():
            dq, dk, dv = ctx.op.module.backward(do, q, k, v, idx, o, lse, ctx.lay,
                                                configs=ctx.op.configs)
        return (dq.to(q.dtype), dk.to(k.dtype), None if v is None else dv.to(v.dtype),
                None, None, None, None, None)


class _IndexerLoss(torch.autograd.Function):
    """The summed indexer loss (sparse stage, or the dense warm-up) from the generated kernels,
    differentiable to the packed q_idx, k_idx and w_idx."""

    @staticmethod
    def forward(ctx, q_idx, k_idx, w_idx, q, k, idx, lse, op, lay, dense):
        if idx is None:          # the dense stage reads no picks
            idx = torch.empty(q.shape[0], 1, dtype=torch.int32, device=q.device)
        loss, saved = op.module.indexer_loss(q, k, q_idx, k_idx, w_idx, idx, lse, lay,
                                             configs=op.configs, dense=dense)
        ctx.save_for_backward(q_idx, k_idx, w_idx, q, k, idx, lse, saved)
        ctx.op, ctx.lay, ctx.dense = op, lay, dense
        return loss.sum()

    @staticmethod
    def backward(ctx, g):
        q_idx, k_idx, w_idx, q, k, idx, lse, saved = ctx.saved_tensors
        dloss = g.float().expand(q.shape[0])
        with direct_launches():
            dqi, dki, dw = ctx.op.module.indexer_loss_backward(
                dloss, q, k, q_idx, k_idx, w_idx, idx, lse, saved, ctx.lay,
                configs=ctx.op.configs, dense=ctx.dense)
        return (dqi.to(q_idx.dtype), dki.to(k_idx.dtype), dw.to(w_idx.dtype),
                None, None, None, None, None, None, None)
