"""The op a model calls: validation, packing, dispatch to the generated kernels or the reference.

`nsagen.build(spec)` returns an :class:`NSAOp`. On CUDA tensors (or on the CPU with
TRITON_INTERPRET=1) it runs the generated module; otherwise it falls back to the reference and
says so once.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor  # noqa: F401  (resolves the op signatures' string annotations)

from . import configspace, reference, tables
from .cache import import_file, interpreting, load_module, plain_name
from .checks import check_inputs
from .codegen import module_name, render
from .configspace import ConfigOverrides
from .decode import DecodeCache
from .distributed import cp_attention
from .dsa_ops import DSAOp
from .dsa_spec import DSASpec
from .launch import (direct_launches, fallback_notice, interpreted_in_float32,
                     kernels_available, opaque_op, pack, tracing)
from .layout import build_layout, layout_of_call
from .paged import PagedSteps
from .paged_cache import PagedCache
from .resources import prebuilt_module
from .spec import Spec
from .target import Target, current
from .specfile import load_spec

log = logging.getLogger("nsagen")


class NSAOp:
    """Native Sparse Attention for one spec, backed by a generated, cached Triton module."""

    def __init__(self, spec: Spec, module: ModuleType, path: Path, target: Target):
        self.spec = spec
        self.module = module
        self.path = path
        self.target = target           # the hardware the module's default configs plan for
        self.name = module.URI
        self._defaults = {**getattr(module, "DECODE_CONFIGS", {}), **module.CONFIGS}
        self.configs = {}   # explicit per-kernel overrides (win over tuned tables)
        self.module_name = plain_name(module)
        self._tables: dict | None = None
        self._tables_loaded = False
        self.op_name = f"nsagen::{module.__name__}".replace("-", "_")
        # the registered op (what torch.compile traces and opcheck checks) and its eager twin
        self._train_op, self._eager_train = _register_training_op(self)
        self._paged: PagedSteps | None = None

    def __repr__(self) -> str:
        return f"NSAOp({self.spec.name!r}, module={self.path})"

    @property
    def configs(self) -> ConfigOverrides:
        """Explicit per-kernel launch configs, checked when set; they win over tuned tables."""
        return self._configs

    @configs.setter
    def configs(self, value: dict) -> None:
        self._configs = ConfigOverrides(self._defaults, value)

    @property
    def default_configs(self) -> dict[str, dict]:
        """Every kernel's default launch config (forward, backward and decode), by name."""
        return self._defaults

    @property
    def tuned_tables(self) -> dict | None:
        """The buckets of this GPU's tuned table in use (None: untuned, or not loaded yet)."""
        return self._tables

    def _table_entry_error(self, bucket: str, kernel: str, entry) -> str | None:
        """Why an entry of a tuned table cannot launch this module's kernels (None if it can)."""
        decode = bucket.startswith("decode ")
        if decode and kernel == tables.DECODE_SPLITS:
            return configspace.splits_error(self.spec, entry)
        defaults = getattr(self.module, "DECODE_CONFIGS", {}) if decode else self.module.CONFIGS
        if kernel not in defaults:
            return f"not a {'decode' if decode else 'forward or backward'} kernel of this module"
        return configspace.table_entry_error(self.spec, kernel, entry, defaults[kernel], decode)

    def configs_for(self, device: torch.device, seq_len: int) -> dict:
        """Launch configs for one call: the tuned table's bucket on a matching GPU, then the
        explicit overrides in `self.configs`; kernels missing from both use the IR defaults."""
        if device.type == "cuda" and not self._tables_loaded:
            self._tables = tables.load(self.module_name, tables.device_meta(device.index),
                                       check=self._table_entry_error)
            self._tables_loaded = True
            log.info("nsagen: %s runs %s", self.module_name,
                     "with a tuned table" if self._tables else "untuned (IR default configs)")
        if self._tables is None:
            return self.configs
        cfg = tables.configs_for(self._tables, seq_len)
        cfg.update(self.configs)
        return cfg

    def use_tuned_tables(self, enabled: bool = True) -> None:
        """Launch with this GPU's tuned table (the default) or, disabled, with the IR's default
        configs and split rule (e.g. to time tuned against untuned)."""
        self._tables, self._tables_loaded = None, not enabled

    def new_cache(self, batch: int, max_len: int, device=None, dtype: torch.dtype | None = None):
        """An empty decode cache (nsagen.decode.DecodeCache) for this op, in the spec's dtype
        unless `dtype` says otherwise."""
        return DecodeCache(self, batch, max_len, device, dtype)

    def new_paged_cache(self, num_pages: int, page_size: int, max_len: int, device=None,
                        dtype: torch.dtype | None = None) -> PagedCache:
        """Page pools shared by sequences that join, fork and leave between decode steps
        (nsagen.paged_cache.PagedCache), for users without a serving engine."""
        return PagedCache(self, num_pages, page_size, max_len, device, dtype)

    def append_paged(self, k_t, v_t, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table,
                     cmp_block_table, seq_lens, k_cmp_t=None, v_cmp_t=None) -> None:
        """Serving engines: write token seq_lens[b] - 1 of each sequence (k_t, v_t [B, H, D])
        into its page of the pools [num_pages, page_size, H, D] and emit the compressed token
        its length completes (seq_lens already counts the token). One launch, no host sync;
        see nsagen.paged and docs/serving.md."""
        self._paged_steps().append(k_t, v_t, k_pages, v_pages, k_cmp_pages, v_cmp_pages,
                                   block_table, cmp_block_table, seq_lens, k_cmp_t, v_cmp_t)

    def decode_paged(self, q, gates, k_pages, v_pages, k_cmp_pages, v_cmp_pages, block_table,
                     cmp_block_table, seq_lens, q_cmp=None) -> torch.Tensor:
        """Serving engines: o [B, HQ, Dv] of q [B, HQ, Dk] at position seq_lens[b] - 1 over the
        paged pools, equal to that row of the prefill. No host sync; see nsagen.paged."""
        return self._paged_steps().decode(q, gates, k_pages, v_pages, k_cmp_pages, v_cmp_pages,
                                          block_table, cmp_block_table, seq_lens, q_cmp)

    def _paged_steps(self) -> PagedSteps:
        if self._paged is None:
            self._paged = PagedSteps(self)
        return self._paged

    def __call__(self, q, k, v, gates=None, k_cmp=None, v_cmp=None, cu_seqlens=None,
                 return_indices=False, k_win=None, v_win=None, q_cmp=None, cu_seqlens_k=None,
                 cp_group=None, return_branches=False):
        """o [B, T, HQ, Dv] (and block indices [B, T, H, n] if return_indices); see docs/algorithm.md.
        `q_cmp` [B, T, HQ, Dk] (default q) is the query of the compressed branch and of the block
        scores, e.g. without the rotary embedding the other branches' q carries.
        `cu_seqlens_k` packs the keys (k, v, k_win, v_win, k_cmp, v_cmp) apart from the queries
        (`cu_seqlens`): each sequence's queries are then its last positions.
        `cp_group`: context parallelism over a torch.distributed group; every tensor is this
        rank's zig-zag share (nsagen.distributed.shard) and so is the output (docs/distributed.md).
        `return_branches`: also return the branches' outputs before gating, [3, B, T, HQ, Dv]
        (cmp, slc, win; constants for autograd), after the indices."""
        spec = self.spec
        if q_cmp is q:      # one query for every branch: today's op exactly
            q_cmp = None
        return_indices = return_indices or return_branches
        if cp_group is not None:
            if return_indices or cu_seqlens_k is not None:
                raise ValueError("cp_group: return_indices and cu_seqlens_k are not supported "
                                 "with context parallelism")
            return cp_attention(self, cp_group, q, k, v, gates, k_cmp, v_cmp, cu_seqlens,
                                k_win, v_win, q_cmp)
        prob = check_inputs(spec, q, k, v, gates, k_cmp, v_cmp, cu_seqlens, k_win, v_win, q_cmp,
                            cu_seqlens_k)
        if kernels_available(q.device) and interpreted_in_float32(q):
            out = self(q.float(), k.float(), v.float(), _float32(gates), _float32(k_cmp),
                       _float32(v_cmp), cu_seqlens, return_indices, _float32(k_win),
                       _float32(v_win), _float32(q_cmp), cu_seqlens_k,
                       return_branches=return_branches)
            if return_branches:
                return out[0].to(q.dtype), out[1], out[2].to(q.dtype)
            if return_indices:
                return out[0].to(q.dtype), out[1]
            return out.to(q.dtype)
        if not kernels_available(q.device):
            fallback_notice(q.device)
            return reference.nsa(q, k, v, gates, spec, k_cmp, v_cmp, cu_seqlens, return_indices,
                                 k_win=k_win, v_win=v_win, q_cmp=q_cmp, cu_seqlens_k=cu_seqlens_k,
                                 return_branches=return_branches)
        B, T = prob.batch, prob.seq_len
        if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad
                for t in (q, k, v, gates, k_cmp, v_cmp, k_win, v_win, q_cmp)):
            train = self._train_op if tracing() else self._eager_train
            o, idx, ob, *_ = train(q, k, v, gates, k_cmp, v_cmp, k_win, v_win, cu_seqlens, q_cmp,
                                   cu_seqlens_k, return_indices)
        else:
            lay = build_layout(spec, prob.seqlens, q.device, qlens=prob.qlens or None)
            with direct_launches():
                o, idx, saved = self.module.forward(
                    pack(q), pack(k), pack(v), pack(gates), pack(k_cmp), pack(v_cmp), lay,
                    pack(k_win), pack(v_win),
                    configs=self.configs_for(q.device, max(prob.seqlens)), q_cmp=pack(q_cmp),
                    save=return_branches, short=False if return_indices else None)
            ob = None if saved is None else saved["ob"]
            o = o.view(B, T, spec.heads_q, spec.dim_v)
        if not return_indices:
            return o
        if idx is None or idx.numel() == 0:
            idx = torch.full((B * T, spec.heads_kv, spec.slc_count), -1, dtype=torch.int32,
                             device=q.device)
        idx = idx.view(B, T, spec.heads_kv, spec.slc_count)
        if return_branches:
            ob = ob.detach().view(3, B, T, spec.heads_q, spec.dim_v).clone()
            for i, b in enumerate(("cmp", "slc", "win")):
                if not spec.has(b):   # never written by the kernels
                    ob[i].zero_()
            return o, idx, ob
        return o, idx


