"""Decoding for a DSA layer: a cache of keys (and values) and indexer keys per sequence, and a
step that appends one token per sequence and attends with it (docs/algorithm.md section 8).

The step runs the same generated kernels as the prefill: the new token of each sequence is a
query of its own, whose keys start at its sequence's row of the cache (`tok_kbase`), so the
indexer scores the cached keys, the top-k picks among them and the sparse attention reads the
picks, with no host synchronisation (the lengths stay on the device) and fixed shapes, so a
step can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checks import check_dsa_prefill, check_dsa_step, check_fp8_keys_device
from .launch import direct_launches, interpreted_in_float32

I32 = torch.int32


@dataclass
class StepLayout:
    """The tables the DSA kernels read, for one query per sequence of a cache of `capacity`
    rows per sequence: the query of sequence b is token b, at position lens[b] - 1 (`refresh`
    writes it before each step), with its keys from cache row b * capacity. Built once per
    cache, so a step allocates no tables."""

    batch: int
    capacity: int
    device: torch.device
    seqlens: tuple = ()
    tok_pos: torch.Tensor = None
    tok_kbase: torch.Tensor = None
    _tiles: tuple = field(default=(), repr=False)

    def __post_init__(self):
        rows = torch.arange(self.batch, dtype=I32, device=self.device)
        self.seqlens = (self.capacity,)          # the score buffer's width (no host sync)
        self.tok_pos = torch.zeros_like(rows)
        self.tok_kbase = rows * self.capacity
        self._tiles = (rows, torch.ones_like(rows))

    def refresh(self, lens: torch.Tensor) -> "StepLayout":
        """The query positions for the lengths `lens` (on the device, in place)."""
        torch.sub(lens, 1, out=self.tok_pos)
        return self

    def tiles(self, bt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One tile per query (each sequence has one token this step)."""
        return self._tiles


