"""The package's structure: modules import each other at the top and without cycles, never a
private name of another module, and each stays under 600 lines; the templates' tile steps live
once, in the shared helpers."""
import ast
from pathlib import Path

import networkx as nx
import pytest

PKG = Path(__file__).resolve().parent.parent / "nsagen"
MODULES = sorted(p for p in PKG.rglob("*.py"))
MAX_LINES = 600


def _name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names."""
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, typing_too: bool = True):
    """(imported module, names, at top level?, node) of every nsagen import in a module;
    `typing_too=False` leaves out the imports under `if TYPE_CHECKING:` (annotations only)."""
    mod, is_pkg = _name(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    typing_only = set()
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            typing_only |= {id(n) for sub in node.body for n in ast.walk(sub)}
            top |= {id(sub) for sub in node.body}
    for node in ast.walk(tree):
        at_top = id(node) in top
        if id(node) in typing_only and not typing_too:
            continue
        if isinstance(node, ast.ImportFrom):
            target = _target(mod, is_pkg, node)
            if target.split(".")[0] != "nsagen":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if (PKG.parent / (sub.replace(".", "/") + ".py")).is_file() or \
                        (PKG.parent / sub.replace(".", "/") / "__init__.py").is_file():
                    yield sub, [], at_top, node
                else:
                    yield target, [alias.name], at_top, node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nsagen":
                    yield alias.name, [], at_top, node


def test_no_import_cycles_and_imports_at_the_top():
    g = nx.DiGraph()
    inner = []
    for path in MODULES:
        mod = _name(path)
        g.add_node(mod)
        for target, _, at_top, node in _imports(path, typing_too=False):
            if not at_top:
                inner.append(f"{mod}:{node.lineno} imports {target} inside a function")
            if target != mod and target != "nsagen":
                g.add_edge(mod, target)
    assert not inner, "\n".join(inner)
    # a package's __init__ re-exporting its submodules is not a cycle of the code
    h = g.copy()
    h.remove_edges_from([(a, b) for a, b in g.edges if b.startswith(a + ".")])
    cycles = list(nx.simple_cycles(h))
    assert not cycles, cycles


def test_no_private_names_cross_modules():
    bad = []
    for path in MODULES:
        for target, names, _, node in _imports(path):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{_name(path)}:{node.lineno} imports {target}.{n}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_modules_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.name} has {n} lines"


TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def test_backward_tile_steps_live_once():
    """The NSA backward's tile prologue, dq step and dk/dv step are device functions of
    _helpers.py.jinja; the three branch templates call them instead of repeating their bodies.
    (DSA's backward is one pass per token over gathered keys, dq and the dK/dV atomics from the
    same P: a loop of its own.)"""
    steps = {"dS = P (dP - delta)": "ds = p * (dp - delta[:, None])",
             "dS^T = P^T (dP^T - delta)": "dst = pt * (dpt - delta[None, :])",
             "the gated dO load": "_load_gated_do(",
             "the LSE load": "lse = tl.load(lse_ptr"}
    for path in [TEMPLATES / f"{b}_attention_bwd.py.jinja" for b in ("cmp", "slc", "win")]:
        text = path.read_text()
        for what, code in steps.items():
            assert code not in text, f"{path.name} repeats {what}"
        for helper in ("_bwd_rows(", "_bwd_dq_step("):
            assert helper in text, f"{path.name} does not use {helper[:-1]}"
        # the dk/dv step whole, or its part up to dS^T (a pass that also forms dq from dS)
        assert "_bwd_dkdv_step(" in text or "_bwd_dst(" in text, \
            f"{path.name} does not use _bwd_dkdv_step or _bwd_dst"
    helpers = (TEMPLATES / "_helpers.py.jinja").read_text()
    assert helpers.count("ds = p * (dp - delta[:, None])") == 1      # the dq step
    assert helpers.count("dst = pt * (dpt - delta[None, :])") == 1   # the dk/dv step (keys as rows)
