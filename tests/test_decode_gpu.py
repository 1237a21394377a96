"""Decoding on a CUDA GPU in bfloat16: token-by-token steps equal the prefill rows, ragged
lengths, a cache grown past 64k, and a step captured in a CUDA graph. Skipped without a GPU."""
import pytest
import torch

import nsagen

from kernel_checks import rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BF16 = torch.bfloat16


def _run(spec, prompt_lens, T, steps, seed=0):
    torch.manual_seed(seed)
    B = len(prompt_lens)
    H, HQ, Dk, Dv = spec.heads_kv, spec.heads_q, spec.dim_qk, spec.dim_v
    q = torch.randn(B, T, HQ, Dk, device="cuda", dtype=BF16)
    k = torch.randn(B, T, H, Dk, device="cuda", dtype=BF16)
    v = torch.randn(B, T, H, Dv, device="cuda", dtype=BF16)
    gates = torch.rand(B, T, HQ, 3, device="cuda", dtype=BF16)
    op = nsagen.build(spec)
    cache = op.new_cache(B, T, device="cuda", dtype=BF16)
    P = max(prompt_lens)
    cache.prefill(k[:, :P], v[:, :P], torch.tensor(prompt_lens, dtype=torch.int32, device="cuda"))
    pos = torch.tensor(prompt_lens, device="cuda")
    rows = torch.arange(B, device="cuda")
    for _ in range(steps):
        cache.append(k[rows, pos], v[rows, pos])
        o, idx = cache.step(q[rows, pos], gates[rows, pos], return_indices=True)
        for b in range(B):
            t = int(pos[b])
            want = nsagen.reference.nsa_decode_step(
                q[b:b + 1, t].double(), k[b:b + 1].double(), v[b:b + 1].double(),
                gates[b:b + 1, t].double(), spec, cache_seqlens=torch.tensor([t + 1]),
                block_indices=idx[b:b + 1])  # near-ties may flip in bf16: check on its blocks
            err = rel_err(o[b:b + 1], want)
            assert err < 2e-2, (b, t, err)
        pos += 1


def test_decode_equals_prefill_ragged():
    _run(nsagen.load_spec("nsa-d128"), [1000, 1517], T=1600, steps=40)


def test_decode_past_64k():
    _run(nsagen.load_spec("nsa-d128"), [65530], T=65600, steps=12, seed=1)


def test_step_captured_in_cuda_graph():
    spec = nsagen.load_spec("nsa-d128")
    op = nsagen.build(spec)
    B, L = 8, 8192
    cache = op.new_cache(B, L, device="cuda", dtype=BF16)
    cache.prefill(torch.randn(B, L - 1, 4, 128, device="cuda", dtype=BF16),
                  torch.randn(B, L - 1, 4, 128, device="cuda", dtype=BF16))
    cache.append(torch.randn(B, 4, 128, device="cuda", dtype=BF16),
                 torch.randn(B, 4, 128, device="cuda", dtype=BF16))
    q = torch.randn(B, 64, 128, device="cuda", dtype=BF16)
    eager = cache.step(q)
    out = torch.empty_like(eager)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out.copy_(cache.step(q))
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out.copy_(cache.step(q))
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
