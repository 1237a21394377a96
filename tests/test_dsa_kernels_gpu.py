"""The generated DSA kernels on a CUDA GPU in bfloat16 at realistic head counts and dims, against
the float64 reference computed on the same GPU (the selection compared by score). Skipped where
there is no GPU."""
import pytest
import torch

import nsagen
from nsagen import reference

from dsa_checks import check_forward, dsa_inputs, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16 = torch.bfloat16


def _spec(name, topk):
    # a smaller top-k than the shipped one keeps the float64 reference's gathers in memory
    return nsagen.load_spec(name).replace(topk=topk)


@pytest.mark.parametrize("name,topk,lens", [("dsa-gqa", 256, [1, 700, 2049]),
                                            ("dsa-v32", 128, [900]),
                                            ("dsa-v32", 2048, [1500])])
def test_forward_bf16(name, topk, lens):
    spec = _spec(name, topk)
    op = nsagen.build(spec)
    x, _ = dsa_inputs(spec, lens, BF16, "cuda", seed=len(lens) + topk,
                      with_v=spec.dim_v == spec.dim_qk)
    check_forward(op, x, lens, BF16)


@pytest.mark.parametrize("name,topk,form", [("dsa-gqa", 256, {}), ("dsa-v32", 128, {}),
                                            ("dsa-v32", 128, {"STORE_DS": 0, "KT": 1, "BH": 32}),
                                            ("dsa-gqa", 256, {"STORE_DS": 1})])
def test_backward_and_indexer_loss_bf16(name, topk, form):
    """Gradients and the indexer loss against the reference; the backward in its default form
    and in another (keys-as-rows for MLA's wide heads, stored dS for small ones)."""
    spec = _spec(name, topk)
    op = nsagen.build(spec)
    op.configs = {"dsa_attention_bwd": dict(op.module.CONFIGS["dsa_attention_bwd"], **form)}
    lens = [1200]
    mla = spec.dim_v < spec.dim_qk
    x, cu = dsa_inputs(spec, lens, BF16, "cuda", seed=topk, with_v=not mla)
    leaves = [n for n in ("q", "k", "v") if x[n] is not None]
    for n in leaves:
        x[n].requires_grad_(True)
    o, idx = op(**x, return_indices=True)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, [x[n] for n in leaves], do)
    ref_in = {n: x[n].detach().double().requires_grad_(True) for n in leaves}
    ref_o = reference.dsa_sparse_attention(spec, ref_in["q"], ref_in["k"],
                                           ref_in["v"] if not mla else None, idx)
    want = torch.autograd.grad(ref_o, [ref_in[n] for n in leaves], do.double())
    for n, a, b in zip(leaves, got, want):
        assert rel_err(a, b) < 2e-2, (n, rel_err(a, b))
    xi = {n: x[n].detach() for n in ("q", "k", "q_idx", "k_idx", "w_idx")}
    for n in ("q_idx", "k_idx", "w_idx"):
        xi[n].requires_grad_(True)
    loss = op.indexer_loss(**xi)
    g = torch.autograd.grad(loss, [xi["q_idx"], xi["k_idx"], xi["w_idx"]])
    ri = {n: t.double().requires_grad_(n in ("q_idx", "k_idx", "w_idx")) for n, t in xi.items()}
    ref = reference.dsa_indexer_loss(**ri, spec=spec)
    gw = torch.autograd.grad(ref, [ri["q_idx"], ri["k_idx"], ri["w_idx"]])
    assert abs(loss.item() - ref.item()) <= 2e-2 * max(1.0, abs(ref.item()))
    for a, b in zip(g, gw):
        assert rel_err(a, b) < 5e-2


def test_decode_steps_bf16():
    """Decode steps over a 3000-token cache of dsa-v32 equal the prefill's rows."""
    spec = _spec("dsa-v32", 512)
    op = nsagen.build(spec)
    B, T = 2, 3000
    x, _ = dsa_inputs(spec, [T], BF16, "cuda", seed=9, with_v=False)
    x = {n: None if t is None else t.expand(B, *t.shape[1:]).contiguous() for n, t in x.items()}
    with torch.no_grad():
        full = op(**x)
    cache = op.new_cache(B, T, device="cuda", dtype=BF16, with_values=False)
    start = torch.tensor([T - 6, T - 3], device="cuda")
    cache.prefill(x["k"], None, x["k_idx"], start)
    rows = torch.arange(B, device="cuda")
    for step in range(3):
        t = start + step
        o = cache.decode(x["q"][rows, t], x["k"][rows, t], None, x["q_idx"][rows, t],
                         x["k_idx"][rows, t], x["w_idx"][rows, t])
        assert rel_err(o, full[rows, t]) < 1e-2


