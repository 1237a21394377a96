"""Every generated kernel (NSA forward, backward, decode; DSA), each defined once
(nsagen.kernels.base.KernelDef): its template, the rule for its default launch config and its
tunable config space. The IR's passes decide which kernels a spec needs and ask these
definitions for their configs; the config space (nsagen.configspace) asks them for candidates."""
from .backward import BACKWARD, dkdv_tile
from .base import KernelDef, dkdv_smem_bytes, regs, smem_bytes
from .decode import DECODE, DECODE_SELECT_TILE, decode_tiles
from .dsa import DSA
from .forward import FORWARD, inverse_map_launch

KERNELS: dict[str, KernelDef] = {k.name: k for k in FORWARD + BACKWARD + DECODE + DSA}

__all__ = ["DECODE_SELECT_TILE", "KERNELS", "KernelDef", "decode_tiles", "dkdv_tile",
           "dkdv_smem_bytes", "inverse_map_launch", "regs", "smem_bytes"]
