"""Where and how generated kernels launch: the device check, the interpreter's dtype rule, the
packed layout of arguments, and launches that bypass torch.library's dispatch.

This sits below the op, the decode cache and the tuner, which all launch module functions.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Iterator

import torch
from torch._guards import TracingContext, detect_fake_mode

from .cache import interpreting

try:  # torch >= 2.6: launches outside a registered op can skip wrap_triton's dispatch
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:
    set_wrap_triton_enabled = None


def direct_launches():
    """Context for launches outside the registered ops (inference, decode steps): kernels go
    straight to Triton. wrap_triton otherwise dispatches each launch through a higher-order op,
    which costs hundreds of microseconds per kernel in eager mode (the registered ops turn it
    off themselves when they run eagerly). Under torch.compile the launches stay traceable."""
    if torch.compiler.is_compiling() or set_wrap_triton_enabled is None:
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)


@contextlib.contextmanager
def decode_pdl(module, on: bool) -> Iterator[None]:
    """Within the context a module's decode kernels launch with programmatic dependent launch
    only if `on` (and the GPU has it): with it, a kernel starts while the one before it
    finishes, and a profiler's time for it counts that wait, so per-kernel timings run without
    it. The module's setting is restored after."""
    before = getattr(module, "DECODE_PDL", False)
    module.DECODE_PDL = bool(before and on)
    try:
        yield
    finally:
        module.DECODE_PDL = before


def opaque_op(name: str, fn):
    """Register `fn`, a function that launches generated kernels, as a torch.library custom op
    that torch.compile keeps whole: the compiled graph calls it as eager code does (direct
    launches, TMA descriptors and all) instead of tracing its kernels into the graph.

    Traced kernels are worse here: the compiler's analysis of a kernel's writes follows every
    loaded value that feeds an address back to its pointer, so kernels that gather (most of
    ours) seem to write all their inputs, which it then copies before each launch. The fake
    implementation runs the same Python on fake tensors, each launch a no-op through
    wrap_triton, so the shapes it reports are the real ones by construction."""

    @functools.wraps(fn)
    def real(*args):
        with direct_launches():
            return fn(*args)

    schema = torch.library.infer_schema(fn, mutates_args=())   # fn's annotations, fn's globals
    op = torch.library.custom_op(name, real, mutates_args=(), schema=schema)
    op.register_fake(fn)
    return op


_DISPATCH_MODES = getattr(torch._C, "_len_torch_dispatch_stack", None)   # active modes


def tracing() -> bool:
    """Inside torch.compile or fake-tensor tracing: launches must go through the registered
    ops (and tables built now must not outlive the trace)."""
    if torch.compiler.is_compiling():
        return True
    if TracingContext.try_get() is None and _DISPATCH_MODES is not None and not _DISPATCH_MODES():
        return False        # the eager case, without detect_fake_mode's host time
    return detect_fake_mode() is not None


_log = logging.getLogger("nsagen")
_noticed = []


def fallback_notice(device: torch.device) -> None:
    """Say once per process, as a log line and a warning, that an op runs the PyTorch reference
    because no generated kernel can run on `device`."""
    if not _noticed:
        _noticed.append(device)
        msg = (f"nsagen: no GPU for tensors on {device} and TRITON_INTERPRET is not 1; "
               "running the PyTorch reference instead of the generated kernels")
        _log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def kernels_available(device: torch.device) -> bool:
    """Whether generated kernels can run on tensors of this device."""
    return device.type == "cuda" or interpreting()


def interpreted_in_float32(t: torch.Tensor) -> bool:
    """Whether the generated kernels must see this tensor as float32: Triton's interpreter
    computes bfloat16 arithmetic and `tl.dot` wrongly, so on the CPU bfloat16 inputs run in
    float32 and the results are rounded back to bfloat16."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def pack(t: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T, ...] -> [B*T, ...] contiguous (a view when already contiguous)."""
    return None if t is None else t.reshape(-1, *t.shape[2:]).contiguous()
