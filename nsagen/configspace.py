"""Launch configs: the candidates `nsagen tune` tries, and which configs are valid at all.

Each forward and backward kernel's space comes from its definition (nsagen.kernels), pruned
before anything compiles: tiles must satisfy the templates' static asserts and fit the Target's
shared memory and a register estimate. What is left is ordered nearest the IR's default first
(after the definition's likely winners) and capped per phase. The decode kernels' space is read
off their default configs. Tuned tables and explicit overrides are checked here too.
"""
from __future__ import annotations

from typing import Any, Mapping

from .kernels import KERNELS
from .spec import Spec
from .target import Target, current

MAX_CANDIDATES = {"forward": 6, "backward": 4, "decode": 8}


def _order(cands: list[dict], default: dict, limit: int | None,
           first: list[dict] = ()) -> list[dict]:
    """Unique candidates, the default first, then `first` (likely winners), then by how many
    parameters differ from the default (one change before two), capped at `limit`."""
    seen, uniq = set(), []
    for c in [dict(default)] + list(first) + cands:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    head = uniq[:1] + [c for c in uniq[1:] if c in first]
    rest = [c for c in uniq[1:] if c not in first]
    rest.sort(key=lambda c: sum(c.get(k) != v for k, v in default.items()))
    out = head + rest
    return out[:limit] if limit else out


def candidates(spec: Spec, kernel: str, default: dict, target: Target | None = None,
               limit: int | None = -1, smem_limit: int | None = None) -> list[dict]:
    """Configs to try for one forward or backward kernel (the default first): its definition's
    space (nsagen.kernels), pruned by the target's shared memory per program (or `smem_limit`),
    the templates' constraints and a register estimate against the target's per-thread limit;
    the likely winners next, then nearest the default, at most `limit` (-1: the phase's cap,
    None: all)."""
    target = target or current()
    smem = target.smem_per_block if smem_limit is None else smem_limit
    kdef = KERNELS[kernel]
    out, first = kdef.space(spec, default, target, smem)
    if limit == -1:
        limit = MAX_CANDIDATES[kdef.phase]
    return _order(out, default, limit, first)


def decode_candidates(spec: Spec, kernel: str, default: dict,
                      limit: int | None = -1) -> list[dict]:
    """Configs to try for one decode kernel: its definition's space (read off the parameters its
    default config has), nearest the default first, at most `limit` (-1: the phase's cap)."""
    out, first = KERNELS[kernel].space(spec, default, current(), 0)
    return _order(out, default, MAX_CANDIDATES["decode"] if limit == -1 else limit, first)


