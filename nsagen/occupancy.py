"""How many programs of a compiled kernel an SM holds at once, from its registers and shared memory.

The decode split model (nsagen.ir.passes.decode_splits) counts waves of resident programs. Shared
memory alone overstates residency when a kernel keeps its K/V tiles in registers (decode_cmp at
D=128 needs about 220 registers a thread, so two programs fit on an H200 SM, not three), and a
third of a wave more changes the best split. On a GPU the decode cache therefore compiles its
streaming kernels first and reads their register and shared-memory use.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("nsagen")

# Hopper (and Ampere) limits per SM
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256          # registers are given to a warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_PROGRAMS_PER_SM = 32
SMEM_RESERVED = 1024          # shared memory the driver reserves per program
STREAMING_KERNELS = {"decode_cmp": "cmp", "decode_slc": "slc", "decode_win": "slc"}


def programs_per_sm(n_regs: int, num_warps: int, shared: int,
                    smem_per_sm: int = 228 * 1024) -> int:
    """Programs (CTAs) of one kernel resident on an SM: the least of what its registers, its
    shared memory, the warp slots and the program slots allow (at least 1)."""
    per_warp = -(-max(1, n_regs) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // (per_warp * num_warps)
    by_smem = smem_per_sm // (shared + SMEM_RESERVED)
    return max(1, min(by_regs, by_smem, MAX_WARPS_PER_SM // num_warps, MAX_PROGRAMS_PER_SM))


def decode_residency(op, batch: int, max_len: int, splits: dict, configs: dict,
                     device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """{"cmp": programs per SM of decode_cmp, "slc": of decode_slc (or decode_win)} as compiled for `device`
    with `configs` (the kernels a step of this batch and capacity launches). The step's launches
    are recorded, not run; compiling them here is what the first step would do anyway. Returns
    {} when a kernel cannot be inspected (the split model then keeps its shared-memory count)."""
    from .autotune import _recording
    from .ops import direct_launches

    spec = op.spec
    H, HQ, Dk, Dv = spec.heads_kv, spec.heads_q, spec.dim_qk, spec.dim_v
    nc = max(1, spec.num_cmp(max_len))

    def empty(*shape):      # never read: the launches are recorded, not run
        return torch.empty(*shape, dtype=dtype, device=device)

    calls: list = []
    try:
        work = op.module.decode_workspace(batch, max_len, splits, device)
        with _recording(calls), direct_launches(), torch.no_grad():
            op.module.decode_step(
                empty(batch, HQ, Dk), empty(batch, HQ, 3), empty(batch, max_len, H, Dk),
                empty(batch, max_len, H, Dv), empty(batch, nc, H, Dk), empty(batch, nc, H, Dv),
                torch.zeros(batch, dtype=torch.int32, device=device), splits, work,
                configs=configs)
        out = {}
        for fn, args, grid, kwargs in calls:
            branch = STREAMING_KERNELS.get(fn.__name__)
            if branch is None or branch in out:
                continue
            kernel = fn.warmup(*args, grid=grid, **kwargs)
            kernel._init_handles()
            out[branch] = programs_per_sm(kernel.n_regs, kernel.metadata.num_warps,
                                          kernel.metadata.shared)
            log.info("nsagen: %s uses %d registers a thread, %d B shared, %d warps: %d "
                     "programs per SM", fn.__name__, kernel.n_regs, kernel.metadata.shared,
                     kernel.metadata.num_warps, out[branch])
        return out
    except Exception as err:    # inspection is an optimisation: never fail a cache over it
        log.warning("nsagen: could not read the decode kernels' occupancy (%s); splitting by "
                    "shared memory alone", str(err)[:200])
        return {}
