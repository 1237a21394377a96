"""The DSA op a model calls: validation, packing, dispatch to the generated kernels or the
reference (docs/algorithm.md section 8).

`nsagen.build(spec)` returns a :class:`DSAOp` for an `attention: dsa` spec. It runs the
generated indexer, top-k and sparse-attention kernels on CUDA tensors (or on the CPU with
TRITON_INTERPRET=1), and the reference otherwise; autograd reaches q, k and v through the
generated backward (the selection is not differentiated). `indexer_loss` runs the generated
loss kernels (sparse stage, or the dense warm-up), differentiable to the indexer's inputs.
`new_cache` gives a decode cache whose steps run the same kernels.

The training paths are torch.library ops (`nsagen::<module>_fwd`, `_bwd`, `_loss`, `_loss_bwd`)
tied together by register_autograd, which `torch.compile(fullgraph=True)` keeps whole
(nsagen.launch.opaque_op); calls without gradients launch directly.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor  # noqa: F401  (resolves the op signatures' string annotations)

from . import configspace, reference, tables
from .checks import check_dsa_inputs, check_fp8_keys_device
from .dsa_decode import DSACache
from .dsa_spec import DSASpec
from .cache import plain_name
from .launch import (direct_launches, fallback_notice, interpreted_in_float32,
                     kernels_available, opaque_op, pack)
from .layout import build_layout, layout_of_call
from .target import Target


class DSAOp:
    """DeepSeek Sparse Attention for one spec, backed by a generated, cached Triton module."""

    def __init__(self, spec: DSASpec, module: ModuleType, path: Path, target: Target):
        self.spec = spec
        self.module = module
        self.path = path
        self.target = target
        self.name = module.URI
        self.module_name = plain_name(module)
        self.configs: dict[str, dict] = {}     # explicit per-kernel launch configs
        self._tables: dict | None = None
        self._tables_loaded = False
        self.op_name = f"nsagen::{module.__name__}".replace("-", "_")
        self._train_op, self._loss_op = _register_ops(self)

    def __repr__(self) -> str:
        return f"DSAOp({self.spec.name!r}, module={self.path})"

    @property
    def tuned_tables(self) -> dict | None:
        """The buckets of this GPU's tuned table in use (None: untuned, or not loaded yet)."""
        return self._tables

    def use_tuned_tables(self, enabled: bool = True) -> None:
        """Launch with this GPU's tuned table (the default) or, disabled, with the IR's default
        configs."""
        self._tables, self._tables_loaded = None, not enabled

    def configs_for(self, device: torch.device, seq_len: int) -> dict:
        """Launch configs for one call: the tuned table's bucket on a matching GPU, then the
        explicit overrides in `self.configs`; kernels missing from both use the IR defaults."""
        if device.type == "cuda" and not self._tables_loaded:
            self._tables = tables.load(self.module_name, tables.device_meta(device.index),
                                       check=self._table_entry_error)
            self._tables_loaded = True
        if self._tables is None:
            return self.configs
        cfg = tables.configs_for(self._tables, seq_len)
        cfg.update(self.configs)
        return cfg

    def _table_entry_error(self, bucket: str, kernel: str, entry) -> str | None:
        """Why an entry of a tuned table cannot launch this module's kernels (None if it can)."""
        defaults = self.module.CONFIGS
        if bucket.startswith("decode ") or kernel not in defaults:
            return "not a kernel of this module"
        return configspace.table_entry_error(self.spec, kernel, entry, defaults[kernel], False)

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
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v)):
            o, idx, _ = self._train_op(q, k, v, q_idx.detach(), k_idx.detach(), w_idx.detach(),
                                       cu_seqlens)
        else:
            lay = build_layout(spec, prob.seqlens, q.device)
            with direct_launches():
                o, idx, _ = self.module.forward(
                    pack(q), pack(k), None if v is None else pack(v), pack(q_idx), pack(k_idx),
                    pack(w_idx), lay, configs=self.configs_for(q.device, max(prob.seqlens)))
            o, idx = o.view(B, T, spec.heads_q, spec.dim_v), idx.view(B, T, spec.topk)
        o = o.to(dtype)
        return (o, idx) if return_indices else o

    def indexer_loss(self, q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor,
                     k_idx: torch.Tensor, w_idx: torch.Tensor, dense: bool = False,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """The indexer's training loss (summed over batch and tokens), differentiable to q_idx,
        k_idx and w_idx only (docs/algorithm.md section 8), from the generated kernels: the
        sparse stage over the forward's picks with its LSE, or (`dense=True`, the warm-up) over
        every earlier key with the dense attention's LSE."""
        spec = self.spec
        prob = check_dsa_inputs(spec, q, k, None, q_idx, k_idx, w_idx, cu_seqlens, values=False)
        if not kernels_available(q.device):
            fallback_notice(q.device)
            if cu_seqlens is None:
                return reference.dsa_indexer_loss(q, k, q_idx, k_idx, w_idx, spec, dense=dense)
            return sum(reference.dsa_indexer_loss(*(t[:, a:a + n] for t in
                                                    (q, k, q_idx, k_idx, w_idx)), spec, dense=dense)
                       for a, n in zip(cu_seqlens.tolist(), prob.seqlens))
        check_fp8_keys_device(spec, q.device)
        dtype = q_idx.dtype
        q, k, _, q_idx, k_idx = _kernel_dtypes(q.detach(), k.detach(), None, q_idx, k_idx)
        loss = self._loss_op(q, k, q_idx, k_idx, w_idx, cu_seqlens, dense)[0]
        return loss.sum().to(dtype)


def _kernel_dtypes(q, k, v, q_idx, k_idx):
    """The inputs as the kernels take them: float32 where the interpreter would compute
    bfloat16 wrongly, and the indexer's query and keys in one dtype (differentiable casts)."""
    if interpreted_in_float32(q):
        q, k = q.float(), k.float()
        v = None if v is None else v.float()
    if interpreted_in_float32(q_idx) or q_idx.dtype != k_idx.dtype:
        q_idx, k_idx = q_idx.float(), k_idx.float()
    return q, k, v, q_idx, k_idx


def _register_ops(op: DSAOp):
    """Register the sparse attention (`_fwd` / `_bwd`) and the indexer loss (`_loss` /
    `_loss_bwd`) of one module as torch.library triton ops with their autograd formulas: the
    attention differentiable to q, k and v, the loss to q_idx, k_idx and w_idx."""
    spec, mod = op.spec, op.module
    HQ, DV, TOPK = spec.heads_q, spec.dim_v, spec.topk

    def fwd(q: Tensor, k: Tensor, v: Optional[Tensor], q_idx: Tensor, k_idx: Tensor,
            w_idx: Tensor, cu_seqlens: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        B, T = q.shape[:2]
        lay = layout_of_call(spec, q, cu_seqlens)
        o, idx, lse = mod.forward(pack(q), pack(k), None if v is None else pack(v), pack(q_idx),
                                  pack(k_idx), pack(w_idx), lay,
                                  configs=op.configs_for(q.device, max(lay.seqlens)))
        return o.view(B, T, HQ, DV), idx.view(B, T, TOPK), lse

    def bwd(do: Tensor, q: Tensor, k: Tensor, v: Optional[Tensor], idx: Tensor, o: Tensor,
            lse: Tensor, cu_seqlens: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        B, T = q.shape[:2]
        lay = layout_of_call(spec, q, cu_seqlens)
        dq, dk, dv = mod.backward(pack(do), pack(q), pack(k), None if v is None else pack(v),
                                  idx.view(B * T, TOPK), pack(o), lse, lay,
                                  configs=op.configs_for(q.device, max(lay.seqlens)))
        dv = q.new_empty(0) if dv is None else dv.to(v.dtype).view(B, T, *dv.shape[1:])
        return (dq.to(q.dtype).view(B, T, *dq.shape[1:]),
                dk.to(k.dtype).view(B, T, *dk.shape[1:]), dv)

    def loss(q: Tensor, k: Tensor, q_idx: Tensor, k_idx: Tensor, w_idx: Tensor,
             cu_seqlens: Optional[Tensor], dense: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lay = layout_of_call(spec, q, cu_seqlens)
        cfg = op.configs_for(q.device, max(lay.seqlens))
        qp, kp, qi, ki, wi = pack(q), pack(k), pack(q_idx), pack(k_idx), pack(w_idx)
        if dense:                     # the warm-up reads no picks: a placeholder column
            idx = torch.empty(qp.shape[0], 1, dtype=torch.int32, device=q.device)
            lse = mod.dense_lse(qp, kp, lay, configs=cfg)
        else:
            # the attention's LSE does not depend on v: k's first columns stand in when they fit
            vp = None if DV <= spec.dim_qk else kp.new_zeros(kp.shape[0], spec.heads_kv, DV)
            _, idx, lse = mod.forward(qp, kp, vp, qi, ki, wi, lay, configs=cfg)
        per_token, saved = mod.indexer_loss(qp, kp, qi, ki, wi, idx, lse, lay, configs=cfg,
                                            dense=dense)
        return per_token, idx, lse, saved

    def loss_bwd(dloss: Tensor, q: Tensor, k: Tensor, q_idx: Tensor, k_idx: Tensor,
                 w_idx: Tensor, idx: Tensor, lse: Tensor, saved: Tensor,
                 cu_seqlens: Optional[Tensor], dense: bool) -> tuple[Tensor, Tensor, Tensor]:
        lay = layout_of_call(spec, q, cu_seqlens)
        dqi, dki, dw = mod.indexer_loss_backward(
            dloss, pack(q), pack(k), pack(q_idx), pack(k_idx), pack(w_idx), idx, lse, saved, lay,
            configs=op.configs_for(q.device, max(lay.seqlens)), dense=dense)
        return (dqi.to(q_idx.dtype).view(q_idx.shape), dki.to(k_idx.dtype).view(k_idx.shape),
                dw.to(w_idx.dtype).view(w_idx.shape))

    fwd_op = opaque_op(op.op_name + "_fwd", fwd)
    bwd_op = opaque_op(op.op_name + "_bwd", bwd)
    loss_op = opaque_op(op.op_name + "_loss", loss)
    loss_bwd_op = opaque_op(op.op_name + "_loss_bwd", loss_bwd)

    def setup_fwd(ctx, inputs, output):
        q, k, v, _, _, _, cu = inputs
        o, idx, lse = output
        ctx.has_v = v is not None
        ctx.save_for_backward(q, k, v, idx, o, lse, cu)

    def backward_fwd(ctx, do, _didx, _dlse):
        q, k, v, idx, o, lse, cu = ctx.saved_tensors
        dq, dk, dv = bwd_op(do.contiguous(), q, k, v, idx, o, lse, cu)
        return dq, dk, dv if ctx.has_v else None, None, None, None, None

    def setup_loss(ctx, inputs, output):
        q, k, q_idx, k_idx, w_idx, cu, dense = inputs
        _, idx, lse, saved = output
        ctx.dense = dense
        ctx.save_for_backward(q, k, q_idx, k_idx, w_idx, idx, lse, saved, cu)

    def backward_loss(ctx, dloss, _didx, _dlse, _dsaved):
        q, k, q_idx, k_idx, w_idx, idx, lse, saved, cu = ctx.saved_tensors
        dqi, dki, dw = loss_bwd_op(dloss.float().contiguous(), q, k, q_idx, k_idx, w_idx, idx,
                                   lse, saved, cu, ctx.dense)
        return None, None, dqi, dki, dw, None, None

    fwd_op.register_autograd(backward_fwd, setup_context=setup_fwd)
    loss_op.register_autograd(backward_loss, setup_context=setup_loss)
    return fwd_op, loss_op
