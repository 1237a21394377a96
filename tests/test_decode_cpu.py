"""Token-by-token decoding equals the prefill rows: the reference fallback and the generated
kernels (under TRITON_INTERPRET=1), ragged batches, lengths crossing emission points, T < l."""
import os

import pytest
import torch

import nsagen

from kernel_checks import make_inputs, rel_err, scaled

INTERP = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


def _decode_vs_prefill(spec, prompt_lens, T, dtype=torch.float32, seed=0):
    """Prefill each row with its prompt, decode the rest one token at a time, compare each step
    with the reference prefill row of the full sequence."""
    B = len(prompt_lens)
    op = nsagen.build(spec)
    x = make_inputs(spec, B, T, dtype, "cpu", seed)
    q, k, v, gates = x["q"], x["k"], x["v"], x["gates"]
    kc_all = vc_all = None
    if spec.learned_compression:
        kc_all, vc_all = x["k_cmp"], x["v_cmp"]
    kw, vw = x["k_win"], x["v_win"]
    ref, ref_idx = nsagen.reference.nsa(
        q.double(), k.double(), v.double(), gates.double(), spec,
        None if kc_all is None else kc_all.double(), None if vc_all is None else vc_all.double(),
        return_indices=True, k_win=None if kw is None else kw.double(),
        v_win=None if vw is None else vw.double())
    cache = op.new_cache(B, T, device="cpu", dtype=dtype)
    P = max(prompt_lens)
    cache.prefill(k[:, :P], v[:, :P], torch.tensor(prompt_lens, dtype=torch.int32),
                  k_cmp=None if kc_all is None else kc_all[:, :spec.num_cmp(P)],
                  v_cmp=None if vc_all is None else vc_all[:, :spec.num_cmp(P)],
                  k_win=None if kw is None else kw[:, :P], v_win=None if vw is None else vw[:, :P])
    pos = list(prompt_lens)
    worst = 0.0
    # rows advance together; a row whose prompt is shorter is still at an earlier position
    for _ in range(T - P):
        rows = torch.arange(B)
        t = torch.tensor(pos)
        extra = {}
        if spec.learned_compression:
            i = torch.clamp((t + 1 - spec.cmp_block) // spec.cmp_stride, min=0)
            extra = dict(k_cmp_t=kc_all[rows, i], v_cmp_t=vc_all[rows, i])
        if kw is not None:
            extra.update(k_win_t=kw[rows, t], v_win_t=vw[rows, t])
        cache.append(k[rows, t], v[rows, t], **extra)
        o, idx = cache.step(q[rows, t], gates[rows, t], return_indices=True)
        if spec.has("slc"):
            assert torch.equal(idx, ref_idx[rows, t])
        worst = max(worst, rel_err(o, ref[rows, t]))
        pos = [p + 1 for p in pos]
    assert worst < 1e-4, worst
    return worst


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
@pytest.mark.parametrize("name", ["nsa-d128", "nsa-fla", "nsa-paper"])
def test_kernels_decode_equals_prefill(name):
    spec = scaled(nsagen.load_spec(name))
    _decode_vs_prefill(spec, [3, 9], T=30, seed=1)


@pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only machines")
def test_kernels_decode_separate_kv_and_short_prompt():
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(kv_per_branch="separate")
    _decode_vs_prefill(spec, [1, 2], T=12, seed=2)  # starts with T < l, crosses emission points


def test_reference_fallback_decode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = scaled(nsagen.load_spec("nsa-paper"))
    _decode_vs_prefill(spec, [4, 11], T=24, dtype=torch.float64, seed=3)


def test_cache_emission_rule_and_capacity():
    spec = scaled(nsagen.load_spec("nsa-d128"))  # l=8, d=4
    cache = nsagen.build(spec).new_cache(1, 13, dtype=torch.float32)
    emitted = []
    for t in range(13):
        emitted.append(bool(cache.emits()[0]))
        cache.append(torch.randn(1, spec.heads_kv, spec.dim_qk), torch.randn(1, spec.heads_kv, spec.dim_v))
    # a compressed token appears when t + 1 >= l and (t + 1 - l) % d == 0
    assert [t for t, e in enumerate(emitted) if e] == [7, 11]
    with pytest.raises(ValueError, match="cache full"):
        cache.append(torch.randn(1, spec.heads_kv, spec.dim_qk), torch.randn(1, spec.heads_kv, spec.dim_v))
    with pytest.raises(ValueError, match="q:"):
        cache.step(torch.randn(2, spec.heads_q, spec.dim_qk))
