"""Decoding: a KV cache with an incremental compressed cache, and one-token steps.

A step runs the module's decode kernels (flash-decoding style: the keys each sequence reads are
split across programs, partials merged at the end; see nsagen.ir.passes.lower_decode). Nothing
in `append` or `step` reads device values on the host, so a step can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import configspace, occupancy, reference, tables
from .configspace import ConfigOverrides
from .ir.passes import decode_splits
from .launch import direct_launches, interpreted_in_float32, kernels_available
from .target import current

if TYPE_CHECKING:   # the op owns its caches (NSAOp.new_cache): a name for the annotations only
    from .ops import NSAOp

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _expect(name: str, t, shape: tuple, meaning: str, dtype: torch.dtype,
            device: torch.device) -> None:
    """Refuse a tensor whose type, shape, dtype or device does not fit the cache."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {meaning}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {meaning} = {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the cache's), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the cache is on {device}")


class DecodeCache:
    """Raw and compressed K/V of a batch of sequences of different lengths, grown token by token.

    The compressed cache gains token i of a sequence exactly when its length reaches
    i*d + l (docs/algorithm.md section 6). With mean compression the cache computes it; with learned
    compression the caller passes the new compressed k/v to `append` (see `emits`).
    """

    def __init__(self, op: NSAOp, batch: int, max_len: int, device=None,
                 dtype: torch.dtype | None = None, splits: dict[str, int] | None = None,
                 configs: dict[str, dict] | None = None):
        """`splits` overrides entries of the IR's split choice (nsagen.ir.passes.decode_splits)
        and `configs` the decode kernels' launch configs (both e.g. to force several small
        chunks and tiles on small shapes). Without either, a tuned table matching this GPU
        supplies both for the batch and capacity bucket (read once, here), under the op's own
        overrides; otherwise the IR's rule and default configs apply."""
        spec = op.spec
        for name, val in (("batch", batch), ("max_len", max_len)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive integer, got {str(val)[:40]}")
        dtype = _DTYPES[spec.dtype] if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {str(dtype)[:40]}")
        if splits is not None:
            why = configspace.splits_error(spec, splits)
            if why:
                raise ValueError(f"splits: {why}")
        if configs is not None:
            configs = ConfigOverrides(op.default_configs, configs)
        self.op, self.spec = op, spec
        self.batch, self.max_len = batch, max_len
        dev = torch.device(device) if device is not None else torch.device("cpu")
        H, Dk, Dv = spec.heads_kv, spec.dim_qk, spec.dim_v
        self.k = torch.zeros(batch, max_len, H, Dk, dtype=dtype, device=dev)
        self.v = torch.zeros(batch, max_len, H, Dv, dtype=dtype, device=dev)
        nc = max(1, spec.num_cmp(max_len))
        self.k_cmp = torch.zeros(batch, nc, H, Dk, dtype=dtype, device=dev)
        self.v_cmp = torch.zeros(batch, nc, H, Dv, dtype=dtype, device=dev)
        self.separate = spec.kv_per_branch == "separate" and spec.has("win")
        if self.separate:
            self.k_win = torch.zeros_like(self.k)
            self.v_win = torch.zeros_like(self.v)
        self.lens = torch.zeros(batch, dtype=torch.int32, device=dev)
        self._longest = 0  # host-side bound on the lengths, for capacity checks without a sync
        target = current(dev if dev.type == "cuda" else None)
        tuned_cfg, tuned_splits = {}, {}
        if splits is None and configs is None:
            if dev.type == "cuda":
                op.configs_for(dev, max_len)   # loads the op's tuned table once
            tuned_cfg, tuned_splits = tables.decode_configs_for(op.tuned_tables, batch, max_len)
        self.configs = configs
        self._tuned = tuned_cfg
        self.splits = decode_splits(spec, batch, max_len, target)
        self._work, probed = None, None
        self._multi: dict = {}   # S -> (splits, workspace, page table) of S-token steps
        if dev.type == "cuda" and not tuned_splits and not splits:
            # count waves with what the compiled kernels leave room for on an SM
            self._work = op.module.decode_workspace(batch, max_len, self.splits, dev)
            q = torch.empty(batch, spec.heads_q, Dk, dtype=dtype, device=dev)
            gates = torch.empty(batch, spec.heads_q, 3, dtype=dtype, device=dev)
            resident = occupancy.decode_residency(lambda: self.step(q, gates), target)
            probed = dict(self.splits)
            self.splits = decode_splits(spec, batch, max_len, target, resident)
        self.splits.update(tuned_splits)
        self.splits.update(splits or {})
        why = configspace.decode_tile_error(spec, dict(op.default_configs,
                                                       **self._launch_configs()), self.splits)
        if why:
            raise ValueError(f"configs: {why}")
        # split partials live here for the cache's lifetime: a step allocates only its outputs
        # (the probe's workspace is kept when the occupancy left the splits as they were)
        if self.splits != probed and kernels_available(dev):
            self._work = op.module.decode_workspace(batch, max_len, self.splits, dev)

    # ------------------------------------------------------------------ filling
    def prefill(self, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None = None,
                k_cmp: torch.Tensor | None = None, v_cmp: torch.Tensor | None = None,
                k_win: torch.Tensor | None = None, v_win: torch.Tensor | None = None) -> None:
        """Fill the cache from prompts k, v [B, T, H, D]; `seqlens` [B] gives each row's length
        (0 <= seqlens <= T, default T). Learned compression: k_cmp, v_cmp [B, Nc(T), H, D] for
        the prompts. Every argument is checked before anything is written."""
        spec = self.spec
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError(f"k: expected a 4-d tensor [B, T, H, Dk], got "
                             f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
        T = k.shape[1]
        if not 1 <= T <= self.max_len:
            raise ValueError(f"k: expected 1 <= T <= max_len={self.max_len} prompt tokens, got T={T}")
        B, H, dt, dev = self.batch, spec.heads_kv, self.k.dtype, self.k.device
        _expect("k", k, (B, T, H, spec.dim_qk), "[B, T, H, Dk]", dt, dev)
        _expect("v", v, (B, T, H, spec.dim_v), "[B, T, H, Dv]", dt, dev)
        if self.separate:
            if k_win is None or v_win is None:
                raise ValueError("k_win, v_win: required because the spec has kv_per_branch: separate")
            _expect("k_win", k_win, (B, T, H, spec.dim_qk), "[B, T, H, Dk]", dt, dev)
            _expect("v_win", v_win, (B, T, H, spec.dim_v), "[B, T, H, Dv]", dt, dev)
        elif k_win is not None or v_win is not None:
            raise ValueError("k_win, v_win: only accepted when the spec has kv_per_branch: separate")
        nc = spec.num_cmp(T)
        if (k_cmp is None) != (v_cmp is None):
            raise ValueError("k_cmp, v_cmp: pass both or neither")
        if spec.learned_compression and spec.reads_cmp and nc and k_cmp is None:
            raise ValueError("k_cmp, v_cmp: required for a learned compression spec")
        given_cmp = nc and k_cmp is not None   # mean specs: the caller's (un-rotated keys')
        if given_cmp:
            _expect("k_cmp", k_cmp, (B, nc, H, spec.dim_qk), "[B, Nc(T), H, Dk]", dt, dev)
            _expect("v_cmp", v_cmp, (B, nc, H, spec.dim_v), "[B, Nc(T), H, Dv]", dt, dev)
        if seqlens is not None:
            if not isinstance(seqlens, torch.Tensor) or seqlens.dtype.is_floating_point \
                    or seqlens.dtype == torch.bool or tuple(seqlens.shape) != (B,):
                raise ValueError(f"seqlens: expected an integer tensor of shape ({B},), got "
                                 f"{_describe(seqlens)}")
            lens = seqlens.tolist()
            bad = [n for n in lens if not 0 <= n <= T]
            if bad:
                raise ValueError(f"seqlens: every length must be in 0..T={T} (the prompt's "
                                 f"length), got {str(bad[:4])[:60]}")
        # everything is checked: write
        self.k[:, :T] = k
        self.v[:, :T] = v
        if self.separate:
            self.k_win[:, :T] = k_win
            self.v_win[:, :T] = v_win
        if given_cmp:
            self.k_cmp[:, :nc] = k_cmp
            self.v_cmp[:, :nc] = v_cmp
        elif nc:
            self.k_cmp[:, :nc] = reference.mean_compress(k, spec)
            self.v_cmp[:, :nc] = reference.mean_compress(v, spec)
        if seqlens is None:
            self.lens.fill_(T)
        else:
            self.lens.copy_(seqlens.to(self.lens))
        self._longest = T

    def emits(self) -> torch.Tensor:
        """[B] bool: which rows gain a compressed token at the next append."""
        n = self.lens + 1
        return (n >= self.spec.cmp_block) & ((n - self.spec.cmp_block) % self.spec.cmp_stride == 0)

    def append(self, k_t: torch.Tensor, v_t: torch.Tensor, k_cmp_t: torch.Tensor | None = None,
               v_cmp_t: torch.Tensor | None = None, k_win_t: torch.Tensor | None = None,
               v_win_t: torch.Tensor | None = None) -> None:
        """Append one token per row: k_t, v_t [B, H, D]. With learned compression, k_cmp_t,
        v_cmp_t [B, H, D] hold the new compressed token for the rows that `emits()` (others are
        ignored); a mean spec may pass them too (its own mean, e.g. of un-rotated keys) instead
        of the cache's mean of the keys it holds. Every argument is checked before anything is
        written."""
        self._check_token(k_t, v_t, k_cmp_t, v_cmp_t, k_win_t, v_win_t)
        self._append(k_t, v_t, k_cmp_t, v_cmp_t, k_win_t, v_win_t)

    def _check_token(self, k_t, v_t, k_cmp_t, v_cmp_t, k_win_t, v_win_t) -> None:
        spec = self.spec
        if self._longest + 1 > self.max_len:
            raise ValueError(f"cache full: max_len={self.max_len}")
        B, H, dt, dev = self.batch, spec.heads_kv, self.k.dtype, self.k.device
        _expect("k_t", k_t, (B, H, spec.dim_qk), "[B, H, Dk]", dt, dev)
        _expect("v_t", v_t, (B, H, spec.dim_v), "[B, H, Dv]", dt, dev)
        if self.separate:
            if k_win_t is None or v_win_t is None:
                raise ValueError("k_win_t, v_win_t: required because the spec has "
                                 "kv_per_branch: separate")
            _expect("k_win_t", k_win_t, (B, H, spec.dim_qk), "[B, H, Dk]", dt, dev)
            _expect("v_win_t", v_win_t, (B, H, spec.dim_v), "[B, H, Dv]", dt, dev)
        elif k_win_t is not None or v_win_t is not None:
            raise ValueError("k_win_t, v_win_t: only accepted when the spec has "
                             "kv_per_branch: separate")
        if (k_cmp_t is None) != (v_cmp_t is None):
            raise ValueError("k_cmp_t, v_cmp_t: pass both or neither")
        if spec.learned_compression and spec.reads_cmp and k_cmp_t is None:
            raise ValueError("k_cmp_t, v_cmp_t: required for a learned compression spec")
        if k_cmp_t is not None:   # mean specs: the caller's mean (e.g. of un-rotated keys)
            _expect("k_cmp_t", k_cmp_t, (B, H, spec.dim_qk), "[B, H, Dk]", dt, dev)
            _expect("v_cmp_t", v_cmp_t, (B, H, spec.dim_v), "[B, H, Dv]", dt, dev)

    def _append(self, k_t, v_t, k_cmp_t, v_cmp_t, k_win_t, v_win_t) -> None:
        spec = self.spec
        if kernels_available(self.k.device) and not interpreted_in_float32(self.k):
            uses_cmp = spec.has("cmp") or spec.has("slc")
            with direct_launches():
                self.op.module.launch_decode_append(
                    k_t, v_t, self.k, self.v, self.k_cmp if uses_cmp else None,
                    self.v_cmp if uses_cmp else None, self.lens, k_cmp_t, v_cmp_t, k_win_t,
                    v_win_t, self.k_win if self.separate else None,
                    self.v_win if self.separate else None)
            self._longest += 1
            return
        rows = torch.arange(self.batch, device=self.k.device)
        pos = self.lens.long()
        self.k[rows, pos] = k_t
        self.v[rows, pos] = v_t
        if self.separate:
            self.k_win[rows, pos] = k_win_t
            self.v_win[rows, pos] = v_win_t
        emit = self.emits()
        n = self.lens.long() + 1
        i = torch.clamp((n - spec.cmp_block) // spec.cmp_stride, min=0)
        if k_cmp_t is not None:
            new_k, new_v = k_cmp_t, v_cmp_t
        else:
            window = torch.clamp(n[:, None] - spec.cmp_block, min=0) + torch.arange(
                spec.cmp_block, device=n.device)
            new_k = self.k[rows[:, None], window].float().mean(1).to(self.k.dtype)
            new_v = self.v[rows[:, None], window].float().mean(1).to(self.v.dtype)
        old_k, old_v = self.k_cmp[rows, i], self.v_cmp[rows, i]
        self.k_cmp[rows, i] = torch.where(emit[:, None, None], new_k, old_k)
        self.v_cmp[rows, i] = torch.where(emit[:, None, None], new_v, old_v)
        self.lens += 1
        self._longest += 1

    def rewind(self, n: int = 1) -> None:
        """Drop the last `n` tokens of every row (e.g. draft tokens a speculative decoder
        rejected); a row shorter than `n` becomes empty. Compressed tokens those tokens emitted
        are written again when the length is reached again. A device op: no host sync."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative integer, got {str(n)[:40]}")
        self.lens.sub_(n).clamp_(min=0)
        self._longest = max(0, self._longest - n)

    # ------------------------------------------------------------------ attention
    def step(self, q: torch.Tensor, gates: torch.Tensor | None = None,
             return_indices: bool = False, q_cmp: torch.Tensor | None = None):
        """Attention of q [B, HQ, Dk] at position len - 1 of each row: o [B, HQ, Dv], equal to
        that row of the prefill over the cached tokens. `q_cmp` (default q) is the query of the
        compressed branch and the block scores."""
        self._check_query(q, gates, q_cmp)
        return self._step(q, gates, return_indices, q_cmp)

    def _check_query(self, q, gates, q_cmp=None) -> None:
        spec = self.spec
        dt, dev = self.k.dtype, self.k.device
        _expect("q", q, (self.batch, spec.heads_q, spec.dim_qk), "[B, HQ, Dk]", dt, dev)
        if q_cmp is not None:
            _expect("q_cmp", q_cmp, (self.batch, spec.heads_q, spec.dim_qk), "[B, HQ, Dk]", dt,
                    dev)
        if gates is not None:
            _expect("gates", gates, (self.batch, spec.heads_q, 3), "[B, HQ, 3] (cmp, slc, win)",
                    dt, dev)

    def _step(self, q, gates, return_indices: bool = False, q_cmp=None):
        spec = self.spec
        kw = self.k_win if self.separate else None
        vw = self.v_win if self.separate else None
        if not kernels_available(q.device):
            kc = self.k_cmp if spec.has("cmp") or spec.has("slc") else None
            vc = self.v_cmp if kc is not None else None
            return reference.nsa_decode_step(
                q, self.k, self.v, gates, spec, kc, vc, cache_seqlens=self.lens,
                return_indices=return_indices, k_win=kw, v_win=vw, q_cmp=q_cmp)

        if self._work is None:
            self._work = self.op.module.decode_workspace(self.batch, self.max_len, self.splits,
                                                         q.device)
        k, v, kc, vc = self.k, self.v, self.k_cmp, self.v_cmp
        dtype = q.dtype
        if interpreted_in_float32(q):   # the interpreter's bfloat16 is wrong: compute in float32
            q, gates, k, v, kc, vc, kw, vw, q_cmp = (
                None if t is None else t.float() for t in (q, gates, k, v, kc, vc, kw, vw, q_cmp))
        with direct_launches():
            o, idx = self.op.module.decode_step(
                q.contiguous(), None if gates is None else gates.contiguous(), k, v,
                kc, vc, self.lens, self.splits, self._work, kw, vw,
                configs=self._launch_configs(),
                q_cmp=None if q_cmp is None else q_cmp.contiguous())
        o = o.to(dtype)
        if return_indices:
            if idx is None:
                idx = torch.full((self.batch, spec.heads_kv, spec.slc_count), -1,
                                 dtype=torch.int32, device=q.device)
            return o, idx
        return o

    def _launch_configs(self) -> dict:
        """The decode kernels' configs of a step: explicit `configs`, else the tuned ones under
        the op's overrides (host dicts only: no device reads)."""
        if self.configs is not None:
            return self.configs
        if not self._tuned:
            return self.op.configs
        cfg = dict(self._tuned)
        cfg.update(self.op.configs)
        return cfg

    def decode(self, q: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
               gates: torch.Tensor | None = None, k_cmp_t: torch.Tensor | None = None,
               v_cmp_t: torch.Tensor | None = None, k_win_t: torch.Tensor | None = None,
               v_win_t: torch.Tensor | None = None, q_cmp: torch.Tensor | None = None,
               return_indices: bool = False):
        """Append the new token's k, v, then attend with its q (and q_cmp, the compressed
        branch's query, default q): one decoding step. Every argument is checked first, so a
        refused call leaves the cache as it was.

        Several new tokens per sequence (speculative decoding's drafts, a chunk of a prompt):
        q [B, S, HQ, Dk], k_t, v_t [B, S, H, D], gates [B, S, HQ, 3] (learned compression:
        k_cmp_t, v_cmp_t [B, S, H, D], entry s being the compressed token that new token s
        completes, if it completes one). The S tokens are appended in order and the S queries
        attend at once, token s to the cache and new tokens 0..s: o [B, S, HQ, Dv], equal to the
        prefill's rows. `return_indices` also returns the selected blocks ([B, H, n], or
        [B, S, H, n])."""
        if isinstance(q, torch.Tensor) and q.dim() == 4:
            o, idx = self._decode_tokens(q, k_t, v_t, gates, k_cmp_t, v_cmp_t, k_win_t, v_win_t,
                                         q_cmp)
            return (o, idx) if return_indices else o
        self._check_token(k_t, v_t, k_cmp_t, v_cmp_t, k_win_t, v_win_t)
        self._check_query(q, gates, q_cmp)
        self._append(k_t, v_t, k_cmp_t, v_cmp_t, k_win_t, v_win_t)
        return self._step(q, gates, return_indices, q_cmp)

    def _decode_tokens(self, q, k_t, v_t, gates, k_cmp_t, v_cmp_t, k_win_t, v_win_t, q_cmp=None):
        """decode() with S new tokens per sequence (q [B, S, HQ, Dk])."""
        B, S = q.shape[:2]
        if B != self.batch or S < 1:
            raise ValueError(f"q: expected [B={self.batch}, S >= 1, HQ, Dk], got {tuple(q.shape)}")
        if self._longest + S > self.max_len:
            raise ValueError(f"cache full: {S} more tokens exceed max_len={self.max_len}")

        def at(t, s):
            if t is None:
                return None
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:2] != (B, S):
                raise ValueError(f"expected every step tensor as [B={B}, S={S}, ...] like q, got "
                                 f"{_describe(t)}")
            return t[:, s]

        toks = [tuple(at(t, s) for t in (k_t, v_t, k_cmp_t, v_cmp_t, k_win_t, v_win_t))
                for s in range(S)]
        for s in range(S):
            self._check_token(*toks[s])
            self._check_query(at(q, s), at(gates, s), at(q_cmp, s))
            self._longest += 1          # the capacity check of the next token sees this one
        self._longest -= S
        for s in range(S):
            self._append(*toks[s])
        return self._attend_tokens(q, gates, q_cmp)

    def _attend_tokens(self, q, gates, q_cmp=None):
        """The S newest tokens of every sequence attend at once: query (b, s) is a row of its
        own over sequence b's cache rows, with length lens[b] - S + s + 1 (the decode kernels
        read the cache as one page per sequence). Returns (o [B, S, HQ, Dv], the selected
        blocks [B, S, H, n])."""
        spec, B, S, L = self.spec, self.batch, q.shape[1], self.max_len
        dev = q.device
        lens = (self.lens[:, None] - S + 1
                + torch.arange(S, dtype=torch.int32, device=dev)).reshape(-1)
        qv = q.reshape(B * S, *q.shape[2:])
        qcv = None if q_cmp is None else q_cmp.reshape(B * S, *q_cmp.shape[2:])
        gv = None if gates is None else gates.reshape(B * S, *gates.shape[2:])
        caches = [self.k, self.v, self.k_cmp, self.v_cmp]
        caches += [self.k_win, self.v_win] if self.separate else [None, None]
        if not kernels_available(dev):
            rows = torch.arange(B, device=dev).repeat_interleave(S)
            k, v, kc, vc, kw, vw = (None if t is None else t[rows] for t in caches)
            uses_cmp = spec.has("cmp") or spec.has("slc")
            o, idx = reference.nsa_decode_step(qv, k, v, gv, spec, kc if uses_cmp else None,
                                               vc if uses_cmp else None, cache_seqlens=lens,
                                               return_indices=True, k_win=kw, v_win=vw,
                                               q_cmp=qcv)
            return o.view(B, S, *o.shape[1:]), idx.view(B, S, *idx.shape[1:])
        if S not in self._multi:
            target = current(dev if dev.type == "cuda" else None)
            splits = decode_splits(spec, B * S, L, target)
            work = self.op.module.decode_workspace(B * S, L, splits, dev)
            table = torch.arange(B, dtype=torch.int32, device=dev).repeat_interleave(S)[:, None]
            self._multi[S] = (splits, work, table)
        splits, work, table = self._multi[S]
        mod, dtype = self.op.module, q.dtype
        if interpreted_in_float32(q):   # the interpreter's bfloat16 is wrong: compute in float32
            qv, gv = qv.float(), None if gv is None else gv.float()
            qcv = None if qcv is None else qcv.float()
            caches = [None if t is None else t.float() for t in caches]
        k, v, kc, vc, kw, vw = (None if t is None else mod.pool_view(t, B * S) for t in caches)
        pages = mod.decode_pages(table, table, L, self.k_cmp.shape[1])
        with direct_launches():
            o, idx = mod.decode_step(qv.contiguous(), None if gv is None else gv.contiguous(), k,
                                     v, kc, vc, lens, splits, work, kw, vw,
                                     configs=self._launch_configs(), pages=pages,
                                     q_cmp=None if qcv is None else qcv.contiguous())
        if idx is None:
            idx = torch.full((B * S, spec.heads_kv, spec.slc_count), -1, dtype=torch.int32,
                             device=dev)
        return o.to(dtype).view(B, S, *o.shape[1:]), idx.view(B, S, *idx.shape[1:])


def _describe(t) -> str:
    """A short description of a tensor (or whatever was passed instead) for error messages."""
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


__all__ = ["DecodeCache"]
