"""What every kernel definition shares: the definition record and the resource estimates that
default tiles and config spaces are checked against."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import triton

from ..spec import Spec
from ..target import Target
from .signature import Signature

DefaultRule = Callable[[Spec, Target, list], dict]
SpaceRule = Callable[[Spec, dict, Target, int], tuple[list, list]]
LaunchRule = Callable[[Spec, dict], dict[str, Signature]]


@dataclass(frozen=True)
class KernelDef:
    """One generated kernel, defined once: its name (the template's Triton kernel function and
    `launch_<name>`), the template that renders it, the phase it runs in, the rule for its
    default launch config (from the spec and the Target; it appends its reason to the plan's
    decisions), its tunable config space (candidates and likely winners, before ordering and
    caps), its launch signature per Triton function (from the spec and the plan's structural
    flags; "main" is the function named `name`, any other key `name_<key>`) and the op-graph
    nodes it implements (the partition fuses only into a kernel that implements every node of
    the group)."""

    name: str
    template: str
    phase: str                   # "forward", "backward" or "decode"
    default: DefaultRule
    space: SpaceRule
    launch: LaunchRule
    implements: tuple[str, ...] = ()   # the op-graph nodes it can compute, its own first


@dataclass(frozen=True)
class Dims:
    """Sizes every rule reads off a spec: the group padded to a power of two, the padded head
    dims, compressed tokens per selection block (r2) and per compression window (r1)."""

    gp: int
    bdk: int
    bdv: int
    r1: int
    r2: int

    @classmethod
    def of(cls, spec: Spec) -> "Dims":
        return cls(gp=triton.next_power_of_2(spec.group),
                   bdk=triton.next_power_of_2(spec.dim_qk),
                   bdv=triton.next_power_of_2(spec.dim_v),
                   r1=spec.cmp_block // spec.cmp_stride,
                   r2=spec.slc_block // spec.cmp_stride)


def smem_bytes(rows: int, keys: int, dk: int, dv: int, stages: int, elem: int = 2) -> int:
    """Rough shared memory of a pipelined attention loop: K and V tiles per stage plus Q."""
    return stages * keys * (dk + dv) * elem + rows * dk * elem


def dkdv_smem_bytes(spec: Spec, rows: int, keys: int, stages: int) -> int:
    """Shared memory of a dk/dv step (16-bit inputs): `stages` buffers of the q and dO row
    tiles, the key/value tile, and the gated dO the products read (an upper bound on sm_90:
    128 keys x 64 rows x D=128 at 3 stages estimates 176 KB where Triton 3.6 asked for 161 KB)."""
    bd = triton.next_power_of_2(spec.dim_qk) + triton.next_power_of_2(spec.dim_v)
    return stages * rows * bd * 2 + keys * bd * 2 + rows * triton.next_power_of_2(spec.dim_v) * 2


def dkdv_regs(spec: Spec, keys: int, num_warps: int) -> float:
    """Registers a thread holds for a dk/dv step's two fp32 accumulators (keys x each head dim);
    above ~128 the step's own tiles no longer fit beside them and it spills."""
    bd = triton.next_power_of_2(spec.dim_qk) + triton.next_power_of_2(spec.dim_v)
    return keys * bd / (32 * num_warps)


def regs(rows: int, keys: int, bdk: int, bdv: int, num_warps: int) -> float:
    """Registers per thread of an attention tile: fp32 scores and output accumulator, bf16 q."""
    return (rows * keys + rows * bdv) / (32 * num_warps) + rows * bdk / (64 * num_warps)


def nearest(cands: list[dict], default: dict) -> list[dict]:
    """Candidates ordered by how many parameters differ from the default (stable)."""
    return sorted(cands, key=lambda c: sum(c.get(k) != v for k, v in default.items()))


def interleave(*lists: list) -> list:
    """a[0], b[0], a[1], b[1], ...: every part of a kernel gets candidates under a cap."""
    out = []
    for i in range(max(map(len, lists))):
        for part in lists:
            out += part[i:i + 1]
    return out


def token_rows(gp: int, *rows: int) -> list[int]:
    """Tokens per tile giving each of `rows` head rows (at least one token)."""
    return sorted({max(1, r // gp) for r in rows})
