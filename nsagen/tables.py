"""Tuned launch-config tables: JSON per GPU model and module, keyed on everything that matters.

A table is used only when its metadata matches this machine exactly (GPU name, compute
capability, SM count, Triton, torch and nsagen versions, module name); otherwise the kernels run
with the IR's default configs. Lookup goes by a shape bucket of the sequence length, so one
table covers short and long inputs; decode entries go by a bucket of the batch and one of the
cache capacity (`decode B<=8 T<=65536`) and hold the decode kernels' configs and the split
counts. Shipped tables live in `autotune/<gpu>/`, the user's own in `<cache>/autotune/<gpu>/`;
the user's win.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch
import triton

from . import __version__
from .cache import atomic_write, cache_dir
from .resources import data_dir

log = logging.getLogger("nsagen")

BUCKETS = (1024, 4096, 16384, 65536, 262144)
BATCH_BUCKETS = (1, 8, 64, 512)
DECODE_SPLITS = "splits"   # the key of a decode entry holding split counts, not a kernel


def bucket(seq_len: int) -> str:
    """The shape bucket of a sequence length: the smallest listed bound that holds it."""
    for b in BUCKETS:
        if seq_len <= b:
            return f"T<={b}"
    return f"T>{BUCKETS[-1]}"


def batch_bucket(batch: int) -> str:
    """The bucket of a decode batch size, e.g. 'B<=8'."""
    for b in BATCH_BUCKETS:
        if batch <= b:
            return f"B<={b}"
    return f"B>{BATCH_BUCKETS[-1]}"


def decode_bucket(batch: int, max_len: int) -> str:
    """The key of a decode entry: batch bucket and cache-capacity bucket, e.g.
    'decode B<=8 T<=65536'. Never equal to a sequence-length bucket."""
    return f"decode {batch_bucket(batch)} {bucket(max_len)}"


def device_meta(device: int | None = None) -> dict:
    """What a table must match: GPU model, compute capability, SM count, software versions."""
    meta = {"triton": triton.__version__, "torch": torch.__version__, "nsagen": __version__}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device if device is not None else 0)
        meta.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count)
    else:
        meta.update(gpu="cpu", capability="", sm_count=0)
    return meta


def gpu_slug(meta: dict) -> str:
    """Folder name of a GPU model, e.g. 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", meta["gpu"].lower()).strip("-") or "unknown"


def table_paths(module: str, meta: dict) -> list[Path]:
    """Where a table for this module and GPU may live: the user's first, then the shipped one."""
    slug = gpu_slug(meta)
    paths = [cache_dir() / "autotune" / slug / f"{module}.json"]
    try:
        paths.append(data_dir("autotune") / slug / f"{module}.json")
    except FileNotFoundError:
        pass
    return paths


def table_path_under(root: Path, module: str, meta: dict) -> Path:
    """Where a table goes under a tree laid out like `autotune/`: <root>/<gpu>/<module>.json."""
    return Path(root) / gpu_slug(meta) / f"{module}.json"


def save(module: str, meta: dict, buckets: dict[str, dict], path: Path | None = None) -> Path:
    """Write a table atomically (readers see the old table or the new one, never half)."""
    path = path or table_paths(module, meta)[0]
    doc = {"meta": dict(meta, module=module), "buckets": buckets}
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    log.info("nsagen: tuned table for %s written to %s", module, path)
    return path


def load(module: str, meta: dict,
         check: Callable[[str, str, Any], str | None] | None = None) -> dict[str, dict] | None:
    """The buckets of the first table whose metadata matches exactly, else None (untuned).

    `check(bucket, kernel, entry)` says why an entry cannot be used (None when it can): such
    entries are dropped, with one warning naming the file and the keys, and those kernels run
    their defaults. A file that is not a table at all is ignored with a warning."""
    want = dict(meta, module=module)
    for path in table_paths(module, meta):
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("nsagen: ignoring unreadable tuned table %s (%s)", path, _cut(err))
            continue
        if not (isinstance(doc, dict) and isinstance(doc.get("meta"), dict)
                and isinstance(doc.get("buckets"), dict)):
            log.warning("nsagen: ignoring tuned table %s: expected an object with 'meta' and "
                        "'buckets' objects", path)
            continue
        got = doc["meta"]
        diff = {k: (_cut(got.get(k)), v) for k, v in want.items() if got.get(k) != v}
        if diff:
            log.info("nsagen: %s does not match this machine %s; running untuned", path, diff)
            continue
        return _usable(doc["buckets"], check, path)
    return None


def _cut(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _usable(buckets: dict, check: Callable[[str, str, Any], str | None] | None,
            path: Path) -> dict[str, dict]:
    """The entries of a table's buckets that `check` accepts; one warning lists the others."""
    out: dict[str, dict] = {}
    dropped: list[str] = []
    for key, entry in buckets.items():
        if not isinstance(entry, dict):
            dropped.append(f"{_cut(key, 40)}: not an object")
            continue
        kept = {}
        for kernel, cfg in entry.items():
            why = check(key, kernel, cfg) if check else None
            if why:
                dropped.append(f"{_cut(key, 40)} / {_cut(kernel, 40)}: {why}")
            else:
                kept[kernel] = cfg
        out[key] = kept
    if dropped:
        more = f" (and {len(dropped) - 8} more)" if len(dropped) > 8 else ""
        log.warning("nsagen: tuned table %s: dropped %d invalid entr%s, whose kernels run their "
                    "default configs: %s%s", path, len(dropped), "y" if len(dropped) == 1 else "ies",
                    "; ".join(dropped[:8]), more)
    return out


def configs_for(tables: dict[str, dict] | None, seq_len: int) -> dict:
    """Kernel configs of the bucket holding `seq_len` ({} when untuned: defaults apply)."""
    if not tables:
        return {}
    return dict(tables.get(bucket(seq_len), {}))


def decode_configs_for(tables: dict[str, dict] | None, batch: int,
                       max_len: int) -> tuple[dict, dict]:
    """(decode kernel configs, split counts) of the decode entry for this batch and cache
    capacity; ({}, {}) when untuned: the IR's defaults and split rule apply."""
    if not tables:
        return {}, {}
    entry = tables.get(decode_bucket(batch, max_len)) or {}
    configs = {k: dict(v) for k, v in entry.items() if k != DECODE_SPLITS}
    return configs, dict(entry.get(DECODE_SPLITS, {}))
