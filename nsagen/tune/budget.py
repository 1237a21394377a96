"""The tuner's clock: a per-spec time budget and a progress bar. The bottom of nsagen.tune."""
from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("nsagen")


class Budget:
    """A per-spec time limit: the search stops between rounds once it is spent, keeping the
    best found so far, and says so once."""

    def __init__(self, seconds: float | None, progress=print, on_spent=None):
        self.start = time.monotonic()
        unbounded = seconds is None or seconds == math.inf
        self.deadline = None if unbounded else self.start + seconds
        self.progress = progress
        self.on_spent = on_spent    # e.g. drop the compiles still queued
        self.hit = False

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def spent(self, where: str = "") -> bool:
        if self.left() > 0:
            return False
        if not self.hit:
            self.hit = True
            msg = (f"nsagen tune: budget of {self.deadline - self.start:.0f} s reached"
                   f"{' during ' + where if where else ''}; keeping the best configs found so far "
                   "(defaults where nothing was timed)")
            log.warning(msg)
            self.progress(msg)
            if self.on_spent is not None:
                self.on_spent()
        return True


def bar(i: int, n: int, width: int = 20) -> str:
    full = width * i // max(1, n)
    return "[" + "#" * full + "." * (width - full) + f"] {i}/{n}"
