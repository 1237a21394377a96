"""Validation of the tensors handed to an NSA or DSA op, shared by the reference and the
generated ops.

Every failure raises a ValueError (TypeError for dtypes) that names the argument and says what
was expected, so a shape mistake in a model surfaces at the call, not as a wrong answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dsa_spec import DSASpec
from .spec import Spec


@dataclass(frozen=True)
class Problem:
    """The sizes of one call, read off validated inputs."""

    batch: int
    seq_len: int
    seqlens: tuple[int, ...]      # per sequence (one entry per batch row, or per varlen sequence)
    qlens: tuple[int, ...] = ()   # queries per sequence when fewer than its keys (cu_seqlens_k)


def _shape(name: str, t: torch.Tensor, want: tuple, meaning: str) -> None:
    if t.dim() != len(want):
        raise ValueError(f"{name}: expected a {len(want)}-d tensor {meaning}, got shape {tuple(t.shape)}")
    for got, exp in zip(t.shape, want):
        if exp is not None and got != exp:
            raise ValueError(f"{name}: expected shape {meaning} = "
                             f"{tuple('*' if e is None else e for e in want)}, got {tuple(t.shape)}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device,
                     name: str = "cu_seqlens") -> tuple[int, ...]:
    """Validate FlashAttention-style cumulative lengths and return the per-sequence lengths."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name}: expected a 1-d tensor [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name}: on {cu_seqlens.device}, but q is on {device}")
    offs = [int(x) for x in cu_seqlens.tolist()]
    if offs[0] != 0:
        raise ValueError(f"{name}: must start at 0, starts at {offs[0]}")
    lens = tuple(b - a for a, b in zip(offs[:-1], offs[1:]))
    bad = [i for i, n in enumerate(lens) if n <= 0]
    if bad:
        raise ValueError(f"{name}: must be strictly increasing; entries {bad[0]} and {bad[0] + 1} "
                         f"are {offs[bad[0]]} and {offs[bad[0] + 1]}")
    if offs[-1] != total:
        raise ValueError(f"{name}: must end at the packed length T={total}, ends at {offs[-1]}")
    return lens


def _seqlens(cu_seqlens, B: int, T: int, device: torch.device) -> tuple[int, ...]:
    """The lengths of a call's sequences: B rows of T, or the packed ones of `cu_seqlens`
    (then B must be 1)."""
    if cu_seqlens is None:
        return (T,) * B
    if B != 1:
        raise ValueError(f"cu_seqlens: requires batch size 1 (packed sequences), got B={B}")
    return check_cu_seqlens(cu_seqlens, T, device)


