"""Generated backward kernels on a CUDA GPU in bfloat16 against float64 autograd through the
reference on the same GPU. Skipped where there is no GPU."""
import gc

import pytest
import torch

import nsagen

from grad_checks import check_backward

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    """The float64 reference with autograd is large at long T: give its memory back."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _long(name):
    """The spec with one KV head (same group size and blocks): the float64 reference's gathers
    at 16k with 4 KV heads would need more memory than the GPU has."""
    spec = nsagen.load_spec(name)
    return spec.replace(heads_q=spec.group, heads_kv=1)


@pytest.mark.parametrize("T", [1, 333, 4096])
def test_d128_bf16(T):
    check_backward(nsagen.load_spec("nsa-d128"), B=1, T=T, dtype=BF16, device="cuda", seed=T)


def test_d128_bf16_16k():
    check_backward(_long("nsa-d128"), B=1, T=16384, dtype=BF16, device="cuda", seed=16)


@pytest.mark.parametrize("T", [3000, 16384])
def test_selected_dq_from_the_dkdv_pass_bf16(T):
    """The retrieval example's layer shape (8 heads on one KV head, D=64, learned compression),
    whose selected dq the IR takes from the dk/dv pass (FUSE_DQ=1), two sequences."""
    spec = nsagen.load_spec("nsa-paper").replace(heads_q=8, heads_kv=1, dim_qk=64, dim_v=64)
    op = nsagen.build(spec)
    assert op.module.CONFIGS["slc_attention_bwd"]["FUSE_DQ"] == 1
    check_backward(spec, B=2, T=T, dtype=BF16, device="cuda", seed=T + 1)


def test_fla_shaped_bf16():
    check_backward(_long("nsa-fla"), B=1, T=8192, dtype=BF16, device="cuda", seed=1)


def test_paper_learned_compression_bf16():
    check_backward(nsagen.load_spec("nsa-paper"), B=1, T=4096, dtype=BF16, device="cuda", seed=2)


def test_paper_learned_compression_bf16_16k():
    check_backward(_long("nsa-paper"), B=1, T=16384, dtype=BF16, device="cuda", seed=5)


@pytest.mark.parametrize("name", ["nsa-g1", "nsa-g4"])
def test_small_groups_bf16(name):
    spec = nsagen.load_spec(name)
    spec = spec.replace(heads_q=4 * spec.group, heads_kv=4)  # 64 KV heads: too big a reference
    check_backward(spec, B=1, T=2048, dtype=BF16, device="cuda", seed=3)


def test_varlen_bf16():
    check_backward(nsagen.load_spec("nsa-d128"), B=1, T=0, dtype=BF16, device="cuda", seed=4,
                   varlen_lens=[1, 3000, 77, 1025])


def _inputs(spec, T, requires_grad=True):
    g = torch.Generator(device="cpu").manual_seed(5)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(BF16).cuda().requires_grad_(requires_grad)

    return (rnd(1, T, spec.heads_q, spec.dim_qk), rnd(1, T, spec.heads_kv, spec.dim_qk),
            rnd(1, T, spec.heads_kv, spec.dim_v),
            torch.rand(1, T, spec.heads_q, 3, generator=g).to(BF16).cuda().requires_grad_(requires_grad))


def test_opcheck():
    spec = nsagen.load_spec("nsa-d128")
    op = nsagen.build(spec)
    q, k, v, gates = _inputs(spec, 700)
    torch.library.opcheck(op._train_op, (q, k, v, gates, None, None, None, None, None))


@pytest.mark.parametrize("T", [1024, 4096])
def test_compile_fullgraph(T):
    """T = 1024 runs the short-length plan, 4096 the block choice and the inverse map."""
    spec = nsagen.load_spec("nsa-d128")
    op = nsagen.build(spec)

    class Block(torch.nn.Module):
        def forward(self, q, k, v, gates):
            return op(q, k, v, gates).float().square().mean()

    q, k, v, gates = _inputs(spec, T)
    torch._dynamo.reset()
    compiled = torch.compile(Block(), fullgraph=True)
    loss = compiled(q, k, v, gates)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v, gates)]
    for t in (q, k, v, gates):
        t.grad = None
    Block()(q, k, v, gates).backward()
    for a, b in zip(grads, (q.grad, k.grad, v.grad, gates.grad)):
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper"])
def test_own_query_for_the_compressed_branch_bf16(name):
    """q_cmp drives the compressed branch and the block scores; dq_cmp from the compressed
    branch's backward (the reference on the same blocks)."""
    check_backward(nsagen.load_spec(name), B=1, T=3000, dtype=BF16, device="cuda", seed=5,
                   q_cmp=True)


def test_q_cmp_equal_to_q_is_todays_op_bit_for_bit_bf16():
    """Passing q itself as q_cmp launches the same kernels on the same data: the output is bit
    for bit that of the call without q_cmp, and so is every gradient up to the order of the
    backward's fp32 atomic adds (the CPU test compares those bit for bit too)."""
    spec = nsagen.load_spec("nsa-d128")
    op = nsagen.build(spec)
    torch.manual_seed(13)
    T = 2000
    q = torch.randn(1, T, spec.heads_q, spec.dim_qk, device="cuda", dtype=BF16)
    k = torch.randn(1, T, spec.heads_kv, spec.dim_qk, device="cuda", dtype=BF16)
    v = torch.randn(1, T, spec.heads_kv, spec.dim_v, device="cuda", dtype=BF16)
    gates = torch.rand(1, T, spec.heads_q, 3, device="cuda", dtype=BF16)
    args = [t.requires_grad_(True) for t in (q, k, v, gates)]
    do = torch.randn(1, T, spec.heads_q, spec.dim_v, device="cuda", dtype=BF16)
    o = op(*args)
    g = torch.autograd.grad(o, args, do)
    o2 = op(*args, q_cmp=q)
    g2 = torch.autograd.grad(o2, args, do)
    assert torch.equal(o, o2)
    for a, b in zip(g, g2):
        assert ((a.float() - b.float()).norm() <= 1e-3 * b.float().norm()), \
            (a.float() - b.float()).norm() / b.float().norm()


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper", "nsa-g1"])
def test_queries_that_end_each_sequence_bf16(name):
    """cu_seqlens_k (a chunk over its whole prefix, as context parallelism runs it) at real
    block sizes: every gradient, the keys' included."""
    spec = nsagen.load_spec(name)
    spec = spec.replace(heads_q=2 * spec.group, heads_kv=2)
    check_backward(spec, B=1, T=0, dtype=BF16, device="cuda", seed=23,
                   varlen_lens=[3000, 1100, 2048], qlens=[1000, 1100, 513])


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-fla", "nsa-paper"])
def test_short_plan_bf16(name):
    """Calls of at most n*l' tokens that do not ask for the block indices take the short plan
    (dense selected branch in the window kernel): a full-length sequence and a ragged batch."""
    spec = nsagen.load_spec(name)
    n = spec.slc_count * spec.slc_block
    check_backward(spec, B=1, T=n, dtype=BF16, device="cuda", seed=5, indices=False)
    check_backward(spec, B=1, T=0, dtype=BF16, device="cuda", seed=6, indices=False,
                   varlen_lens=[n, 77, n // 2 + 3])
