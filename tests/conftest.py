"""Test setup: on a machine without a GPU, generated kernels run under Triton's interpreter."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NSAGEN_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "nsagen"))
