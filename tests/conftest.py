"""Test setup: on a machine without a GPU, generated kernels run under Triton's interpreter."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NSAGEN_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "nsagen"))
if os.environ.get("PYTEST_XDIST_WORKER") and not torch.cuda.is_available():
    torch.set_num_threads(1)    # one core per test process (`pytest -n 2` on a 2-core machine)


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
