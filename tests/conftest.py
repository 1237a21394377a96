"""Test setup: on a machine without a GPU, generated kernels run under Triton's interpreter."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NSAGEN_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "nsagen"))
if os.environ.get("PYTEST_XDIST_WORKER") and not torch.cuda.is_available():
    torch.set_num_threads(1)    # one core per test process (`pytest -n 2` on a 2-core machine)


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter patches triton.language when a kernel launches and restores it
    when the launch ends, but patches again on every call of a @triton.jit function from
    inside the kernel (about 2 ms a call, some 15% of a kernel test's time), though the patches
    of a module repeat those already made. Patch each language module once per launch (one a
    helper's globals add, such as triton.language.core for the standard library's functions,
    when first seen) and undo them all when the launch ends. Tests only: the generated code
    is untouched, and an interpreter without these internals runs as it is."""
    from triton.runtime import interpreter as ti

    orig = getattr(ti, "_patch_lang", None)
    if orig is None or getattr(orig, "_once_per_launch", False):
        return
    tl = ti.tl
    langs: dict = {}          # jit function -> ids of the language modules in its globals
    held: list = []           # during a launch: [ids patched, scopes to undo]

    class _Launch:
        def restore(self):
            _, scopes = held.pop()
            for scope in reversed(scopes):
                scope.restore()

    def patch_lang(fn):
        mods = langs.get(fn)
        if mods is None:
            mods = langs[fn] = frozenset(
                id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        if not held:           # a kernel launch: GridExecutor restores what it returns
            held.append([set(mods), [orig(fn)]])
            return _Launch()
        done, scopes = held[-1]
        if not mods <= done:   # a function inside the launch that sees another module
            scopes.append(orig(fn))
            done |= mods
        return None

    patch_lang._once_per_launch = True
    ti._patch_lang = patch_lang


def _no_overflow_asserts() -> None:
    """Triton's interpreter checks every int32 add, sub and mul for overflow (an int64 copy of
    each operand, the operation again and a device assert): about a fifth of a kernel test's
    time. The test shapes are a few hundred tokens, far from the int32 range, and compiled
    kernels wrap as the GPU does; out-of-range rows would show in the outputs the tests compare.
    NSAGEN_TEST_OVERFLOW_CHECKS=1 keeps the interpreter's checks."""
    import dataclasses

    from triton.runtime import interpreter as ti

    builder = getattr(ti, "interpreter_builder", None)
    opts = getattr(builder, "options", None)
    if os.environ.get("NSAGEN_TEST_OVERFLOW_CHECKS") == "1" or not hasattr(
            opts, "sanitize_overflow"):
        return
    builder.options = dataclasses.replace(opts, sanitize_overflow=False)


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_language_once_per_launch()
    _no_overflow_asserts()


@pytest.fixture
def slc_order(request, monkeypatch):
    """Force the selected attention's loop order (the test's parameter: "query" or "block")
    whatever the cost model estimates; modules of either order get their own names."""
    from nsagen import codegen
    from nsagen.ir import passes

    cost = {"query": 0.0, "block": 1.0} if request.param == "query" else {"query": 1.0, "block": 0.0}
    monkeypatch.setattr(passes, "slc_loop_costs", lambda spec, target: cost)
    codegen._render_default.cache_clear()
    yield request.param
    codegen._render_default.cache_clear()