def check_inputs(spec: Spec, q, k, v, gates=None, k_cmp=None, v_cmp=None, cu_seqlens=None,
                 k_win=None, v_win=None, q_cmp=None, cu_seqlens_k=None) -> Problem:
    """Check shapes, dtypes and devices of an NSA call against the spec; return its sizes.
    With `cu_seqlens_k` the keys (k, v, k_win, v_win, k_cmp, v_cmp) are packed by it and the
    queries (q, gates, q_cmp) by `cu_seqlens`: each sequence's queries are its last positions."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-d tensor [B, T, HQ, Dk], got shape {tuple(q.shape)}")
    B, T, HQ, Dk = q.shape
    H = spec.heads_kv
    if HQ != spec.heads_q or Dk != spec.dim_qk:
        raise ValueError(f"q: expected [B, T, HQ={spec.heads_q}, Dk={spec.dim_qk}] for spec "
                         f"{spec.name!r}, got {tuple(q.shape)}")
    if T < 1 or B < 1:
        raise ValueError(f"q: batch and sequence length must be >= 1, got shape {tuple(q.shape)}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q: expected a floating-point dtype, got {q.dtype}")
    qlens: tuple = ()
    TK = T
    if cu_seqlens_k is not None:
        if cu_seqlens is None:
            raise ValueError("cu_seqlens_k: requires cu_seqlens (the queries' packing)")
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError("k: expected a 4-d tensor [1, Tk, H, Dk]")
        TK = k.shape[1]
        qlens = _seqlens(cu_seqlens, B, T, q.device)
        klens = check_cu_seqlens(cu_seqlens_k, TK, q.device, "cu_seqlens_k")
        if len(klens) != len(qlens):
            raise ValueError(f"cu_seqlens_k: {len(klens)} sequences, but cu_seqlens has "
                             f"{len(qlens)}")
        short = [i for i, (a, b) in enumerate(zip(qlens, klens)) if a > b]
        if short:
            raise ValueError(f"cu_seqlens_k: sequence {short[0]} has {qlens[short[0]]} queries "
                             f"but only {klens[short[0]]} keys (its queries are its last "
                             f"positions)")
    _shape("k", k, (B, TK, H, spec.dim_qk), "[B, T, H, Dk]")
    _shape("v", v, (B, TK, H, spec.dim_v), "[B, T, H, Dv]")
    named = [("k", k), ("v", v)]
    if q_cmp is not None:
        _shape("q_cmp", q_cmp, (B, T, HQ, Dk), "[B, T, HQ, Dk] (like q)")
        named.append(("q_cmp", q_cmp))
    if gates is not None:
        _shape("gates", gates, (B, T, HQ, 3), "[B, T, HQ, 3] (cmp, slc, win)")
        named.append(("gates", gates))
    if spec.kv_per_branch == "separate" and spec.has("win"):
        if k_win is None or v_win is None:
            raise ValueError("k_win, v_win: required because the spec has kv_per_branch: separate")
    if k_win is not None or v_win is not None:
        if spec.kv_per_branch != "separate":
            raise ValueError("k_win, v_win: only accepted when the spec has kv_per_branch: separate")
        _shape("k_win", k_win, (B, TK, H, spec.dim_qk), "[B, T, H, Dk]")
        _shape("v_win", v_win, (B, TK, H, spec.dim_v), "[B, T, H, Dv]")
        named += [("k_win", k_win), ("v_win", v_win)]

    lens = klens if qlens else _seqlens(cu_seqlens, B, T, q.device)
    ncs = [spec.num_cmp(n) for n in lens]
    nc = sum(ncs) if cu_seqlens is not None else ncs[0]

    needs_cmp = spec.has("cmp") or spec.has("slc")
    if (k_cmp is None) != (v_cmp is None):
        raise ValueError("k_cmp, v_cmp: pass both or neither")
    if k_cmp is None and needs_cmp and spec.learned_compression:
        raise ValueError(f"k_cmp, v_cmp: required because the spec's compression.kind is "
                         f"{spec.cmp_kind!r} (learned); only 'mean' is computed by the op")
    if k_cmp is not None:
        _shape("k_cmp", k_cmp, (B, nc, H, spec.dim_qk), "[B, Nc, H, Dk]")
        _shape("v_cmp", v_cmp, (B, nc, H, spec.dim_v), "[B, Nc, H, Dv]")
        named += [("k_cmp", k_cmp), ("v_cmp", v_cmp)]

    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
    return Problem(batch=B, seq_len=T, seqlens=lens, qlens=qlens)


def check_dsa_inputs(spec: DSASpec, q, k, v, q_idx, k_idx, w_idx, cu_seqlens=None,
                     values: bool = True) -> Problem:
    """Check shapes, dtypes and devices of a DSA call against the spec; return its sizes. `v`
    may be None: the value is then k[..., :Dv] (MLA's absorbed form), so Dv <= Dk. Without
    `values` (the indexer loss reads no value) v is not checked."""
    for name, t in (("q", q), ("k", k), ("q_idx", q_idx), ("k_idx", k_idx), ("w_idx", w_idx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-d tensor [B, T, HQ, Dk], got shape {tuple(q.shape)}")
    B, T = q.shape[:2]
    if T < 1 or B < 1:
        raise ValueError(f"q: batch and sequence length must be >= 1, got shape {tuple(q.shape)}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q: expected a floating-point dtype, got {q.dtype}")
    H, HI, DI = spec.heads_kv, spec.indexer_heads, spec.indexer_dim
    _shape("q", q, (B, T, spec.heads_q, spec.dim_qk), "[B, T, HQ, Dk]")
    _shape("k", k, (B, T, H, spec.dim_qk), "[B, T, H, Dk]")
    named = [("k", k)]
    if v is None:
        if values and spec.dim_v > spec.dim_qk:
            raise ValueError(f"v: required, since head_dim.v ({spec.dim_v}) exceeds head_dim.qk "
                             f"({spec.dim_qk}) and v = k[..., :Dv] is not possible")
    else:
        _shape("v", v, (B, T, H, spec.dim_v), "[B, T, H, Dv]")
        named.append(("v", v))
    _shape("q_idx", q_idx, (B, T, HI, DI), "[B, T, HI, DI]")
    _shape("k_idx", k_idx, (B, T, DI), "[B, T, DI]")
    _shape("w_idx", w_idx, (B, T, HI), "[B, T, HI]")
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match q's dtype {q.dtype}")
    for name, t in named + [("q_idx", q_idx), ("k_idx", k_idx), ("w_idx", w_idx)]:
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
    lens = _seqlens(cu_seqlens, B, T, q.device)
    return Problem(batch=B, seq_len=T, seqlens=lens)


def check_dsa_step(spec: DSASpec, batch: int, device: torch.device, **tensors) -> None:
    """Check one DSA decode step's tensors (one token per sequence) by name: q [B, HQ, Dk],
    k_t [B, H, Dk], v_t [B, H, Dv], q_idx [B, HI, DI], k_idx_t [B, DI], w_idx [B, HI]; a None
    is not checked. All floating point, on the cache's device."""
    want = {"q": ((batch, spec.heads_q, spec.dim_qk), "[B, HQ, Dk]"),
            "k_t": ((batch, spec.heads_kv, spec.dim_qk), "[B, H, Dk]"),
            "v_t": ((batch, spec.heads_kv, spec.dim_v), "[B, H, Dv]"),
            "q_idx": ((batch, spec.indexer_heads, spec.indexer_dim), "[B, HI, DI]"),
            "k_idx_t": ((batch, spec.indexer_dim), "[B, DI]"),
            "w_idx": ((batch, spec.indexer_heads), "[B, HI]")}
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        _shape(name, t, *want[name])
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: on {t.device}, but the cache is on {device}")


def _described(t) -> str:
    """An argument as an error message shows it: shape and dtype, or its type (never contents)."""
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {t.dtype}"
    return type(t).__name__


def check_dsa_prefill(spec: DSASpec, batch: int, max_len: int, device: torch.device,
                      with_values: bool, k, v, k_idx, lens) -> None:
    """Check a DSA cache prefill by name before anything is written: k [B, T, H, Dk], v
    [B, T, H, Dv] (None when the cache reads v from k), k_idx [B, T, DI], all floating point on
    the cache's device, T <= max_len, and lens [B] integers in 0 .. T."""
    B = batch
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"prefill: k: expected [B={B}, T, H, Dk], got {_described(k)}")
    T = k.shape[1]
    want = {"k": (k, (B, T, spec.heads_kv, spec.dim_qk), "[B, T, H, Dk]"),
            "v": (v, (B, T, spec.heads_kv, spec.dim_v), "[B, T, H, Dv]"),
            "k_idx": (k_idx, (B, T, spec.indexer_dim), "[B, T, DI]")}
    for name, (t, shape, words) in want.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"prefill: {name}: expected {words} = {shape}, got "
                             f"{_described(t)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"prefill: {name}: expected a floating-point dtype, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"prefill: {name}: on {t.device}, but the cache is on {device}")
    if (v is None) == with_values:
        raise ValueError("prefill: v: " + ("this cache holds values; give v" if v is None else
                                           "this cache reads v from k (with_values=False); "
                                           "pass None"))
    if T > max_len:
        raise ValueError(f"prefill: {T} tokens exceed the cache's max_len {max_len}")
    if (not isinstance(lens, torch.Tensor) or tuple(lens.shape) != (B,)
            or lens.dtype.is_floating_point or lens.dtype == torch.bool):
        raise ValueError(f"prefill: lens: expected [B] = ({B},) integers, got {_described(lens)}")
    if B and (int(lens.min()) < 0 or int(lens.max()) > T):
        raise ValueError(f"prefill: lens: each must be in 0 .. T = {T}, got "
                         f"{int(lens.min())} .. {int(lens.max())}")


def check_fp8_keys_device(spec: DSASpec, device: torch.device) -> None:
    """FP8 indexer keys run on FP8 tensor cores: refuse a GPU older than sm_89 by name (the
    interpreter on the CPU emulates them)."""
    if not spec.fp8_keys or device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ValueError(f"indexer.key_dtype float8_e4m3 needs FP8 tensor cores (sm_89 or newer); "
                         f"{device} is sm_{cap[0]}{cap[1]}: use key_dtype bfloat16 there")
