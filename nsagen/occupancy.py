"""How many programs of a compiled kernel an SM holds at once, from its registers and shared memory.

The decode split model (nsagen.ir.passes.decode_splits) counts waves of resident programs, and a
third of a wave more can change the best split. Shared memory alone overstates residency when a
kernel keeps tiles in registers, and the register count depends on the Triton version: at D=128,
G=16 `decode_cmp` compiles to about 140 registers a thread with Triton 3.6 (3 programs per H200
SM, as the shared-memory estimate says) and to 221 with Triton 3.9 (2 programs). On a GPU the
decode cache therefore compiles its streaming kernels first and reads what they use.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from .target import Target, current
from .tune.compile import recording

log = logging.getLogger("nsagen")

REG_ALLOC_UNIT = 256          # registers are given to a warp in units of 256
SMEM_RESERVED = 1024          # shared memory the driver reserves per program
STREAMING_KERNELS = {"decode_cmp": "cmp", "decode_slc": "slc", "decode_win": "slc"}


def programs_per_sm(n_regs: int, num_warps: int, shared: int, target: Target | None = None) -> int:
    """Programs (CTAs) of one kernel resident on an SM of `target`: the least of what its
    registers, its shared memory, the warp slots and the program slots allow (at least 1)."""
    t = target or current()
    per_warp = -(-max(1, n_regs) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = t.regs_per_sm // (per_warp * num_warps)
    by_smem = t.smem_per_sm // (shared + SMEM_RESERVED)
    return max(1, min(by_regs, by_smem, t.max_warps_per_sm // num_warps, t.max_programs_per_sm))


def decode_residency(step: Callable[[], object], target: Target | None = None) -> dict[str, int]:
    """{"cmp": programs per SM of decode_cmp, "slc": of decode_slc (or decode_win)}, compiled
    for the current GPU with the configs `step` (one decode step, on the cache's own tensors)
    launches them with. The step's launches are recorded, not run; compiling them here is what
    the first step would do anyway. Returns {} when a kernel cannot be inspected (the split model
    then keeps its shared-memory count)."""
    calls: list = []
    try:
        with recording(calls), torch.no_grad():
            step()
        out = {}
        for fn, args, grid, kwargs in calls:
            branch = STREAMING_KERNELS.get(fn.__name__)
            if branch is None or branch in out:
                continue
            kernel = fn.warmup(*args, grid=grid, **kwargs)
            kernel._init_handles()
            out[branch] = programs_per_sm(kernel.n_regs, kernel.metadata.num_warps,
                                          kernel.metadata.shared, target)
            log.info("nsagen: %s uses %d registers a thread, %d B shared, %d warps: %d "
                     "programs per SM", fn.__name__, kernel.n_regs, kernel.metadata.shared,
                     kernel.metadata.num_warps, out[branch])
        return out
    except Exception as err:    # inspection is an optimisation: never fail a cache over it
        log.warning("nsagen: could not read the decode kernels' occupancy (%s); splitting by "
                    "shared memory alone", str(err)[:200])
        return {}
