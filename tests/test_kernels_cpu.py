"""Generated forward kernels under TRITON_INTERPRET=1 (float32, float16) against the reference."""
import os

import pytest
import torch

import nsagen
from nsagen.resources import shipped_specs

from kernel_checks import check_forward, scaled

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests run on CPU-only machines (the GPU module covers CUDA)")

SHIPPED = sorted(shipped_specs())


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("T", [1, 7, 45])
def test_shipped_spec_scaled_fp32(name, T):
    spec = scaled(nsagen.load_spec(name))
    check_forward(spec, B=1, T=T, dtype=torch.float32, device="cpu", seed=T)


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper", "nsa-fla", "nsa-g2"])
def test_shipped_spec_scaled_fp16(name):
    spec = scaled(nsagen.load_spec(name))
    check_forward(spec, B=1, T=50, dtype=torch.float16, device="cpu", seed=1)


def test_batch_and_odd_length():
    spec = scaled(nsagen.load_spec("nsa-d128"), kv_heads=2)
    check_forward(spec, B=2, T=37, dtype=torch.float32, device="cpu", seed=2)


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-fla", "nsa-paper"])
def test_varlen(name):
    spec = scaled(nsagen.load_spec(name))
    check_forward(spec, B=1, T=0, dtype=torch.float32, device="cpu", seed=3,
                  varlen_lens=[1, 21, 6, 38])


BRANCH_SETS = [("cmp",), ("slc",), ("win",), ("cmp", "slc"), ("cmp", "win"), ("slc", "win"),
               ("cmp", "slc", "win")]


@pytest.mark.parametrize("branches", BRANCH_SETS, ids="+".join)
def test_branch_subsets(branches):
    base = scaled(nsagen.load_spec("nsa-d128"))
    spec = base.replace(branches=branches, window=base.window if "win" in branches else None)
    check_forward(spec, B=1, T=40, dtype=torch.float32, device="cpu", seed=4)


@pytest.mark.parametrize("G", [1, 2, 4, 16, 32])
def test_group_sizes(G):
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(heads_q=G, heads_kv=1)
    check_forward(spec, B=1, T=33, dtype=torch.float32, device="cpu", seed=G)


def test_non_power_of_two_group_and_dims():
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(heads_q=6, heads_kv=2, dim_qk=24, dim_v=40)
    check_forward(spec, B=1, T=29, dtype=torch.float32, device="cpu", seed=5)


def test_small_window_fused_into_selection():
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(window=8)
    plan = nsagen.ir.lower(spec)
    assert plan.kernel("slc_attention").fuse_window
    assert "win_attention" not in [k.name for k in plan.kernels]
    check_forward(spec, B=1, T=40, dtype=torch.float32, device="cpu", seed=6)


def test_learned_compression_and_separate_kv():
    spec = scaled(nsagen.load_spec("nsa-paper")).replace(kv_per_branch="separate")
    check_forward(spec, B=1, T=41, dtype=torch.float32, device="cpu", seed=7)


def test_op_call_matches_reference():
    """The public op (validation, packing, reshape) on a [B, T] batch."""
    spec = scaled(nsagen.load_spec("nsa-d128"), kv_heads=2)
    op = nsagen.build(spec)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 19, spec.heads_q, spec.dim_qk, generator=g)
    k = torch.randn(2, 19, spec.heads_kv, spec.dim_qk, generator=g)
    v = torch.randn(2, 19, spec.heads_kv, spec.dim_v, generator=g)
    with torch.no_grad():
        o, idx = op(q, k, v, None, return_indices=True)
    ref, ref_idx = nsagen.reference.nsa(q.double(), k.double(), v.double(), None, spec,
                                        return_indices=True)
    assert torch.equal(idx, ref_idx)
    assert ((o.double() - ref).norm() / ref.norm()).item() < 1e-4
    with pytest.raises(ValueError, match="k:"):
        op(q, k[:, :, :1], v, None)
