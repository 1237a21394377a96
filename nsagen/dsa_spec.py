"""The DSA spec family: a DeepSeek Sparse Attention layer (docs/algorithm.md section 8).

A :class:`DSASpec` is to a DSA layer what :class:`nsagen.spec.Spec` is to an NSA layer: built
from a YAML mapping with `attention: dsa` (nsagen.specfile dispatches on that key), validated
whenever it is built, frozen and hashable, with a URI that starts with the family's name so that
modules and tables of the two families never share a name. The errors follow the NSA spec's:
they name the file, the key, the value (cut short) and the rule.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .spec import (DTYPE_SHORT, DTYPES, Bound, SpecError, bound_rule, check_name, check_type,
                   read_schema)

KEY_DTYPES = ("bfloat16", "float8_e4m3")
TOPK_KERNEL_MAX = 4096    # the top-k kernel sorts 2 x topk (padded to a power of two) keys on chip

_SCHEMA: dict[str, Any] = {
    "attention": str,
    "name": str,
    "heads": {"q": int, "kv": int},
    "head_dim": {"qk": int, "v": int},
    "indexer": {"heads": int, "dim": int, "topk": int, "key_dtype": str},
    "dtype": str,
    "scale": float,
}
_REQUIRED = ("attention", "name", "heads", "head_dim", "indexer")
_DEFAULTS = {"dtype": "bfloat16", "indexer": {"key_dtype": "bfloat16"}}

# dataclass field -> spec key
_KEYS = {"name": "name", "heads_q": "heads.q", "heads_kv": "heads.kv", "dim_qk": "head_dim.qk",
         "dim_v": "head_dim.v", "indexer_heads": "indexer.heads", "indexer_dim": "indexer.dim",
         "topk": "indexer.topk", "key_dtype": "indexer.key_dtype", "dtype": "dtype",
         "scale": "scale"}

BOUNDS: tuple[Bound, ...] = (
    Bound("heads.q", 1, 256, "twice the widest attention layer in use (128 heads)"),
    Bound("heads.kv", 1, 256, "at most heads.q"),
    Bound("head_dim.qk", 1, 1024, "MLA's absorbed key is 576 wide; a key row stays one tile"),
    Bound("head_dim.v", 1, 1024, "MLA's absorbed value is 512 wide"),
    Bound("indexer.heads", 1, 256, "DeepSeek-V3.2's indexer has 64 heads"),
    Bound("indexer.dim", 1, 512, "DeepSeek-V3.2's indexer keys are 128 wide"),
    Bound("indexer.topk", 1, 65536, "DeepSeek-V3.2 keeps 2048 tokens; the top-k is a "
                                    "streaming merge of candidates held on chip"),
)


@dataclass(frozen=True)
class DSASpec:
    """One DSA layer: attention heads and dims, the indexer's heads, dim and top-k. Frozen and
    hashable; every way of building one validates it."""

    name: str
    heads_q: int
    heads_kv: int
    dim_qk: int
    dim_v: int
    indexer_heads: int
    indexer_dim: int
    topk: int
    dtype: str = "bfloat16"
    key_dtype: str = "bfloat16"
    scale: float | None = None
    source: str = field(default="<dict>", compare=False, hash=False, repr=False)

    family = "dsa"

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", str(self.source))
        src = self.source
        for name, key in _KEYS.items():
            value = getattr(self, name)
            if name == "scale":
                if value is not None:
                    object.__setattr__(self, name, check_type(src, key, value, float))
            elif name in ("name", "dtype", "key_dtype"):
                check_type(src, key, value, str)
            else:
                check_type(src, key, value, int)
        check_name(src, self.name)
        for key, value, choices in (("dtype", self.dtype, DTYPES),
                                    ("indexer.key_dtype", self.key_dtype, KEY_DTYPES)):
            if value not in choices:
                raise SpecError(src, key, value, f"choose from {', '.join(choices)}")
        fields = {key: name for name, key in _KEYS.items()}
        for bound in BOUNDS:
            value = getattr(self, fields[bound.key])
            if not bound.lo <= value <= bound.hi:
                raise SpecError(src, bound.key, value, bound_rule(bound, value))
        if self.heads_q % self.heads_kv:
            raise SpecError(src, "heads.q", self.heads_q,
                            f"must be a multiple of heads.kv ({self.heads_kv}): HQ % H == 0")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise SpecError(src, "scale", self.scale, "must be a positive finite number")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "DSASpec":
        """Validate a parsed `attention: dsa` mapping and build a DSASpec; raises SpecError."""
        if not isinstance(d, Mapping):
            raise SpecError(source, "<root>", d, "a spec must be a mapping of keys to values")
        vals = read_schema(d, _SCHEMA, _REQUIRED, _DEFAULTS, source)
        if vals["attention"] != "dsa":
            raise SpecError(source, "attention", vals["attention"],
                            "this is a DSA spec: attention: dsa")
        return cls(name=vals["name"], heads_q=vals["heads.q"], heads_kv=vals["heads.kv"],
                   dim_qk=vals["head_dim.qk"], dim_v=vals["head_dim.v"],
                   indexer_heads=vals["indexer.heads"], indexer_dim=vals["indexer.dim"],
                   topk=vals["indexer.topk"], key_dtype=vals["indexer.key_dtype"],
                   dtype=vals["dtype"], scale=vals["scale"], source=source)

    def check_kernels(self) -> None:
        """Raise SpecError for what the spec language allows but the generated kernels do not
        take: the top-k keeps its picks in registers (topk <= TOPK_KERNEL_MAX)."""
        if self.topk > TOPK_KERNEL_MAX:
            raise SpecError(self.source, "indexer.topk", self.topk,
                            f"the generated top-k keeps its picks on chip: at most "
                            f"{TOPK_KERNEL_MAX} (nsagen.reference.dsa takes any)")

    @property
    def fp8_keys(self) -> bool:
        """Whether the kernels store the indexer keys in float8_e4m3 (one scale per token)."""
        return self.key_dtype == "float8_e4m3"

    @property
    def group(self) -> int:
        """G: query heads per KV head (H = 1 is MQA)."""
        return self.heads_q // self.heads_kv

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.dim_qk ** -0.5

    def to_dict(self) -> dict[str, Any]:
        """The canonical YAML-able mapping (round-trips through from_dict)."""
        d: dict[str, Any] = {
            "attention": "dsa", "name": self.name,
            "heads": {"q": self.heads_q, "kv": self.heads_kv},
            "head_dim": {"qk": self.dim_qk, "v": self.dim_v},
            "indexer": {"heads": self.indexer_heads, "dim": self.indexer_dim, "topk": self.topk,
                        "key_dtype": self.key_dtype},
            "dtype": self.dtype,
        }
        if self.scale is not None:
            d["scale"] = self.scale
        return d

    @property
    def uri(self) -> str:
        """Readable identifier, e.g. dsa_bf16_qk576_v512_h1g128_i64x128k2048; every semantic
        field appears."""
        parts = ["dsa", DTYPE_SHORT[self.dtype], f"qk{self.dim_qk}", f"v{self.dim_v}",
                 f"h{self.heads_kv}g{self.group}",
                 f"i{self.indexer_heads}x{self.indexer_dim}k{self.topk}"]
        if self.key_dtype != "bfloat16":
            parts.append("fp8keys")
        if self.scale is not None:
            parts.append(f"sc{self.scale:g}".replace(".", "p").replace("-", "m"))
        return "_".join(parts)

    def replace(self, **changes: Any) -> "DSASpec":
        """A copy with some fields changed, validated like any DSASpec."""
        return dataclasses.replace(self, **changes)
