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


def modules_dir(create: bool = True) -> Path:
    """Where generated modules live (created unless `create` is False)."""
    d = cache_dir() / "modules"
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write via a temp file in the same folder and os.replace: readers see old or new, never half.

    The file gets the permissions any new file of this process gets (0666 under the umask), so a
    cache shared by a group stays readable; temp files are private only while being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files that an interrupted atomic_write of `path` left behind. Call it only
    while holding the lock that serialises writers of `path`."""
    removed = []
    for p in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


INTERPRETED = "__interpreted"    # suffix of a module imported under Triton's interpreter


def interpreting() -> bool:
    """Whether Triton's interpreter is on. A generated module's kernels are bound to the mode
    it was imported under, so each mode imports its own copy (`import_file`)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def plain_name(module: ModuleType) -> str:
    """A generated module's name as its file has it, whichever mode imported it."""
    return module.__name__.removesuffix(INTERPRETED)


def import_file(name: str, path: Path) -> ModuleType:
    """Import (or return the already imported) module `name` from `path`; under Triton's
    interpreter it is imported as `name`__interpreted (its kernels differ)."""
    if interpreting():
        name += INTERPRETED
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
    dead process never leaves a lock that blocks the next run. The holder deletes the lock file
    when it is done; a waiter that then holds the lock of a deleted file tries again, so two
    processes never both hold the lock of one name, and lock files do not pile up.
    """
    d = cache_dir() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.lock"
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        f = open(path, "a+")
        try:
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
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:           # the previous holder removed this file: lock the new one
                continue
            try:
                yield path
            finally:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return
        finally:
            f.close()


def load_module(name: str, source: str) -> tuple[ModuleType, Path, bool]:
    """Write `source` as <cache>/modules/<name>.py unless an identical file is there; import it.

    Writing happens under the URI's lock and atomically, so concurrent builds of one spec never
    see a half-written module; temp files of a killed build are removed, and a module that fails
    to import is deleted again, so the cache never keeps a broken file. Returns (module, path,
    reused).
    """
    path = modules_dir() / f"{name}.py"
    with uri_lock(name):
        remove_stale_temps(path)
        reused = path.is_file() and path.read_text() == source
        if not reused:
            atomic_write(path, source)
            log.info("nsagen: generated %s -> %s", name, path)
        else:
            log.debug("nsagen: reusing %s", path)
        try:
            return import_file(name, path), path, reused
        except BaseException:
            path.unlink(missing_ok=True)
            raise


def _module_uri(name: str) -> str:
    """The URI part of a module name (everything before the content hash)."""
    return name.rsplit("_", 1)[0]


def entries() -> list[dict]:
    """What the user cache holds: generated modules and tuned tables, with sizes. Reading the
    cache creates nothing (a read-only cache can be listed)."""
    out = []
    mods = modules_dir(create=False)
    if mods.is_dir():
        for p in sorted(mods.glob("*.py")):
            out.append(dict(kind="module", name=p.stem, path=str(p), bytes=p.stat().st_size))
    tables = cache_dir() / "autotune"
    if tables.is_dir():
        for p in sorted(tables.glob("*/*.json")):
            out.append(dict(kind="tuned", name=p.stem, gpu=p.parent.name, path=str(p),
                            bytes=p.stat().st_size))
    return out


def clear(uri: str | None = None) -> list[Path]:
    """Delete cached modules and tuned tables: all, or those of one layer URI exactly (every
    content hash of it, never another URI that merely starts the same). Temp files left by
    interrupted writes go too."""
    removed = []
    for e in entries():
        if uri is None or _module_uri(e["name"]) == uri:
            p = Path(e["path"])
            with uri_lock(e["name"]):
                p.unlink(missing_ok=True)
            removed.append(p)
    for folder in (modules_dir(create=False), *(cache_dir() / "autotune").glob("*")):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                if uri is None or _module_uri(p.name[1:].split(".")[0]) == uri:
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed
