"""The hardware a module is planned for: one object holding every fact the compiler uses.

A Target is read from the GPU at hand (`Target.from_device`), or taken from a named preset for
builds on a machine without that GPU (`nsagen build --arch`, the CPU interpreter). Nothing else
in nsagen states a hardware number: lowering (tile sizes that fit shared memory), the config
space (register and shared-memory pruning), the decode split model (SM count, programs per SM)
and the cost model's ceilings all read them from here.

Presets hold the values the CUDA runtime reports for each part (shared memory per block is the
opt-in maximum, `cudaDevAttrMaxSharedMemoryPerBlockOptin`) and the datasheet ceilings, which are
leads for the cost model, not measurements: `nsagen bench` measures its own.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Target:
    """Facts of one GPU model that change what the compiler emits or how it schedules."""

    name: str                    # the device's name, or the preset's
    arch: int                    # compute capability as an integer: 90 for sm_90
    sm_count: int
    smem_per_block: int          # bytes of shared memory one program may use (opt-in maximum)
    smem_per_sm: int             # bytes of shared memory of one SM (programs resident together)
    regs_per_sm: int = 65536     # 32-bit registers of one SM
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_programs_per_sm: int = 32
    l2_bytes: int = 0
    mem_bandwidth: float = 0.0   # bytes/s, datasheet (a lead; the bench measures its own)
    l2_bandwidth: float = 0.0    # bytes/s read from L2 by scattered tiles (a lead; 0: 2x memory)
    scatter_efficiency: float = 0.5   # share of mem_bandwidth that row gathers and scattered
    #                                   writes reach (H200: results/h200/loop-order-64k.md)
    bf16_flops: float = 0.0      # dense bf16 FLOP/s, datasheet (likewise)

    # rules derived from the facts ---------------------------------------------------------
    @property
    def smem_budget(self) -> int:
        """Shared memory a tile plan may count on: the per-block maximum less 3 KiB, since the
        plans' estimates leave out the compiler's own scratch (barriers, reduction buffers)."""
        return self.smem_per_block - 3 * 1024

    @property
    def reg_limit(self) -> int:
        """Estimated registers per thread above which a tile spills: a margin under the
        per-thread maximum for indices, pointers and loop state."""
        return self.max_regs_per_thread - 31

    @property
    def has_pdl(self) -> bool:
        """Programmatic dependent launch (grid dependency control) exists from sm_90."""
        return self.arch >= 90

    @property
    def has_tma(self) -> bool:
        """Tensor-memory loads (TMA descriptors) exist from sm_90."""
        return self.arch >= 90

    @classmethod
    def from_device(cls, device: int | torch.device | None = None) -> "Target":
        """The facts of a CUDA device, as its runtime reports them."""
        p = torch.cuda.get_device_properties(device)
        preset = _preset_for(p.name, 10 * p.major + p.minor)
        optin = getattr(p, "shared_memory_per_block_optin", 0) or preset.smem_per_block
        per_sm = getattr(p, "shared_memory_per_multiprocessor", 0) or preset.smem_per_sm
        return replace(
            preset, name=p.name, arch=10 * p.major + p.minor, sm_count=p.multi_processor_count,
            smem_per_block=optin, smem_per_sm=per_sm,
            regs_per_sm=getattr(p, "regs_per_multiprocessor", 0) or preset.regs_per_sm,
            l2_bytes=getattr(p, "L2_cache_size", 0) or preset.l2_bytes)

    @classmethod
    def preset(cls, name: str) -> "Target":
        """A named preset (h100, h200, a100, b200, l40s, rtx4090); see PRESETS."""
        key = name.lower().replace("nvidia", "").replace(" ", "").replace("-", "")
        if key not in PRESETS:
            raise ValueError(f"unknown target {name[:40]!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def for_arch(cls, arch: int) -> "Target":
        """The preset a build for sm_`arch` without that GPU plans with."""
        for t in PRESETS.values():
            if t.arch == arch:
                return t
        base = max((t for t in PRESETS.values() if t.arch <= arch), key=lambda t: t.arch,
                   default=PRESETS["a100"])
        return replace(base, name=f"sm_{arch}", arch=arch)


PRESETS: dict[str, Target] = {
    "h200": Target("h200", 90, 132, 232448, 233472, l2_bytes=50 * 2 ** 20,
                   mem_bandwidth=4.8e12, bf16_flops=989e12, l2_bandwidth=9e12),
    "h100": Target("h100", 90, 132, 232448, 233472, l2_bytes=50 * 2 ** 20,
                   mem_bandwidth=3.35e12, bf16_flops=989e12, l2_bandwidth=9e12),
    "b200": Target("b200", 100, 148, 232448, 233472, l2_bytes=126 * 2 ** 20,
                   mem_bandwidth=8.0e12, bf16_flops=2250e12, l2_bandwidth=16e12),
    "a100": Target("a100", 80, 108, 166912, 167936, l2_bytes=40 * 2 ** 20,
                   mem_bandwidth=2.04e12, bf16_flops=312e12, l2_bandwidth=4e12),
    "l40s": Target("l40s", 89, 142, 101376, 102400, max_warps_per_sm=48,
                   max_programs_per_sm=24, l2_bytes=96 * 2 ** 20, mem_bandwidth=0.864e12,
                   bf16_flops=362e12, l2_bandwidth=2.5e12),
    "rtx4090": Target("rtx4090", 89, 128, 101376, 102400, max_warps_per_sm=48,
                      max_programs_per_sm=24, l2_bytes=72 * 2 ** 20, mem_bandwidth=1.008e12,
                      bf16_flops=165e12, l2_bandwidth=3e12),
}

DEFAULT = "h200"   # what a machine without a GPU plans for unless told otherwise


def _preset_for(name: str, arch: int) -> Target:
    """The preset nearest a device (by name, else by architecture), for facts the runtime does
    not report."""
    key = name.lower().replace("nvidia", "").replace(" ", "").replace("-", "")
    for k, t in PRESETS.items():
        if k in key:
            return t
    return Target.for_arch(arch)


def current(device: int | torch.device | None = None) -> Target:
    """The GPU at hand when there is one, else the default preset (planning on a machine without
    a GPU, e.g. under Triton's interpreter, gives the same modules as on that GPU)."""
    if torch.cuda.is_available():
        return Target.from_device(device)
    return PRESETS[DEFAULT]
