"""The module cache: generated sources written atomically under their URI + hash, then imported.

Location: $NSAGEN_CACHE_DIR or ~/.cache/nsagen. The same name is used for the file, the log
lines and the imported module, so what ran can always be found on disk.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger("nsagen")


def cache_dir() -> Path:
    """Root of the user cache."""
    root = os.environ.get("NSAGEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nsagen")
    return Path(root)


def modules_dir() -> Path:
    d = cache_dir() / "modules"
    d.mkdir(parents=True, exist_ok=True)
    return d


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write via a temp file in the same folder and os.replace: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def import_file(name: str, path: Path) -> ModuleType:
    """Import (or return the already imported) module `name` from `path`."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


@contextlib.contextmanager
def uri_lock(name: str, timeout: float = 600.0):
    """An exclusive lock per URI (<cache>/locks/<name>.lock) across processes.

    It is an flock on an open file: the kernel drops it when the holder exits or is killed, so a
    dead process never leaves a lock behind that blocks the next run.
    """
    d = cache_dir() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.lock"
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("nsagen: waiting for another process building %s", name)
                    waited = True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: still locked after {timeout:.0f} s") from None
                time.sleep(0.05)
        try:
            yield path
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load_module(name: str, source: str) -> tuple[ModuleType, Path, bool]:
    """Write `source` as <cache>/modules/<name>.py unless an identical file is there; import it.

    Writing happens under the URI's lock and atomically, so concurrent builds of one spec never
    see a half-written module. Returns (module, path, reused).
    """
    path = modules_dir() / f"{name}.py"
    with uri_lock(name):
        reused = path.is_file() and path.read_text() == source
        if not reused:
            atomic_write(path, source)
            log.info("nsagen: generated %s -> %s", name, path)
        else:
            log.debug("nsagen: reusing %s", path)
    return import_file(name, path), path, reused


def entries() -> list[dict]:
    """What the user cache holds: generated modules and tuned tables, with sizes."""
    out = []
    for p in sorted(modules_dir().glob("*.py")):
        out.append(dict(kind="module", name=p.stem, path=str(p), bytes=p.stat().st_size))
    tables = cache_dir() / "autotune"
    if tables.is_dir():
        for p in sorted(tables.glob("*/*.json")):
            out.append(dict(kind="tuned", name=p.stem, gpu=p.parent.name, path=str(p),
                            bytes=p.stat().st_size))
    return out


def clear(uri_prefix: str | None = None) -> list[Path]:
    """Delete cached modules and tuned tables (all, or those whose name starts with the prefix)."""
    removed = []
    for e in entries():
        if uri_prefix is None or e["name"].startswith(uri_prefix):
            p = Path(e["path"])
            with uri_lock(e["name"]):
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
