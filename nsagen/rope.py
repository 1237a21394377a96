"""Rotary position embeddings (RoPE), rotate-half pairing: dimension i turns with i + D/2 by the
angle pos * theta^(-2i/D). The NSA layer rotates with them (nsagen.nn); models that rotate
outside it can share the tables."""
from __future__ import annotations

import torch


def _rope_tables(pos: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [*pos.shape, dim/2] for positions `pos` (any integer or float tensor); angles in
    float32 (float64 for float64 inputs), then cast to `dtype`."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv = theta ** (-torch.arange(0, dim, 2, device=pos.device, dtype=work) / dim)
    ang = pos.to(work)[..., None] * inv
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope_tables(pos: torch.Tensor, dim: int, theta: float = 10000.0,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables apply_rope multiplies by, [*pos.shape, 1, dim] (broadcast over heads):
    C = [cos, cos] and S = [-sin, sin]. A model that rotates at the same positions every step
    can compute them once and pass them to apply_rope."""
    cos, sin = _rope_tables(pos, dim, theta, dtype)
    return torch.cat([cos, cos], -1)[..., None, :], torch.cat([-sin, sin], -1)[..., None, :]


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0,
               tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rotate x [..., N, H, D] at positions pos [..., N] (rotate-half pairing: dim i with i + D/2):
    [x1 cos - x2 sin, x2 cos + x1 sin], as x * C + [x2, x1] * S (bit for bit the same).

    `pos` broadcasts against x's leading dims (e.g. [T] for a [B, T, H, D] batch, [B] for one
    decode token per row [B, H, D]). `tables`: rope_tables(pos, D, theta, x.dtype), computed
    earlier (then pos and theta are not read)."""
    d = x.shape[-1]
    c, s = rope_tables(pos, d, theta, x.dtype) if tables is None else tables
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)      # [x2, x1]
    return x * c + swapped * s
