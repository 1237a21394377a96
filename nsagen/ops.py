"""The op a model calls: validation, packing, dispatch to the generated kernels or the reference.

`nsagen.build(spec)` returns an :class:`NSAOp`. On CUDA tensors (or on the CPU with
TRITON_INTERPRET=1) it runs the generated module; otherwise it falls back to the reference and
says so once.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

from . import reference
from .cache import load_module
from .checks import check_inputs
from .codegen import module_name, render
from .ir import lower
from .layout import build_layout
from .spec import Spec, load_spec

log = logging.getLogger("nsagen")
_warned_fallback = False


def kernels_available(device: torch.device) -> bool:
    """Whether generated kernels can run on tensors of this device."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class NSAOp:
    """Native Sparse Attention for one spec, backed by a generated, cached Triton module."""

    def __init__(self, spec: Spec, module: ModuleType, path: Path):
        self.spec = spec
        self.module = module
        self.path = path
        self.name = module.URI
        self.configs: dict = {}

    def __repr__(self) -> str:
        return f"NSAOp({self.spec.name!r}, module={self.path})"

    def __call__(self, q, k, v, gates=None, k_cmp=None, v_cmp=None, cu_seqlens=None,
                 return_indices=False, k_win=None, v_win=None):
        """o [B, T, HQ, Dv] (and block indices [B, T, H, n] if return_indices); see ALGORITHM.md."""
        spec = self.spec
        prob = check_inputs(spec, q, k, v, gates, k_cmp, v_cmp, cu_seqlens, k_win, v_win)
        if not kernels_available(q.device):
            _fallback_notice(q.device)
            return reference.nsa(q, k, v, gates, spec, k_cmp, v_cmp, cu_seqlens, return_indices,
                                 k_win=k_win, v_win=v_win)
        B, T = prob.batch, prob.seq_len
        lay = build_layout(spec, prob.seqlens, q.device)
        if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (q, k, v, gates, k_cmp, v_cmp, k_win, v_win)):
            o, idx = _NSAFunction.apply(self, lay, q, k, v, gates, k_cmp, v_cmp, k_win, v_win)
        else:
            o, idx, _ = self.module.forward(
                _pack(q), _pack(k), _pack(v), _pack(gates), _pack(k_cmp), _pack(v_cmp), lay,
                _pack(k_win), _pack(v_win), configs=self.configs)
            o = o.view(B, T, spec.heads_q, spec.dim_v)
        if not return_indices:
            return o
        if idx is None or idx.numel() == 0:
            idx = torch.full((B * T, spec.heads_kv, spec.slc_count), -1, dtype=torch.int32,
                             device=q.device)
        return o, idx.view(B, T, spec.heads_kv, spec.slc_count)


def _pack(t):
    """[B, T, ...] -> [B*T, ...] contiguous (a view when already contiguous)."""
    return None if t is None else t.reshape(-1, *t.shape[2:]).contiguous()


def mean_compress_backward(dk_cmp: torch.Tensor, lay, spec: Spec, n_tok: int) -> torch.Tensor:
    """Gradient of mean pooling: every token of window i receives dk_cmp[i] / l."""
    out = torch.zeros(n_tok, *dk_cmp.shape[1:], dtype=dk_cmp.dtype, device=dk_cmp.device)
    if dk_cmp.shape[0]:
        src = lay.cmp_src.long()
        part = dk_cmp / spec.cmp_block
        for r in range(spec.cmp_block):
            out.index_add_(0, src + r, part)
    return out


class _NSAFunction(torch.autograd.Function):
    """Forward with saved branch outputs/LSEs; backward through the generated kernels."""

    @staticmethod
    def forward(ctx, op, lay, q, k, v, gates, k_cmp, v_cmp, k_win, v_win):
        spec = op.spec
        B, T = q.shape[:2]
        packed = [_pack(t) for t in (q, k, v, gates, k_cmp, v_cmp, k_win, v_win)]
        o, idx, saved = op.module.forward(*packed[:6], lay, packed[6], packed[7],
                                          configs=op.configs, save=True)
        if idx is None:
            idx = torch.empty(0, dtype=torch.int32, device=q.device)
        ctx.op, ctx.lay, ctx.shape = op, lay, (B, T)
        ctx.user_cmp = k_cmp is not None
        ctx.has_gates = gates is not None
        ctx.save_for_backward(*packed[:5], packed[6], packed[7], idx, saved["ob"], saved["lse"],
                              saved["k_cmp"], saved["v_cmp"])
        ctx.mark_non_differentiable(idx)
        return o.view(B, T, spec.heads_q, spec.dim_v), idx

    @staticmethod
    def backward(ctx, do, _didx):
        op, lay, (B, T) = ctx.op, ctx.lay, ctx.shape
        spec = op.spec
        q, k, v, gates, _kc_user, kw, vw, idx, ob, lse, kc, vc = ctx.saved_tensors
        saved = dict(ob=ob, lse=lse, k_cmp=kc, v_cmp=vc)
        g = op.module.backward(_pack(do), q, k, v, gates if ctx.has_gates else None,
                               idx if idx.numel() else None, saved, lay, kw, vw,
                               configs=op.configs)
        dk, dv = g["dk"], g["dv"]
        dk_cmp = dv_cmp = None
        if "dk_cmp" in g:
            if ctx.user_cmp:
                dk_cmp, dv_cmp = g["dk_cmp"], g["dv_cmp"]
            else:  # mean compression happened inside the op: route its gradient to k, v
                dk = dk + mean_compress_backward(g["dk_cmp"], lay, spec, dk.shape[0])
                dv = dv + mean_compress_backward(g["dv_cmp"], lay, spec, dv.shape[0])

        def unpack(t, like):
            return None if t is None else t.to(like.dtype).view(B, -1, *t.shape[1:])

        return (None, None, unpack(g["dq"], q), unpack(dk, k), unpack(dv, v),
                unpack(g["dgates"], q) if ctx.has_gates else None,
                unpack(dk_cmp, q), unpack(dv_cmp, q),
                unpack(g.get("dk_win"), q), unpack(g.get("dv_win"), q))


def _fallback_notice(device: torch.device) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        msg = (f"nsagen: no GPU for tensors on {device} and TRITON_INTERPRET is not 1; "
               "running the PyTorch reference instead of the generated kernels")
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


_BUILT: dict[str, NSAOp] = {}


def build(spec: Spec | str | os.PathLike) -> NSAOp:
    """Generate (or reuse from the cache) the module for a spec, import it, return the op."""
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    name = module_name(spec)
    if name not in _BUILT:
        plan = lower(spec)
        mod, path, reused = load_module(name, render(spec, plan))
        log.info("nsagen: %s %s (%s)", "loaded" if reused else "built", name, path)
        _BUILT[name] = NSAOp(spec, mod, path)
    return _BUILT[name]
