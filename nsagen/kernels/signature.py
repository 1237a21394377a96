"""A kernel's launch signature, declared once in its definition: the Triton parameters in order
and the launcher expression that feeds each one.

The template prints both the jitted function's parameter list and the launch's argument list from
the same declaration, so the two cannot disagree and no launcher marshals strides or constexprs
by hand. Runtime parameters come first and are passed by position; constexprs follow, passed by
keyword; launch options (`num_warps`, ...) close the call.

Expressions are code written here, in nsagen's kernel definitions; a value derived from the spec
enters only through :func:`values`, which accepts ints and bools and prints them as literals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Union

from markupsafe import Markup

_WIDTH = 99


@dataclass(frozen=True)
class Param:
    """One Triton parameter and the launcher expression that feeds it."""

    name: str
    arg: str
    constexpr: bool = False


Part = Union[Param, Iterable[Param]]


def _wrap(items: list[str], indent: int, trailing: bool) -> Markup:
    """Comma-separated items (a comma after the last with `trailing`), wrapped at _WIDTH
    columns; continuation lines at `indent`."""
    lines, line = [], ""
    for i, item in enumerate(items):
        piece = f"{item}," if trailing or i < len(items) - 1 else item
        if line and indent + len(line) + 1 + len(piece) > _WIDTH:
            lines.append(line)
            line = piece
        else:
            line = f"{line} {piece}" if line else piece
    lines.append(line)
    return Markup(("\n" + " " * indent).join(lines))


@dataclass(frozen=True)
class Signature:
    """The parameters of one Triton kernel function and its launch options, in order."""

    params: tuple[Param, ...]
    options: tuple[tuple[str, str], ...]

    def __post_init__(self):
        names = [p.name for p in self.params] + [k for k, _ in self.options]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"signature declares {', '.join(dup)} twice")

    def _ordered(self) -> list[Param]:
        return ([p for p in self.params if not p.constexpr]
                + [p for p in self.params if p.constexpr])

    def definition(self) -> Markup:
        """The parameter list of the jitted function (4-space continuation)."""
        return _wrap([p.name + (": tl.constexpr" if p.constexpr else "")
                      for p in self._ordered()], 4, trailing=True)

    def call(self, indent: int = 8) -> Markup:
        """The launch's arguments (continuation lines at `indent`)."""
        items = [p.arg if not p.constexpr else f"{p.name}={p.arg}" for p in self._ordered()]
        return _wrap(items + [f"{k}={v}" for k, v in self.options], indent, trailing=False)


def signature(*parts: Part, options: Iterable[tuple[str, str]] = ()) -> Signature:
    """A Signature from parameters and groups of them, in the kernel's parameter order."""
    params: list[Param] = []
    for part in parts:
        params += [part] if isinstance(part, Param) else list(part)
    return Signature(tuple(params), tuple(options))


def _split(item: str) -> tuple[str, str]:
    name, _, expr = item.partition("=")
    return name.strip(), (expr.strip() or name.strip())


def ptrs(*items: str) -> list[Param]:
    """Tensor arguments: "q" is parameter q_ptr fed by q; "ob=ob if save else o" names the
    expression."""
    return [Param(f"{n}_ptr", e) for n, e in map(_split, items)]


def strides(tensor: str, *suffixes: str, prefix: str = "stride_") -> list[Param]:
    """The leading strides of `tensor`: strides("q", "qt", "qh") is stride_qt = q.stride(0),
    stride_qh = q.stride(1)."""
    return [Param(f"{prefix}{s}", f"{tensor}.stride({i})") for i, s in enumerate(suffixes)]


def scalars(*items: str) -> list[Param]:
    """Runtime scalars (Triton specialises integers on 1 and divisibility by 16)."""
    return [Param(n, e) for n, e in map(_split, items)]


def tma_descs(k: str, v: str, rows: str) -> list[Param]:
    """The TMA descriptors `{k}_desc`, `{v}_desc` of a kernel that can read row tiles of
    cfg[`rows`] rows of the launcher's tensors `k` and `v` through them: the descriptors where
    the launcher's `tma` holds, else the tensors themselves (then not read)."""
    return scalars(f'{k}_desc=_tma_rows({k}, cfg["{rows}"], BLOCK_DK) if tma else {k}',
                   f'{v}_desc=_tma_rows({v}, cfg["{rows}"], BLOCK_DV) if tma else {v}')


def consts(**exprs: str) -> list[Param]:
    """Constexprs fed by launcher expressions."""
    return [Param(n, e, True) for n, e in exprs.items()]


def cfg(*items: str) -> list[Param]:
    """Constexprs read from the launch config: "BT" is cfg["BT"], "BT=BT_KV" is cfg["BT_KV"]."""
    return [Param(n, f'cfg["{key}"]', True) for n, key in map(_split, items)]


def values(**vals: int | bool) -> list[Param]:
    """Constexprs fixed when the module is generated (from the spec): printed as literals."""
    out = []
    for n, v in vals.items():
        if not isinstance(v, (bool, int)):
            raise TypeError(f"constexpr {n}: expected an int or a bool, got {type(v).__name__}")
        out.append(Param(n, repr(v), True))
    return out


def options(**exprs: str) -> tuple[tuple[str, str], ...]:
    """Launch options (num_warps, num_stages, launch_pdl) and their expressions."""
    return tuple(exprs.items())


# groups most attention kernels declare
HEADS = consts(H="H_KV", G="GROUP")
DIMS = consts(DK="DIM_QK", DV="DIM_V", BDK="BLOCK_DK", BDV="BLOCK_DV")
WARPS = options(num_warps='cfg["num_warps"]')
WARPS_STAGES = options(num_warps='cfg["num_warps"]', num_stages='cfg["num_stages"]')