class DSACache:
    """Keys, values (unless they are the keys' first Dv columns, as in MLA) and indexer keys of
    `batch` sequences of up to `max_len` tokens, with their lengths on the device. With FP8
    indexer keys (the spec's `indexer.key_dtype`) the cache stores them in float8_e4m3 with one
    fp32 scale per token (`k_idx_scale`), as the kernels read them."""

    def __init__(self, op, batch: int, max_len: int, device=None, dtype: torch.dtype | None = None,
                 with_values: bool = True):
        spec = op.spec
        if batch < 1 or max_len < 1:
            raise ValueError(f"new_cache: batch and max_len must be >= 1, got {batch}, {max_len}")
        if not with_values and spec.dim_v > spec.dim_qk:
            raise ValueError(f"new_cache: with_values=False reads v from k's first Dv columns, "
                             f"but head_dim.v ({spec.dim_v}) exceeds head_dim.qk ({spec.dim_qk})")
        self.op, self.spec = op, spec
        self.batch, self.max_len = batch, max_len
        device = torch.device(device or "cpu")
        dtype = dtype or getattr(torch, spec.dtype)
        H = spec.heads_kv
        self.k = torch.zeros(batch, max_len, H, spec.dim_qk, dtype=dtype, device=device)
        self.v = (torch.zeros(batch, max_len, H, spec.dim_v, dtype=dtype, device=device)
                  if with_values else None)
        check_fp8_keys_device(spec, device)
        self.k_idx = torch.zeros(batch, max_len, spec.indexer_dim, device=device,
                                 dtype=torch.float8_e4m3fn if spec.fp8_keys else dtype)
        self.k_idx_scale = (torch.zeros(batch, max_len, dtype=torch.float32, device=device)
                            if spec.fp8_keys else None)
        self.lens = torch.zeros(batch, dtype=I32, device=device)
        self._layout = StepLayout(batch, max_len, device)

    def prefill(self, k: torch.Tensor, v: torch.Tensor | None, k_idx: torch.Tensor,
                lens: torch.Tensor) -> None:
        """Set the cache to the first lens[b] tokens of k [B, T, H, Dk], v [B, T, H, Dv] (None
        for a cache that reads v from k), k_idx [B, T, DI]; lens [B] integers in 0 .. T. Every
        argument is checked before anything is written."""
        check_dsa_prefill(self.spec, self.batch, self.max_len, self.k.device,
                          self.v is not None, k, v, k_idx, lens)
        T = k.shape[1]
        self.k[:, :T] = k
        if self.v is not None:
            self.v[:, :T] = v
        self._write_keys((slice(None), slice(0, T)), k_idx)
        self.lens.copy_(lens.to(I32))

    def _write_keys(self, where, k_idx: torch.Tensor) -> None:
        """Store indexer keys at cache index `where`, quantized when the cache keeps FP8."""
        if self.k_idx_scale is None:
            self.k_idx[where] = k_idx.to(self.k_idx.dtype)
            return
        k8, scale = self.op.module.quantize_keys(k_idx.reshape(-1, k_idx.shape[-1]))
        self.k_idx[where] = k8.view(k_idx.shape)
        self.k_idx_scale[where] = scale.view(k_idx.shape[:-1])

    def append(self, k_t: torch.Tensor, v_t: torch.Tensor | None, k_idx_t: torch.Tensor) -> None:
        """Write one token per sequence (k_t [B, H, Dk], v_t [B, H, Dv] or None, k_idx_t [B, DI])
        at position lens[b] and advance the lengths (device-side: no host sync)."""
        check_dsa_step(self.spec, self.batch, self.k.device, k_t=k_t, v_t=v_t, k_idx_t=k_idx_t)
        if (v_t is None) != (self.v is None):
            raise ValueError("v_t: " + ("this cache holds values; give v_t" if v_t is None else
                                        "this cache reads v from k (with_values=False); pass None"))
        n, spec = self.batch * self.max_len, self.spec      # the kernel sees rows [B * L, ...]
        v = None if self.v is None else self.v.view(n, spec.heads_kv, spec.dim_v)
        k_scale = None if self.k_idx_scale is None else self.k_idx_scale.view(n)
        with torch.no_grad(), direct_launches():
            self.op.module.launch_dsa_append(
                k_t.contiguous(), None if v_t is None else v_t.contiguous(),
                k_idx_t.contiguous(), self.k.view(n, spec.heads_kv, spec.dim_qk), v,
                self.k_idx.view(n, spec.indexer_dim), k_scale, self.lens,
                self.op.module.CONFIGS["dsa_append"])

    def step(self, q: torch.Tensor, q_idx: torch.Tensor, w_idx: torch.Tensor,
             return_indices: bool = False):
        """Attend with the last appended token of each sequence: q [B, HQ, Dk], q_idx [B, HI, DI],
        w_idx [B, HI] -> o [B, HQ, Dv] (and its picks [B, topk], positions in the sequence)."""
        spec, mod = self.spec, self.op.module
        check_dsa_step(spec, self.batch, self.k.device, q=q, q_idx=q_idx, w_idx=w_idx)
        dtype = q.dtype
        k, v, ki = self.k, self.v, self.k_idx
        fp8 = self.k_idx_scale is not None
        if interpreted_in_float32(k):        # the interpreter computes bfloat16 wrongly
            k, ki = k.float(), ki if fp8 else ki.float()
            v = None if v is None else v.float()
        q = q.to(k.dtype).contiguous()
        q_idx = q_idx.to(k.dtype if fp8 else ki.dtype).contiguous()
        k_scale = self.k_idx_scale.view(-1) if fp8 else None
        B, L = self.batch, self.max_len
        kp = k.view(B * L, spec.heads_kv, spec.dim_qk)
        vp = None if v is None else v.view(B * L, spec.heads_kv, spec.dim_v)
        lay = self._layout.refresh(self.lens)
        cfg = self.op.configs_for(self.k.device, self.max_len)
        with torch.no_grad(), direct_launches():
            o, idx, _ = mod.forward(q, kp, vp, q_idx, ki.view(B * L, spec.indexer_dim),
                                    w_idx.contiguous(), lay, configs=cfg, k_scale=k_scale)
        o = o.to(dtype)
        return (o, idx) if return_indices else o

    def decode(self, q, k_t, v_t, q_idx, k_idx_t, w_idx, return_indices: bool = False):
        """One decode step as a model runs it: append the token, then attend with it."""
        self.append(k_t, v_t, k_idx_t)
        return self.step(q, q_idx, w_idx, return_indices)

    def rewind(self, n: int = 1) -> None:
        """Forget the last n tokens of every sequence (speculative decoding, benchmarks)."""
        self.lens.sub_(n).clamp_(min=0)