def _float32(t):
    return None if t is None else t.float()


def _register_training_op(nsa: NSAOp):
    """Register `nsagen::<module>_fwd` / `_bwd` as torch.library custom ops that
    torch.compile keeps whole (nsagen.launch.opaque_op), tied together by register_autograd.
    Returns the forward op and an `autograd.Function.apply` that runs the same two functions
    for eager calls."""
    spec, mod = nsa.spec, nsa.module

    def fwd(q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor], k_cmp: Optional[Tensor],
            v_cmp: Optional[Tensor], k_win: Optional[Tensor], v_win: Optional[Tensor],
            cu_seqlens: Optional[Tensor], q_cmp: Optional[Tensor] = None,
            cu_seqlens_k: Optional[Tensor] = None, need_indices: bool = False
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        B, T = q.shape[:2]
        lay = layout_of_call(spec, q, cu_seqlens, cu_seqlens_k)
        o, idx, saved = mod.forward(
            pack(q), pack(k), pack(v), pack(gates), pack(k_cmp), pack(v_cmp), lay,
            pack(k_win), pack(v_win), configs=nsa.configs_for(q.device, max(lay.seqlens)),
            save=True, q_cmp=pack(q_cmp), short=False if need_indices else None)
        # idx None: the short-length plan ran (no block choice); the backward follows it
        # compressed k/v computed here (mean) are outputs; the caller's own are never returned
        mine = k_cmp is None and saved["k_cmp"] is not None
        kc = saved["k_cmp"] if mine else q.new_empty(0)
        vc = saved["v_cmp"] if mine else q.new_empty(0)
        if idx is None:
            idx = torch.empty(0, dtype=torch.int32, device=q.device)
        return o.view(B, T, spec.heads_q, spec.dim_v), idx, saved["ob"], saved["lse"], kc, vc

    def bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor], idx: Tensor,
            ob: Tensor, lse: Tensor, kc: Tensor, vc: Tensor, k_win: Optional[Tensor],
            v_win: Optional[Tensor], cu_seqlens: Optional[Tensor], user_cmp: bool,
            q_cmp: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        B = q.shape[0]
        lay = layout_of_call(spec, q, cu_seqlens, cu_seqlens_k)
        # the caller's k_cmp/v_cmp are [B, Nc, H, D]; ones made by mean compression come packed
        # [Nc_total, H, D] (possibly with no rows); a 1-d placeholder means no compressed branch
        if user_cmp:
            kc, vc = pack(kc), pack(vc)
        pooled = not user_cmp and kc.dim() == 3   # made by mean compression in the forward
        saved = dict(ob=ob, lse=lse, k_cmp=kc if kc.dim() == 3 else None,
                     v_cmp=vc if vc.dim() == 3 else None, pooled=pooled)
        g = mod.backward(pack(do), pack(q), pack(k), pack(v), pack(gates),
                         idx if idx.numel() else None, saved, lay, pack(k_win), pack(v_win),
                         configs=nsa.configs_for(q.device, max(lay.seqlens)), q_cmp=pack(q_cmp))
        dk, dv = g["dk"], g["dv"]
        dk_cmp, dv_cmp = q.new_empty(0), q.new_empty(0)  # outputs may not alias each other
        if "dk_cmp" in g and user_cmp:   # (the kernels route pooled ones' gradient to k, v)
            dk_cmp = g["dk_cmp"].to(q.dtype).view(B, -1, *g["dk_cmp"].shape[1:])
            dv_cmp = g["dv_cmp"].to(q.dtype).view(B, -1, *g["dv_cmp"].shape[1:])

        def unpack(t):   # query rows and key rows may differ in number (cu_seqlens_k)
            return t.to(q.dtype).view(B, -1, *t.shape[1:])

        return (unpack(g["dq"]), unpack(dk), unpack(dv),
                unpack(g["dgates"]) if gates is not None else q.new_empty(0), dk_cmp, dv_cmp,
                unpack(g["dk_win"]) if "dk_win" in g else q.new_empty(0),
                unpack(g["dv_win"]) if "dv_win" in g else q.new_empty(0),
                unpack(g["dq_cmp"]) if "dq_cmp" in g else q.new_empty(0))

    fwd_op = opaque_op(nsa.op_name + "_fwd", fwd)
    bwd_op = opaque_op(nsa.op_name + "_bwd", bwd)

    def setup_context(ctx, inputs, output):
        q, k, v, gates, k_cmp, v_cmp, k_win, v_win, cu, q_cmp, cu_k, _ = inputs
        _, idx, ob, lse, kc, vc = output
        user_cmp = k_cmp is not None
        # only o has a gradient: the other outputs' (ob alone is 3x o) are never made as zeros
        ctx.set_materialize_grads(False)
        ctx.user_cmp, ctx.has_gates = user_cmp, gates is not None
        ctx.has_win, ctx.has_qc = k_win is not None, q_cmp is not None
        ctx.save_for_backward(q, k, v, gates, idx, ob, lse, k_cmp if user_cmp else kc,
                              v_cmp if user_cmp else vc, k_win, v_win, cu, q_cmp, cu_k)

    def backward(ctx, do, *_):
        if do is None:          # o took no part in the loss
            return (None,) * 12
        q, k, v, gates, idx, ob, lse, kc, vc, k_win, v_win, cu, q_cmp, cu_k = ctx.saved_tensors
        args = (do.contiguous(), q, k, v, gates, idx, ob, lse, kc, vc, k_win, v_win, cu,
                ctx.user_cmp, q_cmp, cu_k)
        if tracing():          # torch.compile records the registered backward op
            grads = bwd_op(*args)
        else:
            with direct_launches():
                grads = bwd(*args)
        dq, dk, dv, dg, dkc, dvc, dkw, dvw, dqc = grads
        if ctx.has_qc and dqc.numel() == 0:   # no compressed output: q_cmp only picks blocks
            dqc = torch.zeros_like(q_cmp)
        if ctx.user_cmp and dkc.shape != kc.shape:   # likewise a learned k_cmp, v_cmp
            dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
        return (dq, dk, dv, dg if ctx.has_gates else None, dkc if ctx.user_cmp else None,
                dvc if ctx.user_cmp else None, dkw if ctx.has_win else None,
                dvw if ctx.has_win else None, None, dqc if ctx.has_qc else None, None, None)

    fwd_op.register_autograd(backward, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        """The same forward and backward without torch.library's dispatch, for eager calls:
        at short lengths a step is host-bound, and the op's dispatch layers (schema defaults,
        aliasing checks, redispatch) cost about as much host time as the kernels' launches."""

        @staticmethod
        def forward(ctx, *inputs):
            with direct_launches():
                out = fwd(*inputs)
            setup_context(ctx, inputs, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return fwd_op, Eager.apply


_BUILT: dict[tuple[str, bool], NSAOp | DSAOp] = {}


def build(spec: Spec | DSASpec | str | os.PathLike,
          target: Target | None = None) -> NSAOp | DSAOp:
    """Generate (or reuse from the cache) the module for a spec, planned for `target` (default:
    the GPU at hand, else the default preset), import it, return the op (an NSAOp, or a DSAOp
    for an `attention: dsa` spec)."""
    if isinstance(spec, (str, os.PathLike)):
        spec = load_spec(spec)
    if not hasattr(spec, "check_kernels"):
        raise TypeError(f"build: expected a Spec, a spec file or a shipped spec's name, got "
                        f"{type(spec).__name__}")
    spec.check_kernels()
    target = target or current()
    name = module_name(spec, target=target)
    key = (name, interpreting())        # the interpreter's kernels are a module of their own
    if key not in _BUILT:
        source = render(spec, target=target)
        shipped = prebuilt_module(source)
        if shipped is not None:
            mod, path = import_file(name, shipped), shipped
            log.info("nsagen: loaded %s (shipped, %s)", name, path)
        else:
            mod, path, reused = load_module(name, source)
            log.info("nsagen: %s %s (%s)", "loaded" if reused else "built", name, path)
        _BUILT[key] = (DSAOp if spec.family == "dsa" else NSAOp)(spec, mod, path, target)
    return _BUILT[key]
