"""The module cache: generated sources written atomically under their URI + hash, then imported.

Location: $NSAGEN_CACHE_DIR or ~/.cache/nsagen. The same name is used for the file, the log
lines and the imported module, so what ran can always be found on disk.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
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


def load_module(name: str, source: str) -> tuple[ModuleType, Path, bool]:
    """Write `source` as <cache>/modules/<name>.py unless an identical file is there; import it.

    Returns (module, path, reused).
    """
    path = modules_dir() / f"{name}.py"
    reused = path.is_file() and path.read_text() == source
    if not reused:
        atomic_write(path, source)
        log.info("nsagen: generated %s -> %s", name, path)
    else:
        log.debug("nsagen: reusing %s", path)
    return import_file(name, path), path, reused
