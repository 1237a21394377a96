"""nsagen: a compiler that turns a YAML spec of a sparse attention layer (Native Sparse Attention,
DeepSeek Sparse Attention) into Triton kernels: forward, backward and decoding."""
from __future__ import annotations

__version__ = "0.1.0"

from . import reference  # noqa: E402
from .spec import Spec, SpecError  # noqa: E402
from .dsa_spec import DSASpec  # noqa: E402
from .specfile import load_spec  # noqa: E402
from .ops import NSAOp, build  # noqa: E402
from .nn import SparseAttention  # noqa: E402

__all__ = ["Spec", "DSASpec", "SpecError", "load_spec", "build", "NSAOp", "SparseAttention", "reference",
           "__version__"]
