"""The spec language: load a YAML layer description, validate it, and freeze it.

A :class:`Spec` is the single source of truth for one NSA layer. Every later stage (IR, codegen,
cache keys, reference, cost model) reads it, so validation happens here, whenever a Spec is built
(constructor, from_dict, replace), with errors that name the file, the key, the value (cut short)
and the rule that was broken. Every size is bounded by what the generated kernels support
(`BOUNDS`); spec files are read by a YAML loader that refuses what a spec never needs.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple


FAMILIES = ("nsa", "dsa")   # the `attention` key: NSA (this module) or DSA (nsagen.dsa_spec)
BRANCHES = ("cmp", "slc", "win")
DTYPES = ("float32", "float16", "bfloat16")
COMPRESSION_KINDS = ("mean", "linear", "mlp")
KV_MODES = ("shared", "separate")

# Schema: top-level key -> either a type, or a dict of sub-key -> type.
_SCHEMA: dict[str, Any] = {
    "attention": str,
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

# Dataclass field -> (spec key, type). Every field of Spec except `source` is listed.
_FIELDS: dict[str, tuple[str, type]] = {
    "name": ("name", str), "heads_q": ("heads.q", int), "heads_kv": ("heads.kv", int),
    "dim_qk": ("head_dim.qk", int), "dim_v": ("head_dim.v", int), "dtype": ("dtype", str),
    "cmp_block": ("compression.block", int), "cmp_stride": ("compression.stride", int),
    "cmp_kind": ("compression.kind", str), "slc_block": ("selection.block", int),
    "slc_count": ("selection.count", int), "slc_initial": ("selection.initial", int),
    "slc_local": ("selection.local", int), "window": ("window", int),
    "branches": ("branches", tuple), "kv_per_branch": ("kv_per_branch", str),
    "scale": ("scale", float),
}
_OPTIONAL = ("window", "scale")      # fields that may be None

NAME_MAX = 64
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
# A float literal as written in a spec: digits, an optional fraction, an optional exponent.
_FLOAT_LITERAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class Bound(NamedTuple):
    """The range one size may take, and why: the generated kernels' limits.

    `of` reads a derived quantity (written `what` in the error) instead of the key's own field;
    `pow2`, when set, is why the kernels need a power of two (checked by Spec.check_kernels:
    the reference takes any size, so the rule binds only where kernels are generated).
    """

    key: str
    lo: int
    hi: int
    why: str
    of: Callable[["Spec"], int] | None = None
    what: str = ""
    pow2: str = ""


# Every size of a spec, its range and why (the generated kernels' limits). HQ % H, d | l, d | l'
# and n_init + n_local <= n relate keys to each other and are checked after the plain ranges.
BOUNDS: tuple[Bound, ...] = (
    Bound("heads.q", 1, 256, "twice the widest attention layer in use (128 heads)"),
    Bound("heads.kv", 1, 256, "at most heads.q"),
    Bound("heads.q", 1, 128,
          "a KV head's G query heads are one tile of rows, and the compressed-attention tile "
          "fits shared memory up to 128 rows at head dims of 256",
          of=lambda s: s.heads_q // s.heads_kv, what="heads.q / heads.kv (G)"),
    Bound("head_dim.qk", 1, 256,
          "q and k rows are register tiles padded to a power of two; pipelined K/V tiles fit "
          "shared memory up to 256"),
    Bound("head_dim.v", 1, 256,
          "v rows are register tiles padded to a power of two; pipelined K/V tiles fit "
          "shared memory up to 256"),
    Bound("compression.block", 1, 256, "mean compression unrolls one load per token of a block"),
    Bound("compression.stride", 1, 256, "it divides compression.block"),
    Bound("compression.block", 1, 64,
          "a window may spill only into the next compressed tile, which holds at least 64 keys",
          of=lambda s: s.cmp_block // s.cmp_stride, what="compression.block / compression.stride"),
    Bound("selection.block", 1, 256, "a selected block is one tile of keys in the backward",
          pow2="a selected block, and its selection.block / compression.stride compressed "
               "keys, are tl.arange tiles"),
    Bound("selection.count", 1, 64,
          "the top-n unrolls one pass over the block scores per pick and keeps next_pow2(n) "
          "candidates per tile"),
    Bound("selection.initial", 0, 64, "at most selection.count"),
    Bound("selection.local", 0, 64, "at most selection.count"),
    Bound("window", 1, 1048576,
          "the window is a compile-time loop bound, and the decode split search visits each "
          "of its 64-key chunks"),
)
_KEY_FIELD = {key: name for name, (key, _) in _FIELDS.items()}

DTYPE_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

SHOWN_CHARS = 60      # an error quotes at most this much of an offending value
SHOWN_PATH = 120      # ... and of a file path (its end)
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 2 * SHOWN_CHARS


def short_repr(value: Any, limit: int = SHOWN_CHARS) -> str:
    """repr(value) cut to `limit` characters plus '...': an error never echoes unbounded input."""
    try:
        if isinstance(value, (str, bytes)):
            text = repr(value[:limit + 1])
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
            return f"<an integer of {value.bit_length()} bits>"
        else:
            text = _REPR.repr(value)
    except Exception:                          # a repr that fails must not hide the real error
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def short_path(path: Any, limit: int = SHOWN_PATH) -> str:
    """A file path for a message, its start cut (the end names the file) when over `limit`."""
    text = str(path)
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def short_text(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class SpecError(ValueError):
    """A spec broke a rule. The message names the source, the key, the value and the rule.

    The value and the source are quoted cut short; `value` keeps the whole of it."""

    def __init__(self, source: str, key: str, value: Any, rule: str):
        self.source, self.key, self.value, self.rule = source, key, value, rule
        shown = "" if value is None and key.startswith("<") else f" {short_repr(value)}:"
        super().__init__(f"{short_path(source)}: {short_text(str(key))}:{shown} {rule}")


def suggest_key(word: str, options) -> str:
    """' (did you mean ...?)' for a misspelt key, else the list of valid keys."""
    close = difflib.get_close_matches(word[:2 * SHOWN_CHARS], list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(options)})"


def _number(source: str, key: str, value: Any) -> float:
    """A float key's value: a number, or a string holding a float literal (YAML 1.1 reads 1e-3,
    without a dot, as a string)."""
    if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(source, key, value, "must be a number: write a number such as 0.001")
    try:
        return float(value)
    except OverflowError:
        return math.inf


def check_type(source: str, key: str, value: Any, want: type) -> Any:
    """A spec value of type `want` (a float may be written as a float literal string; an int
    is never a bool); raises SpecError naming the key."""
    if want is float:
        return _number(source, key, value)
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(source, key, value, "must be an integer")
        return value
    if not isinstance(value, want):
        raise SpecError(source, key, value, f"must be a {want.__name__}")
    return value


def read_schema(d: Mapping[str, Any], schema: Mapping[str, Any], required: tuple[str, ...],
                defaults: Mapping[str, Any], source: str, nullable: tuple[str, ...] = ()
                ) -> dict[str, Any]:
    """The values of a spec mapping by dotted key ('heads.q'), checked against `schema` (a key's
    type, or a mapping of sub-keys to types): unknown keys (with a suggestion), missing required
    keys, wrong types; absent keys take `defaults` (else None). Keys in `nullable` may be null."""
    for key in d:
        if key not in schema:
            name = key if isinstance(key, str) else short_repr(key)
            raise SpecError(source, name, d[key], "unknown key" + suggest_key(name, schema))
    for key in required:
        if key not in d:
            raise SpecError(source, key, None, "required key is missing")
    vals: dict[str, Any] = {}
    for key, want in schema.items():
        if not isinstance(want, dict):
            if key in d:
                vals[key] = None if key in nullable and d[key] is None else \
                    check_type(source, key, d[key], want)
            else:
                vals[key] = defaults.get(key)
            continue
        raw = d.get(key, defaults.get(key))
        if not isinstance(raw, Mapping):
            raise SpecError(source, key, raw, f"must be a mapping with keys {', '.join(want)}")
        subdefaults = defaults.get(key, {})
        for sub in raw:
            if sub not in want:
                name = sub if isinstance(sub, str) else short_repr(sub)
                raise SpecError(source, f"{key}.{name}", raw[sub],
                                "unknown key" + suggest_key(name, want))
        for sub, subtype in want.items():
            if sub in raw:
                vals[f"{key}.{sub}"] = check_type(source, f"{key}.{sub}", raw[sub], subtype)
            elif sub in subdefaults:
                vals[f"{key}.{sub}"] = subdefaults[sub]
            else:
                raise SpecError(source, f"{key}.{sub}", None, "required key is missing")
    return vals


def check_name(source: str, name: str) -> None:
    """A spec's name: short plain ASCII (it names files and appears in messages)."""
    if not _NAME_PATTERN.fullmatch(name):
        raise SpecError(source, "name", name,
                        "must be non-empty ASCII letters, digits, '-', '_' or '.'")
    if len(name) > NAME_MAX:
        raise SpecError(source, "name", name, f"must be at most {NAME_MAX} characters")


