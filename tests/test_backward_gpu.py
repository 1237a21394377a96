"""Generated backward kernels on a CUDA GPU in bfloat16 against float64 autograd through the
reference on the same GPU. Skipped where there is no GPU."""
import pytest
import torch

import nsagen

from grad_checks import check_backward

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16 = torch.bfloat16


@pytest.mark.parametrize("T", [1, 333, 4096, 16384])
def test_d128_bf16(T):
    check_backward(nsagen.load_spec("nsa-d128"), B=1, T=T, dtype=BF16, device="cuda", seed=T)


def test_fla_shaped_bf16():
    check_backward(nsagen.load_spec("nsa-fla"), B=1, T=8192, dtype=BF16, device="cuda", seed=1)


def test_paper_learned_compression_bf16():
    check_backward(nsagen.load_spec("nsa-paper"), B=1, T=4096, dtype=BF16, device="cuda", seed=2)


@pytest.mark.parametrize("name", ["nsa-g1", "nsa-g4"])
def test_small_groups_bf16(name):
    check_backward(nsagen.load_spec(name), B=1, T=2048, dtype=BF16, device="cuda", seed=3)


def test_varlen_bf16():
    check_backward(nsagen.load_spec("nsa-d128"), B=1, T=0, dtype=BF16, device="cuda", seed=4,
                   varlen_lens=[1, 3000, 77, 1025])