def test_fp8_keys_forward_bf16():
    """dsa-v32-fp8 (FP8 tensor cores): picks by score against the reference on the FP8-rounded
    values, output against the reference attention on them."""
    spec = _spec("dsa-v32-fp8", 256)
    op = nsagen.build(spec)
    lens = [1300]
    x, _ = dsa_inputs(spec, lens, BF16, "cuda", seed=21, with_v=False)
    check_forward(op, x, lens, BF16)


def _leaves(spec, T, seed):
    x, _ = dsa_inputs(spec, [T], BF16, "cuda", seed=seed, with_v=spec.dim_v == spec.dim_qk)
    for n in ("q", "k", "v"):
        if x[n] is not None:
            x[n].requires_grad_(True)
    return x


def test_opcheck():
    spec = _spec("dsa-gqa", 128)
    op = nsagen.build(spec)
    x = _leaves(spec, 500, 1)
    torch.library.opcheck(op._train_op, (x["q"], x["k"], x["v"], x["q_idx"], x["k_idx"],
                                         x["w_idx"], None))
    xi = {n: x[n].detach().requires_grad_(n in ("q_idx", "k_idx", "w_idx")) for n in x}
    torch.library.opcheck(op._loss_op, (xi["q"], xi["k"], xi["q_idx"], xi["k_idx"],
                                        xi["w_idx"], None, False))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) through the op and the indexer loss: the same values and
    gradients as eager."""
    spec = _spec("dsa-gqa", 128)
    op = nsagen.build(spec)

    def step(q, k, v, q_idx, k_idx, w_idx):
        o = op(q, k, v, q_idx, k_idx, w_idx)
        return o.float().square().mean() + op.indexer_loss(q, k, q_idx, k_idx, w_idx).float()

    x = _leaves(spec, 700, 2)
    for n in ("q_idx", "k_idx", "w_idx"):
        x[n].requires_grad_(True)
    names = list(x)
    compiled = torch.compile(step, fullgraph=True)
    got = torch.autograd.grad(compiled(**x), [x[n] for n in names])
    want = torch.autograd.grad(step(**x), [x[n] for n in names])
    for n, a, b in zip(names, got, want):
        assert rel_err(a, b) < 1e-2, (n, rel_err(a, b))


def test_decode_step_in_a_cuda_graph():
    """The whole decode step (append + indexer + top-k + attention) captured once and
    replayed: each replay equals the eager step on a copy of the cache."""
    spec = _spec("dsa-v32-fp8", 256)
    op = nsagen.build(spec)
    B, T, L = 4, 900, 1024
    x, _ = dsa_inputs(spec, [T], BF16, "cuda", seed=5, with_v=False)
    x = {n: None if t is None else t.expand(B, *t.shape[1:]).contiguous() for n, t in x.items()}
    start = torch.tensor([T - 9, T - 40, 300, T - 5], device="cuda")
    cache, twin = (op.new_cache(B, L, device="cuda", dtype=BF16, with_values=False)
                   for _ in range(2))
    for c in (cache, twin):
        c.prefill(x["k"], None, x["k_idx"], start)
    rows = torch.arange(B, device="cuda")
    inp = {n: x[n][rows, start].clone() for n in ("q", "k", "q_idx", "k_idx", "w_idx")}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):          # warm-up: compile every kernel before capture
        cache.decode(inp["q"], inp["k"], None, inp["q_idx"], inp["k_idx"], inp["w_idx"])
        cache.rewind(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache.decode(inp["q"], inp["k"], None, inp["q_idx"], inp["k_idx"], inp["w_idx"])
    for step in range(3):
        t = start + step
        for n in inp:
            inp[n].copy_(x[n][rows, t])
        graph.replay()
        want = twin.decode(inp["q"], inp["k"], None, inp["q_idx"], inp["k_idx"], inp["w_idx"])
        assert torch.equal(cache.lens, twin.lens)
        assert rel_err(out, want) < 1e-3
