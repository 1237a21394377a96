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
        if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (q, k, v, gates, k_cmp, v_cmp, k_win, v_win)):
            raise NotImplementedError(
                f"{self.name}: backward kernels are not generated yet; call under torch.no_grad() "
                "or use nsagen.reference.nsa for gradients")
        B, T = prob.batch, prob.seq_len
        lay = build_layout(spec, prob.seqlens, q.device)

        def pack(t):
            return None if t is None else t.reshape(-1, *t.shape[2:]).contiguous()

        o, idx, _ = self.module.forward(
            pack(q), pack(k), pack(v), pack(gates), pack(k_cmp), pack(v_cmp), lay,
            pack(k_win), pack(v_win), configs=self.configs)
        o = o.view(B, T, spec.heads_q, spec.dim_v)
        if not return_indices:
            return o
        if idx is None:
            idx = torch.full((B * T, spec.heads_kv, spec.slc_count), -1, dtype=torch.int32,
                             device=q.device)
        return o, idx.view(B, T, spec.heads_kv, spec.slc_count)


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
