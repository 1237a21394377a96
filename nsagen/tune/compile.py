"""Compiling kernel variants ahead of their first launch: passes run with Triton's launches
recorded instead of executed, and the distinct variants compile on worker threads."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, wait

import torch
from triton.runtime.jit import JITFunction

from ..launch import direct_launches
from .budget import Budget

try:  # host-side TMA descriptors, which some launches pass
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

log = logging.getLogger("nsagen")


def stand_in(t: torch.Tensor) -> torch.Tensor:
    """A one-element tensor that Triton specialises like `t`: the same dtype and device, and a
    data pointer 16-byte aligned exactly when t's is. Recorded launches keep these instead of
    the pass's own buffers, so the memory a pass allocates is freed when the pass returns, not
    when its variants have compiled (a 64k pass of a small-group spec allocates ~17 GB)."""
    base = torch.empty(2, dtype=t.dtype, device=t.device)
    return base[:1] if t.data_ptr() % 16 == 0 else base[1:]


def is_descriptor(x) -> bool:
    """Whether `x` is a host-side TMA descriptor."""
    return TensorDescriptor is not None and isinstance(x, TensorDescriptor)


def _stand_in_arg(x):
    """A launch argument as recorded: tensors and the tensors of descriptors as stand-ins."""
    if isinstance(x, torch.Tensor):
        return stand_in(x)
    if is_descriptor(x):
        return dataclasses.replace(x, base=stand_in(x.base))
    return x


@contextlib.contextmanager
def recording(calls: list):
    """Inside: Triton launches are recorded (kernel, args, grid, kwargs) instead of compiled
    and run, so a pass with candidate configs lists the variants it would compile. Launches
    are direct ones, as an eager call's (TMA descriptors are passed only there); tensor
    arguments are recorded as stand-ins (`stand_in`)."""
    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        args = tuple(_stand_in_arg(a) for a in args)
        kwargs = {k: _stand_in_arg(v) for k, v in kwargs.items()}
        calls.append((self, args, grid, kwargs))
        return None

    JITFunction.run = record
    try:
        with direct_launches():
            yield calls
    finally:
        JITFunction.run = real


def variant_key(fn, args, kwargs) -> tuple:
    """Launches that compile to the same binary share a key: positional integers count by what
    Triton specialises them on, keyword arguments (the constexprs, warps, stages) by value.
    Merging two variants by mistake only means one compiles at its first launch instead."""
    def norm(x, exact):
        if isinstance(x, torch.Tensor):
            return (str(x.dtype), x.data_ptr() % 16 == 0)
        if is_descriptor(x):
            return ("desc", str(x.base.dtype), tuple(x.block_shape))
        if isinstance(x, int) and not isinstance(x, bool) and not exact:
            return ("i", x == 1, x % 16 == 0)
        return repr(x)

    return (id(fn), tuple(norm(a, False) for a in args),
            tuple(sorted((k, norm(v, True)) for k, v in kwargs.items())))


class Compiler:
    """Compiles recorded kernel variants on worker threads, ahead of the timing rounds.
    `close` drops the compiles not started and waits for the running ones (Triton cannot stop
    them) and for the workers to exit."""

    started = False     # set once any Compiler ran in this process (see nsagen.cli.run)

    def __init__(self, workers: int | None = None):
        Compiler.started = True
        self.workers = workers or max(2, min(16, os.cpu_count() or 2))
        self.queue: queue.Queue = queue.Queue()
        self.threads = [threading.Thread(target=self._work, name=f"nsagen-compile-{i}",
                                         daemon=True) for i in range(self.workers)]
        for t in self.threads:
            t.start()
        self.seen: set = set()
        self.futures = []
        self.failed = 0

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            fut, job = item
            if fut.set_running_or_notify_cancel():
                self._compile(*job)
                fut.set_result(None)

    def record(self, passes) -> int:
        """Run each callable in `passes` with launches recorded; submit the new variants."""
        calls: list = []
        for p in passes:
            with recording(calls):
                try:
                    p()
                except Exception as err:  # a pass that cannot even be set up: timed as failing
                    log.info("nsagen tune: recording a pass failed: %s", str(err)[:120])
        n = 0
        for fn, args, grid, kwargs in calls:
            key = variant_key(fn, args, kwargs)
            if key in self.seen:
                continue
            self.seen.add(key)
            fut: Future = Future()
            self.queue.put((fut, (fn, args, grid, kwargs)))
            self.futures.append(fut)
            n += 1
        return n

    def _compile(self, fn, args, grid, kwargs):
        try:
            fn.run(*args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # rejected by the compiler: the timing round reports it
            self.failed += 1
            log.info("nsagen tune: %s %s does not compile: %s", getattr(fn, "__name__", fn),
                     {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)},
                     str(err)[:120])

    def wait(self, budget: Budget | None = None) -> None:
        left = None if budget is None or budget.deadline is None else max(0.0, budget.left())
        wait(self.futures, timeout=left)
        self.futures = [f for f in self.futures if not f.done()]

    def cancel(self) -> None:
        """Drop the compiles not started yet (those running finish: Triton cannot stop them)."""
        for f in self.futures:
            f.cancel()
        self.futures = []

    def close(self, timeout: float = 120.0) -> None:
        """Stop the workers and wait (up to `timeout` s) for them to exit: a process whose
        compile threads were still alive at exit has been seen to abort in the compiler's
        native teardown."""
        self.cancel()
        for _ in range(self.workers):
            self.queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