def split_candidates(spec: Spec, base: dict) -> list[dict]:
    """Split counts to try around the IR's choice (first): half and twice the compressed-pass
    splits, and the neighbouring selected-blocks-per-program counts."""
    out = [dict(base)]
    if "cmp" in base and (spec.has("cmp") or spec.has("slc")):
        for n in (base["cmp"] * 2, base["cmp"] // 2):
            if n >= 1:
                out.append(dict(base, cmp=n))
    if "slc_blocks" in base and spec.has("slc"):
        n = spec.slc_count
        for spb in (base["slc_blocks"] * 2, base["slc_blocks"] // 2):
            if 1 <= spb <= n:
                out.append(dict(base, slc_blocks=-(-n // -(-n // spb))))   # balanced groups
    return _order(out, base, None)


# ---------------------------------------------------------------------------- validity
_WARPS = (1, 2, 4, 8, 16, 32)
_TILE_MAX = 1024          # a tile dimension (a `B*` parameter) is a power of two up to this
_COUNT_MAX = 1 << 20      # loop counts and chunk lengths (QC, CHUNK_ITERS)
SPLIT_KEYS = ("cmp", "cmp_quantum", "slc_blocks", "win_keys")


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _param_error(key: str, val: int, default: Mapping[str, int]) -> str | None:
    """Why one launch parameter is out of range, or None."""
    if key == "GP":
        return None if val == default[key] else f"must be {default[key]} (set by the GQA group)"
    if key in ("num_warps", "WARPS_KV", "WARPS_DS"):
        return None if val in _WARPS else f"must be one of {_WARPS}"
    if key in ("num_stages", "STAGES_KV"):
        return None if 1 <= val <= 8 else "must be in 1..8"
    if key in ("MERGE", "HFAST", "KROWS", "KT", "SPLIT_S", "STORE_DS", "TMA", "FUSE_DQ"):
        return None if val in (0, 1) else "must be 0 or 1"
    if key == "CAP":                                   # 0: no candidate lists
        return None if 0 <= val <= _COUNT_MAX else f"must be in 0..{_COUNT_MAX}"
    if key == "RANK_MAX":
        return None if val == 0 or (_pow2(val) and val <= _TILE_MAX) else \
            f"must be 0 or a power of two up to {_TILE_MAX}"
    if key.startswith("B"):
        return None if _pow2(val) and val <= _TILE_MAX else \
            f"must be a power of two in 1..{_TILE_MAX}"
    return None if 1 <= val <= _COUNT_MAX else f"must be in 1..{_COUNT_MAX}"


def config_error(cfg: Any, default: Mapping[str, int]) -> str | None:
    """Why `cfg` cannot launch the kernel whose default config is `default` (None if it can):
    exactly the default's parameters, each an integer in its range."""
    if not isinstance(cfg, Mapping):
        return "must be a mapping of parameter names to integers"
    missing = [k for k in default if k not in cfg]
    extra = [str(k)[:24] for k in cfg if k not in default]
    if missing:
        return f"missing {', '.join(missing)}"
    if extra:
        return f"unknown parameter(s) {', '.join(extra[:4])}"
    for key in default:
        val = cfg[key]
        if isinstance(val, bool) or not isinstance(val, int):
            return f"{key} must be an integer"
        why = _param_error(key, val, default)
        if why:
            return f"{key}={val}: {why}"
    return None


def table_entry_error(spec: Spec, kernel: str, cfg: Any, default: Mapping[str, int],
                      decode: bool) -> str | None:
    """Why a tuned-table entry cannot be used (None if it can): it must be valid and one of the
    configs the tuner could have chosen for this kernel (the default included)."""
    why = config_error(cfg, default)
    if why or dict(cfg) == dict(default):
        return why
    space = (decode_candidates(spec, kernel, dict(default), limit=None) if decode
             else candidates(spec, kernel, dict(default), smem_limit=1 << 30, limit=None))
    return None if dict(cfg) in space else "not in the kernel's config space"


def splits_error(spec: Spec, splits: Any) -> str | None:
    """Why a decode split override cannot be used (None if it can)."""
    if not isinstance(splits, Mapping):
        return "must be a mapping of split names to integers"
    for key, val in splits.items():
        if key not in SPLIT_KEYS:
            return f"unknown split {str(key)[:24]!r} (one of {', '.join(SPLIT_KEYS)})"
        if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= 4096:
            return f"{key} must be an integer in 1..4096"
    if splits.get("slc_blocks", 1) > spec.slc_count:
        return f"slc_blocks must be at most selection.count ({spec.slc_count})"
    return None


def decode_tile_error(spec: Spec, configs: Mapping[str, Mapping], splits: Mapping[str, int]
                      ) -> str | None:
    """Why decode_cmp's compressed tile cannot run with these splits (None if it can): a
    split's chunk of selection blocks (a multiple of cmp_quantum) must start on a whole tile of
    BC compressed keys, BC / (l'/d) blocks."""
    cfg = configs.get("decode_cmp")
    if not cfg or "BC" not in cfg or "cmp_quantum" not in splits:
        return None
    r2 = spec.slc_block // spec.cmp_stride
    if cfg["BC"] % r2 or splits["cmp_quantum"] % (cfg["BC"] // r2):
        return (f"decode_cmp's BC={cfg['BC']} must be a multiple of l'/d={r2} whose blocks "
                f"(BC / (l'/d)) divide the split quantum cmp_quantum={splits['cmp_quantum']}")
    return None


class ConfigOverrides(dict):
    """Per-kernel launch configs that win over tuned tables: kernel name -> {parameter: int}.

    An entry may name only the parameters it changes; it is completed from the kernel's default
    config and checked (nsagen.config_error) when it is set, so an invalid override
    fails at assignment with the kernel and parameter named, never as a wrong result."""

    def __init__(self, defaults: dict[str, dict], items=None):
        super().__init__()
        self._defaults = defaults
        self.update(items or {})

    def __setitem__(self, kernel: str, cfg) -> None:
        if kernel not in self._defaults:
            shown = str(kernel)[:40]
            raise ValueError(f"configs: unknown kernel {shown!r}; this module's kernels are "
                             f"{', '.join(sorted(self._defaults))}")
        if not isinstance(cfg, dict):
            raise TypeError(f"configs[{kernel!r}]: expected a dict of launch parameters, got "
                            f"{type(cfg).__name__}")
        full = dict(self._defaults[kernel], **cfg)
        why = config_error(full, self._defaults[kernel])
        if why:
            raise ValueError(f"configs[{kernel!r}]: {why}")
        super().__setitem__(kernel, full)

    def update(self, other=(), **kw) -> None:
        for kernel, cfg in dict(other, **kw).items():
            self[kernel] = cfg

    def setdefault(self, kernel, cfg=None):
        if kernel not in self:
            self[kernel] = cfg if cfg is not None else {}
        return self[kernel]
