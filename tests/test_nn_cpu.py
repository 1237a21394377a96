"""The SparseAttention layer on the CPU: forward and parameter gradients through the generated
kernels (TRITON_INTERPRET=1) against the same layer wired to the float64 reference op, decoding
with the cache against the training forward, varlen, RoPE placement, gates, state_dict, refused
configurations, and the retrieval example's --smoke run."""
import importlib.util
import io
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

import nsagen
from nsagen.nn import SparseAttention, reference_op

ROOT = Path(__file__).resolve().parent.parent
INTERP = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_interp = pytest.mark.skipif(not INTERP, reason="kernels under the interpreter on CPU-only "
                                                     "machines")


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: one intra-op thread is faster, and steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_spec(kind="mlp", kv="shared", heads=(2, 1), **kw):
    """A shrunken paper layer: l=8, d=4, l'=8, n=3 (1 initial, 1 local), w=8, Dk=12 != Dv=8."""
    return nsagen.load_spec("nsa-paper").replace(
        name=f"nn-{kind}-{kv}", heads_q=heads[0], heads_kv=heads[1], dim_qk=12, dim_v=8,
        cmp_block=8, cmp_stride=4, slc_block=8, slc_count=3, slc_initial=1, slc_local=1,
        window=8, cmp_kind=kind, kv_per_branch=kv, **kw)


