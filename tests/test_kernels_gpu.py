"""Generated forward kernels on a CUDA GPU in bfloat16 at realistic sizes, against the float64
reference computed on the same GPU. Skipped where there is no GPU."""
import pytest
import torch

import nsagen

from kernel_checks import check_forward, scaled

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16 = torch.bfloat16


@pytest.mark.parametrize("T", [1, 31, 1000, 4096, 16384])
def test_d128_bf16(T):
    check_forward(nsagen.load_spec("nsa-d128"), B=1, T=T, dtype=BF16, device="cuda", seed=T)


@pytest.mark.parametrize("T", [777, 16384])
def test_fla_shaped_bf16(T):
    check_forward(nsagen.load_spec("nsa-fla"), B=1, T=T, dtype=BF16, device="cuda", seed=T)


def test_paper_dims_learned_bf16():
    check_forward(nsagen.load_spec("nsa-paper"), B=1, T=8192, dtype=BF16, device="cuda", seed=3)


@pytest.mark.parametrize("name", ["nsa-g1", "nsa-g2", "nsa-g4", "nsa-g8"])
def test_small_groups_bf16(name):
    check_forward(nsagen.load_spec(name), B=1, T=3000, dtype=BF16, device="cuda", seed=4)


def test_batch_and_varlen_bf16():
    spec = nsagen.load_spec("nsa-d128")
    check_forward(spec, B=2, T=2500, dtype=BF16, device="cuda", seed=5)
    check_forward(spec, B=1, T=0, dtype=BF16, device="cuda", seed=6, varlen_lens=[1, 4000, 77, 2049])


@pytest.mark.parametrize("branches", [("cmp",), ("slc",), ("win",), ("slc", "win")], ids="+".join)
def test_branch_subsets_bf16(branches):
    base = nsagen.load_spec("nsa-d128")
    spec = base.replace(branches=branches, window=base.window if "win" in branches else None)
    check_forward(spec, B=1, T=2048, dtype=BF16, device="cuda", seed=7)


def test_fp16_and_fp32_on_gpu():
    spec = scaled(nsagen.load_spec("nsa-d128"), kv_heads=2, dim=64)
    check_forward(spec, B=1, T=600, dtype=torch.float16, device="cuda", seed=8)
    check_forward(spec, B=1, T=600, dtype=torch.float32, device="cuda", seed=9)
