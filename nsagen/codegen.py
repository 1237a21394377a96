"""Render a kernel plan into the source of one Python module (Triton kernels + launchers).

Structure comes from the plan (which templates, which flags); sizes stay `tl.constexpr`. Every
value a template prints goes through one gate, :func:`_literal`: numbers print as Python literals,
plain words as themselves, and anything else must have been made a literal by `pyrepr` (or be
template-authored code marked `safe`), so no spec value can become code. The result is parsed
with `ast` before anyone writes or imports it. A module's identity is a hash of its rendered text
and the Triton release it targets: any change in what the compiler emits gives a new name.
"""
from __future__ import annotations

import ast
import hashlib
import math
import re
from functools import lru_cache
from pathlib import Path

import jinja2
import triton
from markupsafe import Markup

from . import __version__
from .cache import atomic_write
from .ir import Plan, build_graph, describe, lower
from .kernels import KERNELS, inverse_map_launch
from .resources import data_dir
from .spec import Spec
from .target import Target, current

MODULE_TEMPLATES = {"nsa": "nsa_module.py.jinja", "dsa": "dsa_module.py.jinja"}
_WORDS = re.compile(r"[A-Za-z0-9_ ,.\-]*")


class CodegenError(ValueError):
    """A template tried to print a value that is not a safe literal."""


def _check_finite(value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise CodegenError(f"cannot render the non-finite number {value!r} into a module")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(k)
            _check_finite(v)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _check_finite(v)


def _pyrepr(value) -> Markup:
    """A Python literal of `value` (numbers, strings, containers of them), safe to print."""
    _check_finite(value)
    text = repr(value)
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise CodegenError(f"{type(value).__name__} has no literal form to render") from None
    return Markup(text)


def _literal(value) -> Markup:
    """The finalizer of every `{{ ... }}`: what may be printed into generated source as is."""
    if isinstance(value, Markup):          # pyrepr output, macro output, template code marked safe
        return value
    if isinstance(value, bool) or isinstance(value, int):
        return Markup(repr(value))
    if isinstance(value, float):
        return _pyrepr(value)
    if isinstance(value, str) and _WORDS.fullmatch(value):
        return Markup(value)
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise CodegenError(f"refusing to print {shown} into generated source: only numbers and "
                       "plain words print as they are; use the pyrepr filter")


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, autoescape=True, finalize=_literal)
    env.filters["next_pow2"] = triton.next_power_of_2
    env.filters["pyrepr"] = _pyrepr
    env.filters["branch_index"] = ("cmp", "slc", "win").index
    return env


def triton_release(version: str | None = None) -> str:
    """major.minor of a Triton version string (default: the installed Triton)."""
    parts = (version or triton.__version__).split(".")
    return ".".join(parts[:2])


def source_hash(source: str, triton_version: str | None = None) -> str:
    """The content key of a module: its rendered text and the Triton release it targets."""
    h = hashlib.sha256(f"triton {triton_release(triton_version)}\n".encode())
    h.update(source.encode())
    return h.hexdigest()[:8]


def module_name(spec: Spec, triton_version: str | None = None,
                target: Target | None = None) -> str:
    """The readable URI plus the content hash, e.g. nsa_bf16_qk128_..._w512_3fa9c2d1.

    Two specs that differ only in `name` render the same text and so share one module; two
    targets whose facts plan the same kernels share one too."""
    return f"{spec.uri}_{source_hash(render(spec, target=target), triton_version)}"


def render(spec: Spec, plan: Plan | None = None, target: Target | None = None) -> str:
    """The module source for a spec, planned for `target` (default: the GPU at hand, else the
    default preset) unless a `plan` is given; raises SyntaxError if the template produced
    invalid Python. The spec's `name` does not reach the source (it does not change the
    kernels)."""
    if plan is None:
        named = spec.replace(name="layer") if spec.name != "layer" else spec
        return _render_default(named, target or current())
    return _render(spec, plan)


@lru_cache(maxsize=64)
def _render_default(spec: Spec, target: Target) -> str:
    return _render(spec, lower(spec, target))


def _render(spec: Spec, plan: Plan) -> str:
    configs = {k.name: dict(k.config) for k in plan.rendered}
    decode = plan.decode
    layer = spec.to_dict()
    layer.pop("name")
    src = _env().get_template(MODULE_TEMPLATES[spec.family]).render(
        spec=spec, plan=plan, uri=spec.uri, version=__version__, layer=layer,
        configs=configs, decode=decode,
        decode_configs={k.name: dict(k.config) for k in decode.kernels} if decode else {},
        signatures=lambda k: KERNELS[k.name].launch(spec, k.params),
        inverse_map=inverse_map_launch(spec) if spec.family == "nsa" else None)
    # collapse the blank-line runs that template structure leaves behind
    lines, blank = [], 0
    for line in src.splitlines():
        blank = blank + 1 if not line.strip() else 0
        if blank <= 2:
            lines.append(line.rstrip())
    src = "\n".join(lines).rstrip() + "\n"
    ast.parse(src, filename=spec.uri)
    return src


def explain(spec: Spec, target: Target | None = None) -> str:
    """The graph before and after the passes, the decisions with their reasons, the kernels."""
    plan = lower(spec, target)
    out = [f"spec {spec.name} ({spec.uri}), module {module_name(spec, target=plan.target)}", "",
           "graph before the passes:", describe(build_graph(spec)), "",
           "graph after the passes (node -> kernel):", describe(plan.graph), "", "decisions:"]
    out += [f"  - [{d.pass_name}] {d}" for d in plan.decisions]
    out += ["", "kernels (launch order):"]
    for k in plan.kernels:
        flags = ", ".join(f"{a}={b}" for a, b in k.params.items())
        out.append(f"  {k.name} <- templates/{k.template} [{'+'.join(k.nodes)}] {flags}")
        out.append(f"      default config {k.config}")
    if plan.short is not None:
        out += ["", f"short plan (every sequence at most {plan.short.max_len} tokens), graph "
                "node -> kernel:", describe(plan.short.graph), "", "short plan launches:"]
        for phase, steps in (("forward", plan.short.forward), ("backward", plan.short.backward)):
            for st in steps:
                args = ", ".join(f"{a}={b}" for a, b in st.args.items())
                out.append(f"  {phase} {st.kernel} [{'+'.join(st.nodes)}] {args}".rstrip())
    dec = plan.decode
    if dec is None:
        return "\n".join(out + ["", "decode step: no kernels yet for this family"])
    out += ["", "decode step (one query per sequence), graph node -> kernel:", describe(dec.graph),
            "", "decode decisions:"]
    out += [f"  - [{d.pass_name}] {d}" for d in dec.decisions]
    out += ["", "decode kernels (launch order):"]
    for k in dec.kernels:
        flags = ", ".join(f"{a}={b}" for a, b in k.params.items())
        out.append(f"  {k.name} <- templates/{k.template} [{'+'.join(k.nodes)}] {flags}")
        out.append(f"      default config {k.config}")
    return "\n".join(out)


def write_generated(specs: dict[str, Spec], out_dir: Path) -> list[Path]:
    """Render shipped specs into `out_dir/<spec name>.py` (the committed generated/ folder)."""
    paths = []
    for name, spec in sorted(specs.items()):
        path = Path(out_dir) / f"{name.replace('-', '_')}.py"
        src = render(spec)
        if not path.is_file() or path.read_text() != src:
            atomic_write(path, src)
        paths.append(path)
    return paths