def randomize(layer, seed):
    """Fresh random parameters everywhere (the zero-initialised gate and phi output layers
    included, so every path carries a gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
    return layer


def pair(spec, seed=0, **kw):
    """The layer on the generated op (float32) and a float64 copy on the reference op."""
    hidden = spec.heads_q * spec.dim_v
    a = randomize(SparseAttention(spec, hidden, **kw), seed)
    b = SparseAttention(spec, hidden, op=reference_op(spec), **kw).double()
    b.load_state_dict(a.state_dict())
    return a, b


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_against_reference(spec, B, T, seed, cu_seqlens=None, **kw):
    a, b = pair(spec, seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, a.hidden_size, generator=g)
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    ya, yb = a(xa, cu_seqlens=cu_seqlens), b(xb, cu_seqlens=cu_seqlens)
    assert torch.isfinite(ya).all()
    assert rel(ya, yb) < 1e-4, rel(ya, yb)
    dy = torch.randn(ya.shape, generator=g)
    ya.backward(dy)
    yb.backward(dy.double())
    assert rel(xa.grad, xb.grad) < 1e-4
    grads_b = {n: p.grad for n, p in b.named_parameters()}
    scale = max(gb.norm().item() for gb in grads_b.values() if gb is not None)
    for n, p in a.named_parameters():
        gb = grads_b[n]
        if gb is None:   # e.g. phi of a sequence shorter than l: no window, no gradient
            assert p.grad is None or p.grad.abs().max() == 0, n
            continue
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), n
        err = (p.grad.double() - gb).norm().item()
        # exactly 0 in float64 (e.g. q's through a softmax over one key) is float32 rounding
        # noise in the kernels: bounded against the layer's gradient scale
        floor = (1e-5 if gb.norm() == 0 else 1e-6) * scale
        assert err <= 1e-4 * gb.norm().item() + floor, f"d{n}: {err:.3g} vs {gb.norm():.3g}"
    longest = T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if spec.num_cmp(longest) >= 2 and spec.learned_compression and spec.has("cmp"):
        # the compression path is live: phi's parameters get a real gradient (with a single
        # visible compressed token its softmax is constant and phi_k rightly gets none; the
        # block choice alone gives none)
        for n in ("phi_k.", "phi_v."):
            assert any(v is not None and v.abs().max() > 0
                       for k, v in grads_b.items() if k.startswith(n)), n


# ------------------------------------------------------------------ forward / backward
CASES = [("mean", "shared", (2, 1), 1), ("mean", "shared", (2, 1), 37),
         ("linear", "shared", (4, 2), 17),          # GQA: two KV heads of two query heads each
         ("mlp", "shared", (2, 1), 1), ("mlp", "shared", (2, 1), 100),
         ("mlp", "separate", (2, 1), 29)]


@needs_interp
@pytest.mark.parametrize("kind,kv,heads,T", CASES,
                         ids=[f"{k}-{s}-h{h[0]}x{h[1]}-T{t}" for k, s, h, t in CASES])
def test_layer_matches_reference_layer(kind, kv, heads, T):
    check_against_reference(small_spec(kind, kv, heads), B=1, T=T, seed=T + len(kind))


@needs_interp
def test_layer_varlen_matches_reference_layer():
    """A packed batch (sequences of 3 and 14 tokens) through the kernels."""
    cu = torch.tensor([0, 3, 17], dtype=torch.int32)
    check_against_reference(small_spec("linear", "separate"), B=1, T=17, seed=6, cu_seqlens=cu)


def test_varlen_equals_per_sequence_loop():
    """Positions, compression windows and RoPE restart at every packed sequence."""
    spec = small_spec("mlp", "separate")
    layer = randomize(SparseAttention(spec, 16, op=reference_op(spec)).double(), 7)
    lens = [13, 1, 22, 9]
    x = torch.randn(1, sum(lens), 16, dtype=torch.float64)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    packed = layer(x, cu_seqlens=cu)
    loop = torch.cat([layer(s) for s in x.split(lens, 1)], 1)
    assert rel(packed, loop) < 1e-12


# ------------------------------------------------------------------ decoding
def _poison(cache):
    """NaN everywhere the cache has not written yet: reading an unwritten slot fails."""
    for name in ("k", "v", "k_cmp", "v_cmp", "k_win", "v_win"):
        t = getattr(cache.kv, name, None)
        if t is not None:
            t.fill_(float("nan"))
    for name in ("ring_k", "ring_v"):
        if hasattr(cache, name):
            getattr(cache, name).fill_(float("nan"))


def _decode_equals_forward(spec, B, T, prompt, seed, dtype=torch.float32, **kw):
    layer = randomize(SparseAttention(spec, spec.heads_q * spec.dim_v, **kw), seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, layer.hidden_size, generator=g, dtype=dtype)
    with torch.no_grad():
        want = layer(x)
        cache = layer.new_cache(B, T)
        _poison(cache)
        got = [layer(x[:, :prompt], cache=cache)]
        for t in range(prompt, T):
            got.append(layer(x[:, t:t + 1], cache=cache))
    got = torch.cat(got, 1)
    assert cache.length == T and cache.kv.lens.tolist() == [T] * B
    assert torch.isfinite(got).all()
    for t in range(T):   # every row of every step
        assert rel(got[:, t], want[:, t]) < 1e-5, (t, rel(got[:, t], want[:, t]))


@needs_interp
def test_decode_equals_training_forward_learned_separate():
    # prompt shorter than l: the ring buffer holds a partial window; emissions at t = 7, 11, 15
    _decode_equals_forward(small_spec("mlp", "separate"), B=1, T=16, prompt=5, seed=8)


@needs_interp
def test_decode_equals_training_forward_mean():
    _decode_equals_forward(small_spec("mean"), B=1, T=14, prompt=9, seed=9)


@needs_interp
@pytest.mark.parametrize("kind,kv", [("mean", "shared"), ("mlp", "shared"), ("mlp", "separate")])
def test_layer_with_an_unrotated_compressed_path(kind, kv):
    """rope=("slc", "win"): the compressed branch and the block scores read an un-rotated
    query (q_cmp) and un-rotated compressed keys; kernels against the reference layer (forward
    and every gradient, packed sequences), and decoding against the training forward."""
    spec = small_spec(kind, kv)
    check_against_reference(spec, B=1, T=37, seed=41, rope=("slc", "win"))
    check_against_reference(spec, B=1, T=21, seed=42, rope=("slc", "win"),
                            cu_seqlens=torch.tensor([0, 6, 21], dtype=torch.int32))
    _decode_equals_forward(spec, B=2, T=18, prompt=6, seed=43, rope=("slc", "win"))


def test_rope_per_branch_reaches_the_op():
    """What the op receives: q and k rotated, q_cmp un-rotated; a mean layer computes the
    compressed keys itself (the mean of un-rotated keys) instead of the op's mean of rotated
    ones; rope=True passes no q_cmp at all (today's call)."""
    from nsagen.nn import apply_rope
    spec = small_spec("mean")
    seen = []

    def op(q, k, v, gates=None, k_cmp=None, v_cmp=None, cu_seqlens=None, k_win=None,
           v_win=None, **kw):
        seen.append(dict(q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, **kw))
        return nsagen.reference.nsa(q, k, v, gates, spec, k_cmp, v_cmp, cu_seqlens,
                                    k_win=k_win, v_win=v_win, **kw)

    layer = randomize(SparseAttention(spec, 16, op=op, rope=("slc", "win")).double(), 5)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    layer(x)
    got = seen[-1]
    pos = torch.arange(20)
    q_raw = layer.q_proj(x).unflatten(-1, (-1, spec.dim_qk))
    k_raw = layer.k_proj(x).unflatten(-1, (-1, spec.dim_qk))
    assert torch.allclose(got["q"], apply_rope(q_raw, pos))
    assert torch.allclose(got["q_cmp"], q_raw)
    assert torch.allclose(got["k"], apply_rope(k_raw, pos))
    assert torch.allclose(got["k_cmp"], nsagen.reference.mean_compress(k_raw, spec))
    plain = SparseAttention(spec, 16, op=op).double()
    plain.load_state_dict(layer.state_dict())
    plain(x)
    assert "q_cmp" not in seen[-1] and seen[-1]["k_cmp"] is None
    with pytest.raises(ValueError, match="share one query"):
        SparseAttention(spec, 16, op=op, rope=("cmp", "slc"))
    with pytest.raises(ValueError, match="rope: expected"):
        SparseAttention(spec, 16, op=op, rope=("rot",))


def test_gate_bias_starts_the_gates_where_asked():
    spec = small_spec("mean")
    layer = SparseAttention(spec, 16, op=reference_op(spec), gate_bias={"cmp": 2.0, "win": -1.0})
    g = layer.gates(torch.randn(3, 16))
    assert torch.allclose(g[..., 0], torch.sigmoid(torch.tensor(2.0)).expand(3, 2))
    assert torch.allclose(g[..., 1], torch.full((3, 2), 0.5))
    assert torch.allclose(g[..., 2], torch.sigmoid(torch.tensor(-1.0)).expand(3, 2))
    with pytest.raises(ValueError, match="gate_bias: 'sel' is not a branch"):
        SparseAttention(spec, 16, op=reference_op(spec), gate_bias={"sel": 1.0})
    with pytest.raises(ValueError, match=r"gate_bias\[cmp\]: expected a finite number"):
        SparseAttention(spec, 16, op=reference_op(spec), gate_bias={"cmp": float("nan")})


def test_decode_reference_fallback_from_first_token(monkeypatch):
    """Without kernels the op and the cache fall back to the reference: decoding from an empty
    cache (T=1 prompt) through many emissions, float64, GQA."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _decode_equals_forward(small_spec("linear", heads=(4, 2)), B=2, T=30, prompt=1,
                               seed=10, dtype=torch.float64)


# ------------------------------------------------------------------ RoPE, gates
def _rotate_complex(x, pos, theta):
    """Independent RoPE: dims (j, j + D/2) as a complex number, turned by pos * theta^(-2j/D)."""
    D = x.shape[-1]
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double())
    freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    z = z * torch.polar(torch.ones_like(freq), pos.double()[:, None, None] * freq)
    return torch.cat([z.real, z.imag], -1)


def test_rope_placement():
    """Queries and keys rotate at their positions; a compressed key is phi of the un-rotated
    window (linear phi starts as the mean) rotated at the window's last position; values never
    rotate."""
    spec = small_spec("linear")
    layer = SparseAttention(spec, 16, op=reference_op(spec), rope_theta=500.0).double()
    T = 23
    x = torch.randn(1, T, 16, dtype=torch.float64)
    p = layer.project(x)
    k = layer.k_proj(x).view(1, T, 1, 12)
    v = layer.v_proj(x).view(1, T, 1, 8)
    pos = torch.arange(T)
    assert torch.allclose(p["k"][0], _rotate_complex(k[0], pos, 500.0), atol=1e-12)
    assert torch.allclose(p["v"], v)
    nc = spec.num_cmp(T)
    ends = torch.arange(nc) * spec.cmp_stride + spec.cmp_block - 1
    mean_k = torch.stack([k[0, i * 4:i * 4 + 8].mean(0) for i in range(nc)])
    mean_v = torch.stack([v[0, i * 4:i * 4 + 8].mean(0) for i in range(nc)])
    assert torch.allclose(p["k_cmp"][0], _rotate_complex(mean_k, ends, 500.0), atol=1e-12)
    assert torch.allclose(p["v_cmp"][0], mean_v, atol=1e-12)
    q = layer.q_proj(x).view(1, T, 2, 12)
    assert torch.allclose(p["q"][0], _rotate_complex(q[0], pos, 500.0), atol=1e-12)


def test_gates_one_per_head_and_present_branch():
    spec = small_spec("mlp").replace(branches=("cmp", "slc"), window=None)
    layer = randomize(SparseAttention(spec, 16, op=reference_op(spec)), 11)
    assert layer.gate[-1].out_features == spec.heads_q * 2
    x = torch.randn(2, 5, 16)
    g = layer.gates(x)
    assert g.shape == (2, 5, spec.heads_q, 3)
    assert (g[..., 2] == 0).all() and (g[..., :2] > 0).all() and (g[..., :2] < 1).all()
    fresh = SparseAttention(spec, 16, op=reference_op(spec))
    assert torch.equal(fresh.gates(x), torch.full((2, 5, spec.heads_q, 3), 0.5).index_fill(
        -1, torch.tensor([2]), 0.0))   # gates start at sigmoid(0) = 0.5


# ------------------------------------------------------------------ state_dict
def test_state_dict_round_trip():
    spec = small_spec("mlp", "separate")
    a = randomize(SparseAttention(spec, 16, op=reference_op(spec)), 12)
    keys = set(a.state_dict())
    for want in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                 "k_cmp_proj.weight", "v_cmp_proj.weight", "k_win_proj.weight",
                 "v_win_proj.weight", "phi_k.pos", "phi_k.fc1.weight", "phi_k.fc2.weight",
                 "phi_v.pos", "gate.0.weight", "gate.2.bias"):
        assert want in keys, want
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = SparseAttention(spec, 16, op=reference_op(spec))
    x = torch.randn(2, 19, 16)
    assert rel(b(x), a(x)) > 1e-2          # different before loading
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(b(x), a(x))
    for (n, p), (m, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n == m and torch.equal(p, q)
    other = SparseAttention(small_spec("linear", "shared"), 16, op=reference_op(spec))
    with pytest.raises(RuntimeError, match="phi_k"):
        other.load_state_dict(a.state_dict())


def test_mean_compression_has_no_phi_parameters():
    spec = small_spec("mean")
    names = [n for n, _ in SparseAttention(spec, 16, op=reference_op(spec)).named_parameters()]
    assert not any(n.startswith(("phi_", "k_cmp_proj", "v_cmp_proj")) for n in names)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("hidden,match", [
    (15, r"hidden_size: 15: not divisible by the spec's heads\.q \(2\)"),
    (32, r"hidden_size: 32: does not match the spec's heads\.q \* head_dim\.v = 2 \* 8 = 16"),
    (0, r"hidden_size: 0: must be a positive integer"),
    (16.0, r"hidden_size: 16\.0: must be a positive integer"),
])
def test_bad_hidden_size(hidden, match):
    spec = small_spec()
    with pytest.raises(ValueError, match=match):
        SparseAttention(spec, hidden)


def test_other_refusals():
    spec = small_spec()
    op = reference_op(spec)
    # an explicit width change is allowed when asked for
    wide = SparseAttention(spec, 32, match_width=False, op=op)
    assert wide(torch.randn(1, 4, 32)).shape == (1, 4, 32)
    with pytest.raises(TypeError, match="spec: expected an nsagen.Spec"):
        SparseAttention({"name": "x"}, 16)
    odd = spec.replace(dim_qk=9)
    with pytest.raises(ValueError, match=r"head_dim\.qk: 9: rotary embeddings need an even"):
        SparseAttention(odd, 16)
    SparseAttention(odd, 16, rope=False, op=reference_op(odd))   # fine without RoPE
    with pytest.raises(ValueError, match="gate_hidden: 0: must be a positive integer"):
        SparseAttention(spec, 16, gate_hidden=0)
    with pytest.raises(ValueError, match="rope_theta"):
        SparseAttention(spec, 16, rope_theta=-1.0)
    layer = SparseAttention(spec, 16, op=op)
    with pytest.raises(ValueError, match=r"x: expected \[B, T, hidden_size=16\], got \(1, 4, 8\)"):
        layer(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="cu_seqlens: requires batch size 1"):
        layer(torch.randn(2, 4, 16), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(TypeError, match="op: decoding needs an op with new_cache"):
        layer.new_cache(1, 8)


def test_cache_refusals(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = small_spec("mean")
    a, b = SparseAttention(spec, 16), SparseAttention(spec, 16)
    cache = a.new_cache(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="cache: was made by another layer"):
            b(torch.randn(2, 1, 16), cache=cache)
        with pytest.raises(ValueError, match="x: batch 1 does not match the cache's 2"):
            a(torch.randn(1, 1, 16), cache=cache)
        a(torch.randn(2, 4, 16), cache=cache)
        with pytest.raises(ValueError, match=r"cache full: 4 \+ 3 tokens > max_len=6"):
            a(torch.randn(2, 3, 16), cache=cache)
        with pytest.raises(ValueError, match="cu_seqlens: not supported with a decode cache"):
            a(torch.randn(1, 2, 16), cache=cache,
              cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))


# ------------------------------------------------------------------ the example
def _load_example():
    path = ROOT / "examples" / "retrieval.py"
    mod_spec = importlib.util.spec_from_file_location("retrieval_example", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_retrieval_example_compile_mode(monkeypatch):
    """--compile-mode reaches torch.compile (CUDA graphs with reduce-overhead); bad modes are
    refused by the parser."""
    mod = _load_example()
    assert mod.parse(["x.json"]).compile_mode == "default"
    a = mod.parse(["x.json", "--compile", "--compile-mode", "reduce-overhead"])
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    model = torch.nn.Linear(2, 2)
    assert mod._compiled(model, a.compile_mode) is model
    assert seen == {"dynamic": False, "mode": "reduce-overhead"}
    with pytest.raises(SystemExit):
        mod.parse(["x.json", "--compile-mode", "max-autotune"])


def test_retrieval_example_smoke(tmp_path, monkeypatch):
    """examples/retrieval.py --smoke end to end (the op runs the reference on the CPU)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mod = _load_example()
    out = tmp_path / "res" / "retrieval.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = mod.main([str(out), "--smoke"])
    import json

    saved = json.loads(out.read_text())
    assert saved["models"].keys() == {"nsagen", "full"} == res["models"].keys()
    nsa, full = saved["models"]["nsagen"], saved["models"]["full"]
    for r in (nsa, full):
        assert r["steps"] == 3 and r["tokens"] == 3 * 256
        assert r["train_tokens_per_s"] > 0
        assert set(r["eval"]) == {"128"}
        e = r["eval"]["128"]
        assert 0.0 <= e["accuracy"] <= 1.0 and e["answers"] == 2 * 4
        assert all(math.isfinite(c["loss"]) for c in r["curve"])
    assert nsa["params"] > full["params"]   # gates and learned compression
    # per-length speed of the two models, and their ratio where both trained
    lens = set(nsa["train_tokens_per_s_by_length"])
    assert lens and lens == set(full["train_tokens_per_s_by_length"])
    ratio = saved["speed_ratio_by_length"]
    assert set(ratio) == lens
    for T, x in ratio.items():
        want = nsa["train_tokens_per_s_by_length"][T] / full["train_tokens_per_s_by_length"][T]
        assert x == pytest.approx(want) and x > 0
    # the selection probe, every logged step, per NSA layer
    assert len(nsa["probe"]) == 3 and full["probe"] == []
    pr = nsa["probe"][-1]
    assert pr["T"] == 128 and len(pr["layers"]) == 2
    for lay in pr["layers"]:
        assert 0 <= lay["needle_selected"] <= 1 and 0 < lay["random_coverage"] <= 1
        assert 0 < lay["gate_cmp"] < 1 and lay["needle_block_rank"] >= 0
        assert lay["score_near_over_far"] > 0
        assert 0 <= lay["cmp_mass_on_needle"] <= 1 and 0 <= lay["cmp_mass_uniform"] <= 1
    assert 0 <= pr["reachable"] <= 1
    assert saved["config"]["spec"]["compression"]["kind"] == "mlp"
    # the diagnostic arms' switches: RoPE kept out of the compressed path, the gate started open
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        arm = mod.main([str(out), "--smoke", "--rope", "no-cmp", "--gate-bias-cmp", "2",
                        "--cmp-kind", "mean", "--selection-grad", "straight-through"])
    assert arm["config"]["rope"] == "no-cmp" and arm["config"]["gate_bias_cmp"] == 2.0
    assert arm["config"]["selection_grad"] == "straight-through"
    assert all(math.isfinite(c["loss"]) for r in arm["models"].values() for c in r["curve"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        arm = mod.main([str(out), "--smoke", "--rope", "no-cmp", "--selection-grad", "distill",
                        "--selection-weight", "0.5", "--models", "nsagen"])
    assert arm["config"]["selection_weight"] == 0.5
    assert all(math.isfinite(c["loss"]) for r in arm["models"].values() for c in r["curve"])
    assert all(math.isfinite(layer["selection_loss"])
               for pr in arm["models"]["nsagen"]["probe"] for layer in pr["layers"])


def _chosen_block_score_loops(spec, q_cmp, k_cmp, idx):
    """chosen_block_score written as plain loops over tokens, KV heads, blocks and windows,
    with the reference's block_weights (float64): the log of the chosen blocks' importance
    over every block's."""
    from nsagen import reference

    B, T, HQ, _ = q_cmp.shape
    H, G, d, lw = spec.heads_kv, spec.group, spec.cmp_stride, spec.cmp_block
    nb = spec.num_blocks(T)
    W = reference.block_weights(spec, k_cmp.shape[1], nb)
    out = torch.zeros(B, T, H, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                def log_importance(blocks):
                    terms = [math.log(W[i, j]) + spec.softmax_scale
                             * float(q_cmp[b, t, h * G + g] @ k_cmp[b, i, h])
                             for j in blocks for i in range(k_cmp.shape[1])
                             if W[i, j] > 0 and i * d + lw - 1 <= t for g in range(G)]
                    return (float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0))
                            if terms else None)
                chosen = log_importance([j for j in idx[b, t, h].tolist() if j >= 0])
                total = log_importance(range(nb))
                if chosen is not None and total is not None:
                    out[b, t, h] = chosen - total
    return out


def test_chosen_block_score_equals_loops():
    """The chosen blocks' log share of the importance: the loops' value, at most 0, and exactly
    0 while the top-n holds every block (nothing to choose between)."""
    from nsagen.selection_grad import chosen_block_score

    spec = small_spec(kind="mean", heads=(4, 2))
    g = torch.Generator().manual_seed(5)
    B, T = 2, 45
    q = torch.randn(B, T, 4, 12, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, 2, 12, generator=g, dtype=torch.float64)
    kc = nsagen.reference.mean_compress(k, spec)
    _, idx = nsagen.reference.nsa(q, k, torch.randn(B, T, 2, 8, generator=g, dtype=torch.float64),
                                  None, spec, return_indices=True)
    got = chosen_block_score(spec, q, kc, idx, torch.arange(T))
    torch.testing.assert_close(got, _chosen_block_score_loops(spec, q, kc, idx))
    assert (got <= 1e-12).all()
    full = spec.slc_count * spec.slc_block          # rows before this hold every block
    assert got[:, :full].abs().max() < 1e-12 and got[:, full:].min() < -1e-3
    # shorter than l: no compressed token, every score 0 (this once indexed an empty tensor)
    short = chosen_block_score(spec, q[:, :5], kc[:, :0], idx[:, :5], torch.arange(5))
    assert short.shape == (B, 5, 2) and not short.any()


def _distill_loss_loops(spec, q, k, q_cmp, k_cmp, idx, stride):
    """distill_loss written as loops over sampled tokens, KV heads and chosen blocks (float64):
    the selected attention's mass per chosen block against the softmax of their log
    importance (the loops of _chosen_block_score_loops), over blocks with a visible window."""
    from nsagen import reference

    B, T, HQ, _ = q.shape
    H, G, d, lw, bs = spec.heads_kv, spec.group, spec.cmp_stride, spec.cmp_block, spec.slc_block
    W = reference.block_weights(spec, k_cmp.shape[1], spec.num_blocks(T))
    total, rows = 0.0, 0
    for b in range(B):
        for t in range(stride - 1, T, stride):
            for h in range(H):
                blocks, logimp = [], []
                for j in idx[b, t, h].tolist():
                    terms = [math.log(W[i, j]) + spec.softmax_scale
                             * float(q_cmp[b, t, h * G + g] @ k_cmp[b, i, h])
                             for i in range(k_cmp.shape[1]) if j >= 0 and W[i, j] > 0
                             and i * d + lw - 1 <= t for g in range(G)]
                    if terms:
                        blocks.append(j)
                        logimp.append(float(torch.logsumexp(
                            torch.tensor(terms, dtype=torch.float64), 0)))
                if len(blocks) < 2:
                    continue
                toks = [s for j in idx[b, t, h].tolist() if j >= 0
                        for s in range(j * bs, min((j + 1) * bs, t + 1))]
                mass = {j: 0.0 for j in blocks}
                for g in range(G):
                    z = torch.tensor([spec.softmax_scale * float(q[b, t, h * G + g] @ k[b, s, h])
                                      for s in toks], dtype=torch.float64)
                    pr = torch.softmax(z, 0)
                    for s, ps in zip(toks, pr.tolist()):
                        if s // bs in mass:
                            mass[s // bs] += ps / G
                tgt = torch.tensor([mass[j] for j in blocks], dtype=torch.float64)
                tgt = tgt / tgt.sum()
                logp = torch.log_softmax(torch.tensor(logimp, dtype=torch.float64), 0)
                total += float((tgt * (tgt.log() - logp)).sum())
                rows += 1
    return total / max(rows, 1)


def test_distill_loss_equals_loops():
    from nsagen.selection_grad import distill_loss

    spec = small_spec(kind="mean", heads=(4, 2))
    g = torch.Generator().manual_seed(12)
    B, T = 2, 61
    q = torch.randn(B, T, 4, 12, generator=g, dtype=torch.float64)
    q_cmp = torch.randn(B, T, 4, 12, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, 2, 12, generator=g, dtype=torch.float64)
    kc = nsagen.reference.mean_compress(k, spec)
    _, idx = nsagen.reference.nsa(q, k, torch.randn(B, T, 2, 8, generator=g, dtype=torch.float64),
                                  None, spec, return_indices=True, q_cmp=q_cmp)
    for stride in (1, 4):
        got = distill_loss(spec, q, k, q_cmp, kc, idx, stride)
        want = _distill_loss_loops(spec, q, k, q_cmp, kc, idx, stride)
        assert want > 1e-3 and abs(got.item() - want) < 1e-10 * max(1.0, want), (got, want)
    # rows without two ranked blocks, or no compressed token at all: 0, and a finite gradient
    qs = q_cmp[:, :10].clone().requires_grad_(True)
    short = distill_loss(spec, q[:, :10], k[:, :10], qs, kc[:, :1], idx[:, :10], 1)
    short.backward()
    assert short.item() == 0 and torch.isfinite(qs.grad).all()


def _train_step_per_mode(spec, modes, T, seed, init, **kw):
    """One forward and backward of the layer (un-rotated compressed path, parameters from
    randomize(init)) per selection_grad mode on the same x and dy: [(y, grads, layer)], x, dy."""
    hidden = spec.heads_q * spec.dim_v
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, hidden, generator=g)
    dy = torch.randn(2, T, hidden, generator=g)
    runs = []
    for mode in modes:
        layer = randomize(SparseAttention(spec, hidden, selection_grad=mode,
                                          rope=("slc", "win"), **kw), init)
        y = layer(x)
        y.backward(dy)
        runs.append((y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()},
                     layer))
    return runs, x, dy


def test_distill_adds_its_loss_to_the_backward():
    """selection_grad='distill': the output as without it (up to the full plan the indices
    need at short lengths); every gradient is the plain one plus selection_weight times the
    distill loss's, which reaches the learned compression (phi_k) only."""
    from nsagen.selection_grad import DISTILL_STRIDE, distill_loss

    spec = small_spec(kind="mlp")
    ((y0, g0, _), (y1, g1, layer1)), x, _ = _train_step_per_mode(
        spec, ("none", "distill"), T=40, seed=14, init=3, selection_weight=0.7)
    assert rel(y1, y0) < 1e-6
    p = layer1.project(x)
    _, idx = layer1._op()(p["q"], p["k"], p["v"], p["gates"], p["k_cmp"], p["v_cmp"],
                          q_cmp=p["q_cmp"], return_indices=True)
    loss = distill_loss(spec, p["q"], p["k"], p["q_cmp"], p["k_cmp"], idx, DISTILL_STRIDE)
    assert torch.allclose(layer1.last_selection_loss, loss.detach())
    assert loss.item() > 1e-3
    names = [n for n, _ in layer1.named_parameters()]
    extra = torch.autograd.grad(loss * 0.7, list(layer1.parameters()), allow_unused=True)
    trained = {n for n, e in zip(names, extra) if e is not None and e.any()}
    assert any(n.startswith("q_proj") for n in trained)     # without the layer's detaching
    for n, e in zip(names, extra):
        if n.startswith("phi_k"):
            assert e is not None and e.any(), n
            assert rel(g1[n] - g0[n], e) < 1e-4, (n, rel(g1[n] - g0[n], e))
        else:
            assert rel(g1[n], g0[n]) < 1e-5, n
    with pytest.raises(ValueError, match="learned compression"):
        SparseAttention(small_spec(kind="mean"), x.shape[-1], selection_grad="distill")
    with pytest.raises(ValueError, match="selection_weight"):
        SparseAttention(spec, x.shape[-1], selection_grad="distill", selection_weight=0)


def test_straight_through_changes_gradients_not_values():
    """selection_grad='straight-through': the same output to the bit; the value, output and
    gate parameters get the same gradients; the query projection (which feeds the block
    scores) gets more."""
    spec = small_spec(kind="mlp")
    hidden = spec.heads_q * spec.dim_v
    ((y0, g0, _), (y1, g1, _)), x, dy = _train_step_per_mode(
        spec, ("none", "straight-through"), T=27, seed=6, init=7)
    assert torch.equal(y0, y1)
    for n in g0:
        if n.startswith(("v_proj", "o_proj", "gate")):
            assert torch.equal(g0[n], g1[n]), n
    assert rel(g1["q_proj.weight"], g0["q_proj.weight"]) > 1e-3
    # the extra gradient is that of sum w * c, c = g_slc <dO, o_slc> summed over the group
    from nsagen.selection_grad import chosen_block_score

    layer = randomize(SparseAttention(spec, hidden, rope=("slc", "win")), 7)
    p = layer.project(x)
    o, idx, branches = layer._op()(p["q"], p["k"], p["v"], p["gates"], p["k_cmp"], p["v_cmp"],
                                   q_cmp=p["q_cmp"], return_branches=True)
    d_o = (dy @ layer.o_proj.weight).view(o.shape)
    c = (d_o * branches[1]).sum(-1) * p["gates"][..., 1].detach()
    c = c.view(*c.shape[:2], spec.heads_kv, spec.group).sum(-1)
    w = chosen_block_score(spec, p["q_cmp"], p["k_cmp"], idx, torch.arange(x.shape[1]))
    (want,) = torch.autograd.grad((w * c).sum(), [layer.q_proj.weight])
    assert rel(g1["q_proj.weight"] - g0["q_proj.weight"], want) < 1e-4
    with pytest.raises(ValueError, match="selection_grad"):
        SparseAttention(spec, hidden, selection_grad="soft")


def test_return_branches_are_the_reference_branches():
    """op(..., return_branches=True): the branches' outputs before gating equal the reference's,
    and gating them gives the output."""
    spec = small_spec(kind="mean", heads=(4, 2))
    op = nsagen.build(spec)
    g = torch.Generator().manual_seed(8)
    x = {n: torch.randn(*shape, generator=g) for n, shape in
         (("q", (1, 30, 4, 12)), ("k", (1, 30, 2, 12)), ("v", (1, 30, 2, 8)))}
    gates = torch.rand(1, 30, 4, 3, generator=g)
    o, idx, br = op(**x, gates=gates, return_branches=True)
    ro, ridx, rbr = nsagen.reference.nsa(**{n: t.double() for n, t in x.items()},
                                         gates=gates.double(), spec=spec, return_branches=True)
    assert torch.equal(idx, ridx) and br.shape == (3, 1, 30, 4, 8)
    assert rel(br, rbr) < 1e-5
    assert rel((br * gates.permute(3, 0, 1, 2)[..., None]).sum(0), o) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_the_rotate_half_formula_bit_for_bit(dtype):
    """apply_rope (x * C + [x2, x1] * S, with or without precomputed tables) equals
    [x1 cos - x2 sin, x2 cos + x1 sin] exactly."""
    from nsagen.rope import _rope_tables, apply_rope, rope_tables

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 33, 3, 16, generator=g).to(dtype)
    pos = torch.arange(33) * 7
    cos, sin = (t[..., None, :] for t in _rope_tables(pos, 16, 500.0, dtype))
    x1, x2 = x[..., :8], x[..., 8:]
    want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    assert torch.equal(apply_rope(x, pos, 500.0), want)
    assert torch.equal(apply_rope(x, pos, tables=rope_tables(pos, 16, 500.0, dtype)), want)


def test_rope_tables_are_kept_per_length_and_mode():
    """The layer computes a length's rotation tables once; tables made under inference mode
    are never handed to a training step (autograd cannot save them), and every step's
    output is the same as with fresh tables."""
    spec = small_spec()
    layer = randomize(SparseAttention(spec, spec.heads_q * spec.dim_v,
                                      op=reference_op(spec)).double(), 2)
    x = torch.randn(1, 19, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        first = layer(x.detach())
    n = len(layer._rope_cache)
    assert n >= 1
    y = layer(x)                                     # training after inference: new tables
    y.sum().backward()
    assert len(layer._rope_cache) > n
    assert torch.equal(layer(x).detach(), y.detach())
    assert len(layer._rope_cache) == 2 * n           # reused, not remade
    torch.testing.assert_close(first, y.detach())
    layer._rope_cache.clear()
    assert torch.equal(layer(x).detach(), y.detach())