@dataclass(frozen=True)
class Spec:
    """One NSA layer (`attention: nsa`, the default): head counts and dims, block sizes,
    branches. Frozen and hashable.

    Every way of building one (the constructor, from_dict, replace, dataclasses.replace)
    validates it and puts it in canonical form: branches in cmp, slc, win order, no window
    without the win branch, a float scale.
    """

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

    family = "nsa"

    def __post_init__(self) -> None:
        """Validate every field and put the spec in canonical form; raises SpecError."""
        object.__setattr__(self, "source", str(self.source))
        self._check_types()
        self._check_values()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "Spec":
        """Validate a parsed spec mapping and build a Spec; raises SpecError naming what is wrong."""
        if not isinstance(d, Mapping):
            raise SpecError(source, "<root>", d, "a spec must be a mapping of keys to values")
        if isinstance(d.get("head_dim"), int) and not isinstance(d["head_dim"], bool):
            d = dict(d, head_dim={"qk": d["head_dim"], "v": d["head_dim"]})   # one size for both
        vals = read_schema(d, _SCHEMA, _REQUIRED, _DEFAULTS, source, nullable=("window",))
        if vals["attention"] not in (None, "nsa"):
            raise SpecError(source, "attention", vals["attention"],
                            f"choose from {', '.join(FAMILIES)} (an NSA spec has attention: nsa)")
        return cls(
            name=vals["name"], heads_q=vals["heads.q"], heads_kv=vals["heads.kv"],
            dim_qk=vals["head_dim.qk"], dim_v=vals["head_dim.v"], dtype=vals["dtype"],
            cmp_block=vals["compression.block"], cmp_stride=vals["compression.stride"],
            cmp_kind=vals["compression.kind"], slc_block=vals["selection.block"],
            slc_count=vals["selection.count"], slc_initial=vals["selection.initial"],
            slc_local=vals["selection.local"], window=vals["window"],
            branches=tuple(vals["branches"]), kv_per_branch=vals["kv_per_branch"],
            scale=vals["scale"], source=source,
        )

    def _check_types(self) -> None:
        """Each field has its type (an int is never a bool); the scale becomes a float."""
        src = self.source
        for name, (key, want) in _FIELDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if want is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise SpecError(src, key, value, "must be an integer")
            elif want is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise SpecError(src, key, value,
                                    "must be a number: write a number such as 0.001")
                try:
                    object.__setattr__(self, name, float(value))
                except OverflowError:
                    raise SpecError(src, key, value, "must be a positive finite number") from None
            elif want is tuple:
                if not isinstance(value, (tuple, list)):
                    raise SpecError(src, key, value, "must be a tuple of branch names "
                                                     f"({', '.join(BRANCHES)})")
            elif not isinstance(value, want):
                raise SpecError(src, key, value, f"must be a {want.__name__}")

    def _check_values(self) -> None:
        """Names, choices, branches, the bounds of every size, then the relations between keys."""
        src = self.source
        check_name(src, self.name)
        for key, value, choices, what in (
                ("dtype", self.dtype, DTYPES, "unknown dtype; "),
                ("compression.kind", self.cmp_kind, COMPRESSION_KINDS,
                 "unknown compression kind; "),
                ("kv_per_branch", self.kv_per_branch, KV_MODES, "")):
            if value not in choices:
                raise SpecError(src, key, value, f"{what}choose from {', '.join(choices)}")

        branches = self.branches
        if not branches:
            raise SpecError(src, "branches", list(branches),
                            "must list at least one of cmp, slc, win")
        for b in branches:
            if not isinstance(b, str) or b not in BRANCHES:
                raise SpecError(src, "branches", b,
                                f"unknown branch; choose from {', '.join(BRANCHES)}")
        if len(set(branches)) != len(branches):
            raise SpecError(src, "branches", list(branches), "a branch is listed twice")
        object.__setattr__(self, "branches", tuple(b for b in BRANCHES if b in branches))
        if "win" not in self.branches:
            object.__setattr__(self, "window", None)        # no window without the win branch
        elif self.window is None:
            raise SpecError(src, "window", None,
                            "'win' is a branch, so window must be a positive integer")

        for bound in BOUNDS:
            value = getattr(self, _KEY_FIELD[bound.key])
            if bound.of is None and value is not None and not bound.lo <= value <= bound.hi:
                raise SpecError(src, bound.key, value, bound_rule(bound, value))
        if self.heads_q % self.heads_kv:
            raise SpecError(src, "heads.q", self.heads_q,
                            f"must be a multiple of heads.kv ({self.heads_kv}): HQ % H == 0")
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
        for bound in BOUNDS:     # ratios, once the keys they divide are known to divide
            if bound.of is not None and not bound.lo <= bound.of(self) <= bound.hi:
                raise SpecError(src, bound.key, getattr(self, _KEY_FIELD[bound.key]),
                                bound_rule(bound, bound.of(self)))
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise SpecError(src, "scale", self.scale, "must be a positive finite number")

    def check_kernels(self) -> None:
        """Raise SpecError if the generated kernels cannot run this layer (the reference can):
        sizes that a template tiles with tl.arange must be powers of two."""
        for bound in BOUNDS:
            value = bound.of(self) if bound.of is not None else getattr(self, _KEY_FIELD[bound.key])
            if bound.pow2 and value is not None and value & (value - 1):
                raise SpecError(self.source, bound.key, getattr(self, _KEY_FIELD[bound.key]),
                                f"must be a power of two for the generated kernels: {bound.pow2}")

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

    @property
    def reads_cmp(self) -> bool:
        """Whether a branch reads compressed tokens: the compressed branch, or the selection's
        block scores. Without either, the compression section is never used."""
        return self.has("cmp") or self.has("slc")

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
            "nsa", DTYPE_SHORT[self.dtype], f"qk{self.dim_qk}", f"v{self.dim_v}",
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
        """A copy with some fields changed, validated and normalised like any Spec (e.g. a
        scaled-down test spec)."""
        return dataclasses.replace(self, **changes)


def bound_rule(bound: Bound, value: int) -> str:
    """The message of a broken bound: the range, and why."""
    if bound.of is not None:
        return f"{bound.what} is {value}, must be at most {bound.hi}: {bound.why}"
    kind = "positive" if bound.lo == 1 else "non-negative"
    return f"must be a {kind} integer, at most {bound.hi}: {bound.why}"
