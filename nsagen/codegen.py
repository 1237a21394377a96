"""Render a kernel plan into the source of one Python module (Triton kernels + launchers).

Structure comes from the plan (which templates, which flags); sizes stay `tl.constexpr`. The
result is parsed with `ast` before anyone writes or imports it.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

import jinja2
import triton

from . import __version__
from .ir import Plan, lower
from .ir.passes import lower_decode
from .resources import data_dir
from .spec import Spec

MODULE_TEMPLATE = "nsa_module.py.jinja"


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)
    env.filters["next_pow2"] = triton.next_power_of_2
    env.filters["pyrepr"] = repr
    env.filters["branch_index"] = ("cmp", "slc", "win").index
    return env


def template_digest() -> str:
    """Hash of every template file: any template change yields new module names."""
    h = hashlib.sha256()
    for p in sorted(Path(data_dir("templates")).glob("*.jinja")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def source_hash(spec: Spec) -> str:
    """Content key of a generated module: spec semantics + templates + nsagen version."""
    h = hashlib.sha256(f"{spec.digest()}|{template_digest()}|{__version__}".encode())
    return h.hexdigest()[:8]


def module_name(spec: Spec) -> str:
    """The readable URI plus the content hash, e.g. nsa_bf16_qk128_..._w512_3fa9c2d1."""
    return f"{spec.uri}_{source_hash(spec)}"


def render(spec: Spec, plan: Plan | None = None) -> str:
    """The module source for a spec; raises SyntaxError if the template produced invalid Python."""
    plan = plan or lower(spec)
    configs = {k.name: dict(k.config) for k in plan.kernels + plan.backward}
    decode = plan.decode or lower_decode(spec)
    src = _env().get_template(MODULE_TEMPLATE).render(
        spec=spec, plan=plan, uri=spec.uri, version=__version__, source_hash=source_hash(spec),
        configs=configs, decode=decode,
        decode_configs={k.name: dict(k.config) for k in decode.kernels})
    # collapse the blank-line runs that template structure leaves behind
    lines, blank = [], 0
    for line in src.splitlines():
        blank = blank + 1 if not line.strip() else 0
        if blank <= 2:
            lines.append(line.rstrip())
    src = "\n".join(lines).rstrip() + "\n"
    ast.parse(src, filename=module_name(spec))
    return src


def explain(spec: Spec) -> str:
    """The graph before and after the passes, the decisions with their reasons, the kernels."""
    from .ir import build_graph, describe

    plan = lower(spec)
    out = [f"spec {spec.name} ({spec.uri}), module {module_name(spec)}", "",
           "graph before the passes:", describe(build_graph(spec)), "",
           "graph after the passes (node -> kernel):", describe(plan.graph), "", "decisions:"]
    out += [f"  - {d}" for d in plan.decisions]
    out += ["", "kernels (launch order):"]
    for k in plan.kernels:
        flags = ", ".join(f"{a}={b}" for a, b in k.params.items())
        out.append(f"  {k.name} <- templates/{k.template} [{'+'.join(k.nodes)}] {flags}")
        out.append(f"      default config {k.config}")
    dec = plan.decode or lower_decode(spec)
    out += ["", "decode step (one query per sequence), graph node -> kernel:", describe(dec.graph),
            "", "decode decisions:"]
    out += [f"  - {d}" for d in dec.decisions]
    out += ["", "decode kernels (launch order):"]
    for k in dec.kernels:
        flags = ", ".join(f"{a}={b}" for a, b in k.params.items())
        out.append(f"  {k.name} <- templates/{k.template} [{'+'.join(k.nodes)}] {flags}")
        out.append(f"      default config {k.config}")
    return "\n".join(out)


def write_generated(specs: dict[str, Spec], out_dir: Path) -> list[Path]:
    """Render shipped specs into `out_dir/<spec name>.py` (the committed generated/ folder)."""
    from .cache import atomic_write

    paths = []
    for name, spec in sorted(specs.items()):
        path = Path(out_dir) / f"{name.replace('-', '_')}.py"
        src = render(spec)
        if not path.is_file() or path.read_text() != src:
            atomic_write(path, src)
        paths.append(path)
    return paths
