"""nsagen: a compiler that turns a YAML spec of a Native Sparse Attention layer into Triton kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from . import reference  # noqa: E402
from .spec import Spec, SpecError  # noqa: E402
from .specfile import load_spec  # noqa: E402
from .ops import NSAOp, build  # noqa: E402
from .nn import SparseAttention  # noqa: E402

__all__ = ["Spec", "SpecError", "load_spec", "build", "NSAOp", "SparseAttention", "reference",
           "__version__"]
