"""The spec language: load a YAML layer description, validate it, and freeze it.

A :class:`Spec` is the single source of truth for one NSA layer. Every later stage (IR, codegen,
cache keys, reference, cost model) reads it, so validation happens here, once, with errors that
name the file, the key, the value and the rule that was broken.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

BRANCHES = ("cmp", "slc", "win")
DTYPES = ("float32", "float16", "bfloat16")
COMPRESSION_KINDS = ("mean", "linear", "mlp")
KV_MODES = ("shared", "separate")

# Schema: top-level key -> either a type, or a dict of sub-key -> type.
_SCHEMA: dict[str, Any] = {
    "name": str,
    "heads": {"q": int, "kv": int},
    "head_dim": {"qk": int, "v": int},
    "dtype": str,
    "compression": {"block": int, "stride": int, "kind": str},
    "selection": {"block": int, "count": int, "initial": int, "local": int},
    "window": int,
    "branches": list,
    "kv_per_branch": str,
    "scale": float,
}
_REQUIRED = ("name", "heads", "head_dim")

# Paper defaults (Yuan et al. 2025, section 4): l=32, d=16, l'=64, n=16 with 1 initial + 2 local
# forced blocks, w=512, learned MLP compression.
_DEFAULTS = {
    "dtype": "bfloat16",
    "compression": {"block": 32, "stride": 16, "kind": "mlp"},
    "selection": {"block": 64, "count": 16, "initial": 1, "local": 2},
    "window": 512,
    "branches": list(BRANCHES),
    "kv_per_branch": "shared",
}

_DTYPE_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


class SpecError(ValueError):
    """A spec broke a rule. The message names the source, the key, the value and the rule."""

    def __init__(self, source: str, key: str, value: Any, rule: str):
        self.source, self.key, self.value, self.rule = source, key, value, rule
        super().__init__(f"{source}: {key}: {value!r}: {rule}")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(options)})"


def _check_type(source: str, key: str, value: Any, want: type) -> Any:
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(source, key, value, "must be a number")
        return float(value)
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(source, key, value, "must be an integer")
        return value
    if not isinstance(value, want):
        raise SpecError(source, key, value, f"must be a {want.__name__}")
    return value


@dataclass(frozen=True)
class Spec:
    """One NSA layer: head counts and dims, block sizes, branches. Frozen and hashable."""

    name: str
    heads_q: int
    heads_kv: int
    dim_qk: int
    dim_v: int
    dtype: str = "bfloat16"
    cmp_block: int = 32
    cmp_stride: int = 16
    cmp_kind: str = "mlp"
    slc_block: int = 64
    slc_count: int = 16
    slc_initial: int = 1
    slc_local: int = 2
    window: int | None = 512
    branches: tuple[str, ...] = BRANCHES
    kv_per_branch: str = "shared"
    scale: float | None = None
    source: str = field(default="<dict>", compare=False, hash=False, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "Spec":
        """Validate a parsed spec mapping and build a Spec; raises SpecError naming what is wrong."""
        if not isinstance(d, Mapping):
            raise SpecError(source, "<root>", d, "a spec must be a mapping of keys to values")
        for key in d:
            if key not in _SCHEMA:
                raise SpecError(source, str(key), d[key], "unknown key" + _suggest(str(key), _SCHEMA))
        for key in _REQUIRED:
            if key not in d:
                raise SpecError(source, key, None, "required key is missing")
        vals: dict[str, Any] = {}
        for key, want in _SCHEMA.items():
            if isinstance(want, dict):
                raw = d.get(key, _DEFAULTS.get(key))
                if key == "head_dim" and isinstance(raw, int) and not isinstance(raw, bool):
                    raw = {"qk": raw, "v": raw}
                if not isinstance(raw, Mapping):
                    raise SpecError(source, key, raw, f"must be a mapping with keys {', '.join(want)}")
                defaults = _DEFAULTS.get(key, {})
                for sub in raw:
                    if sub not in want:
                        raise SpecError(source, f"{key}.{sub}", raw[sub],
                                        "unknown key" + _suggest(str(sub), want))
                for sub, subtype in want.items():
                    if sub in raw:
                        vals[f"{key}.{sub}"] = _check_type(source, f"{key}.{sub}", raw[sub], subtype)
                    elif sub in defaults:
                        vals[f"{key}.{sub}"] = defaults[sub]
                    else:
                        raise SpecError(source, f"{key}.{sub}", None, "required key is missing")
            elif key in d:
                if key == "window" and d[key] is None:
                    vals[key] = None
                else:
                    vals[key] = _check_type(source, key, d[key], want)
            elif key in _DEFAULTS:
                vals[key] = _DEFAULTS[key]
            else:
                vals[key] = None

        branches = vals["branches"]
        if not branches:
            raise SpecError(source, "branches", branches, "must list at least one of cmp, slc, win")
        for b in branches:
            if b not in BRANCHES:
                raise SpecError(source, "branches", b, f"unknown branch; choose from {', '.join(BRANCHES)}")
        if len(set(branches)) != len(branches):
            raise SpecError(source, "branches", branches, "a branch is listed twice")
        branches = tuple(b for b in BRANCHES if b in branches)  # canonical order
        if "win" in branches and "window" in d and d["window"] is None:
            raise SpecError(source, "window", None, "'win' is a branch, so window must be a positive integer")
        window = vals["window"] if "win" in branches else None

        spec = cls(
            name=vals["name"], heads_q=vals["heads.q"], heads_kv=vals["heads.kv"],
            dim_qk=vals["head_dim.qk"], dim_v=vals["head_dim.v"], dtype=vals["dtype"],
            cmp_block=vals["compression.block"], cmp_stride=vals["compression.stride"],
            cmp_kind=vals["compression.kind"], slc_block=vals["selection.block"],
            slc_count=vals["selection.count"], slc_initial=vals["selection.initial"],
            slc_local=vals["selection.local"], window=window, branches=branches,
            kv_per_branch=vals["kv_per_branch"], scale=vals["scale"], source=source,
        )
        spec._validate()
        return spec

    def _validate(self) -> None:
        src = self.source
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise SpecError(src, "name", self.name, "must be non-empty letters, digits, '-', '_' or '.'")
        positive = {
            "heads.q": self.heads_q, "heads.kv": self.heads_kv, "head_dim.qk": self.dim_qk,
            "head_dim.v": self.dim_v, "compression.block": self.cmp_block,
            "compression.stride": self.cmp_stride, "selection.block": self.slc_block,
            "selection.count": self.slc_count,
        }
        if self.window is not None:
            positive["window"] = self.window
        for key, val in positive.items():
            if val <= 0:
                raise SpecError(src, key, val, "must be a positive integer")
        for key, val in {"selection.initial": self.slc_initial, "selection.local": self.slc_local}.items():
            if val < 0:
                raise SpecError(src, key, val, "must be a non-negative integer")
        if self.heads_q % self.heads_kv:
            raise SpecError(src, "heads.q", self.heads_q,
                            f"must be a multiple of heads.kv ({self.heads_kv}): HQ % H == 0")
        if self.dtype not in DTYPES:
            raise SpecError(src, "dtype", self.dtype, f"unknown dtype; choose from {', '.join(DTYPES)}")
        if self.cmp_kind not in COMPRESSION_KINDS:
            raise SpecError(src, "compression.kind", self.cmp_kind,
                            f"unknown compression kind; choose from {', '.join(COMPRESSION_KINDS)}")
        if self.kv_per_branch not in KV_MODES:
            raise SpecError(src, "kv_per_branch", self.kv_per_branch,
                            f"choose from {', '.join(KV_MODES)}")
        if self.cmp_block % self.cmp_stride:
            raise SpecError(src, "compression.stride", self.cmp_stride,
                            f"must divide compression.block ({self.cmp_block}): d | l")
        if self.slc_block % self.cmp_stride:
            raise SpecError(src, "compression.stride", self.cmp_stride,
                            f"must divide selection.block ({self.slc_block}): d | l'")
        if self.slc_initial + self.slc_local > self.slc_count:
            raise SpecError(src, "selection.count", self.slc_count,
                            f"must be at least selection.initial + selection.local "
                            f"({self.slc_initial} + {self.slc_local}): n_init + n_local <= n")
        if self.scale is not None and not self.scale > 0:
            raise SpecError(src, "scale", self.scale, "must be a positive number")

    # ------------------------------------------------------------------ derived values
    @property
    def group(self) -> int:
        """G: query heads per KV head."""
        return self.heads_q // self.heads_kv

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.dim_qk ** -0.5

    @property
    def learned_compression(self) -> bool:
        return self.cmp_kind != "mean"

    def num_cmp(self, seq_len: int) -> int:
        """Nc(T): compressed tokens of a sequence of length T."""
        if seq_len < self.cmp_block:
            return 0
        return (seq_len - self.cmp_block) // self.cmp_stride + 1

    def num_blocks(self, seq_len: int) -> int:
        """Selection blocks covering a sequence of length T."""
        return -(-seq_len // self.slc_block)

    def has(self, branch: str) -> bool:
        return branch in self.branches

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        """The canonical YAML-able mapping (round-trips through from_dict)."""
        d: dict[str, Any] = {
            "name": self.name,
            "heads": {"q": self.heads_q, "kv": self.heads_kv},
            "head_dim": {"qk": self.dim_qk, "v": self.dim_v},
            "dtype": self.dtype,
            "compression": {"block": self.cmp_block, "stride": self.cmp_stride, "kind": self.cmp_kind},
            "selection": {"block": self.slc_block, "count": self.slc_count,
                          "initial": self.slc_initial, "local": self.slc_local},
            "window": self.window,
            "branches": list(self.branches),
            "kv_per_branch": self.kv_per_branch,
        }
        if self.scale is not None:
            d["scale"] = self.scale
        return d

    def digest(self) -> str:
        """Content hash of the semantic fields (the name does not change kernels)."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    @property
    def uri(self) -> str:
        """Readable identifier of the layer, e.g. nsa_bf16_qk192_v128_h4g16_c32s16mlp_b64n16i1l2_w512.

        Every semantic field appears, so two different layers never share a URI.
        """
        parts = [
            "nsa", _DTYPE_SHORT[self.dtype], f"qk{self.dim_qk}", f"v{self.dim_v}",
            f"h{self.heads_kv}g{self.group}",
        ]
        if self.has("cmp") or self.has("slc"):
            parts.append(f"c{self.cmp_block}s{self.cmp_stride}{self.cmp_kind}")
        if self.has("slc"):
            parts.append(f"b{self.slc_block}n{self.slc_count}i{self.slc_initial}l{self.slc_local}")
        if self.has("win"):
            parts.append(f"w{self.window}")
        if self.branches != BRANCHES:
            parts.append("only-" + "-".join(self.branches))
        if self.kv_per_branch == "separate":
            parts.append("sep")
        if self.scale is not None:
            parts.append(f"sc{self.scale:g}".replace(".", "p").replace("-", "m"))
        return "_".join(parts)

    def replace(self, **changes: Any) -> "Spec":
        """A copy with some fields changed, validated and normalised exactly like from_dict
        (e.g. a scaled-down test spec)."""
        d = asdict(self)
        d.update(changes)
        d["branches"] = tuple(d["branches"])
        return Spec.from_dict(Spec(**d).to_dict(), source=self.source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(path: str, err: yaml.YAMLError) -> SpecError:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
    problem = getattr(err, "problem", None) or str(err)
    return SpecError(path, f"<yaml {where}>", None, f"malformed YAML: {problem}")


def load_spec(path: str | Path) -> Spec:
    """Load and validate a YAML spec file. Also accepts the name of a shipped spec (e.g. 'nsa-paper')."""
    p = Path(path)
    if not p.exists():
        from .resources import shipped_spec_path

        shipped = shipped_spec_path(str(path))
        if shipped is None:
            raise FileNotFoundError(f"spec file not found: {path}")
        p = shipped
    text = p.read_text()
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise _yaml_error(str(p), err) from None
    if data is None:
        raise SpecError(str(p), "<root>", None, "the file is empty")
    return Spec.from_dict(data, source=str(p))
