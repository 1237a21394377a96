"""The DSA family: its spec, and its float64 oracle (nsagen.reference.dsa, dsa_indexer_loss)
against plain loops written from docs/algorithm.md section 8."""
import math

import pytest
import torch

import nsagen
from nsagen import reference
from nsagen.dsa_spec import DSASpec
from nsagen.resources import shipped_specs
from nsagen.spec import SpecError
from nsagen.specfile import load_spec, spec_from_dict

F64 = torch.float64


def small(**kw) -> DSASpec:
    args = dict(name="dsa-small", heads_q=4, heads_kv=2, dim_qk=8, dim_v=6, indexer_heads=3,
                indexer_dim=5, topk=4, dtype="float32")
    args.update(kw)
    return DSASpec(**args)


def inputs(spec, B, T, seed, integer=False, v=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        x = torch.randn(*shape, generator=g, dtype=F64)
        return x.round().clamp(-1, 1) if integer else x

    return dict(q=r(B, T, spec.heads_q, spec.dim_qk), k=r(B, T, spec.heads_kv, spec.dim_qk),
                v=r(B, T, spec.heads_kv, spec.dim_v) if v else None,
                q_idx=r(B, T, spec.indexer_heads, spec.indexer_dim),
                k_idx=r(B, T, spec.indexer_dim), w_idx=r(B, T, spec.indexer_heads))


# ---------------------------------------------------------------------------- plain loops
def loop_scores(x, b, t):
    return [sum(float(x["w_idx"][b, t, j]) * max(0.0, float(x["q_idx"][b, t, j] @ x["k_idx"][b, s]))
                for j in range(x["q_idx"].shape[2])) for s in range(t + 1)]


def loop_select(spec, x, b, t):
    score = loop_scores(x, b, t)
    return sorted(sorted(range(t + 1), key=lambda s: (-score[s], s))[:spec.topk]), score


def loop_probs(spec, x, b, t, h, keys):
    kv = h // spec.group
    s = [spec.softmax_scale * float(x["q"][b, t, h] @ x["k"][b, j, kv]) for j in keys]
    m = max(s)
    e = [math.exp(v - m) for v in s]
    return [v / sum(e) for v in e]


def loop_dsa(spec, x):
    B, T = x["q"].shape[:2]
    v = x["v"] if x["v"] is not None else x["k"][..., :spec.dim_v]
    o = torch.zeros(B, T, spec.heads_q, spec.dim_v, dtype=F64)
    idx = torch.full((B, T, spec.topk), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            sel, _ = loop_select(spec, x, b, t)
            idx[b, t, :len(sel)] = torch.tensor(sel, dtype=torch.int32)
            for h in range(spec.heads_q):
                p = loop_probs(spec, x, b, t, h, sel)
                o[b, t, h] = sum(pi * v[b, j, h // spec.group] for pi, j in zip(p, sel))
    return o, idx


def loop_loss(spec, x, dense):
    B, T = x["q"].shape[:2]
    total = 0.0
    for b in range(B):
        for t in range(T):
            sel, score = loop_select(spec, x, b, t)
            keys = list(range(t + 1)) if dense else sel
            p = [0.0] * len(keys)
            for h in range(spec.heads_q):
                p = [a + c for a, c in zip(p, loop_probs(spec, x, b, t, h, keys))]
            p = [a / sum(p) for a in p]
            logits = [score[j] for j in keys]
            m = max(logits)
            lse = m + math.log(sum(math.exp(a - m) for a in logits))
            total += sum(pi * (math.log(pi) - (li - lse)) for pi, li in zip(p, logits) if pi > 0)
    return total


# ---------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("kv,with_v", [(1, True), (2, True), (1, False), (2, False)])
def test_dsa_matches_loops(kv, with_v):
    """MQA and GQA, with v and with v = k[..., :Dv]; T=9 > topk=4 covers the dense rows
    (t + 1 <= topk) and the sparse ones."""
    spec = small(heads_kv=kv)
    x = inputs(spec, B=2, T=9, seed=kv + 2 * with_v, v=with_v)
    o, idx = reference.dsa(**x, spec=spec, return_indices=True)
    want_o, want_idx = loop_dsa(spec, x)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(o, want_o, rtol=1e-10, atol=1e-10)


def test_ties_go_to_the_lower_position():
    """Indexer inputs in {-1, 0, 1}: many scores are equal (many are 0 after the ReLU)."""
    spec = small(topk=3)
    x = inputs(spec, B=1, T=12, seed=5, integer=True)
    _, idx = reference.dsa(**x, spec=spec, return_indices=True)
    assert torch.equal(idx, loop_dsa(spec, x)[1])


def test_below_topk_tokens_it_is_dense_causal_attention():
    spec = small(topk=16)
    x = inputs(spec, B=1, T=10, seed=6)
    o, idx = reference.dsa(**x, spec=spec, return_indices=True)
    T, G = 10, spec.group
    s = torch.einsum("bthgd,bshd->bthgs", x["q"].view(1, T, 2, G, -1), x["k"]) * spec.softmax_scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1)[None, :, None, None], -math.inf)
    dense = torch.einsum("bthgs,bshd->bthgd", s.softmax(-1), x["v"]).reshape(1, T, 4, -1)
    torch.testing.assert_close(o, dense, rtol=1e-10, atol=1e-10)
    assert (idx[0, :, 10:] == -1).all() and torch.equal(idx[0, -1, :10], torch.arange(10).int())


def test_packed_sequences_are_separate_layers():
    spec = small()
    lens = [3, 7, 1, 6]
    x = inputs(spec, B=1, T=sum(lens), seed=7)
    cu = torch.tensor([0, 3, 10, 11, 17], dtype=torch.int32)
    o, idx = reference.dsa(**x, spec=spec, cu_seqlens=cu, return_indices=True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = {n: t[:, a:b] for n, t in x.items()}
        o1, i1 = reference.dsa(**part, spec=spec, return_indices=True)
        torch.testing.assert_close(o[:, a:b], o1, rtol=0, atol=0)
        assert torch.equal(idx[:, a:b], i1)


def test_gradient_reaches_q_k_v_and_not_the_indexer():
    spec = small()
    x = inputs(spec, B=1, T=8, seed=8)
    for t in x.values():
        t.requires_grad_(True)
    reference.dsa(**x, spec=spec).square().sum().backward()
    assert all(x[n].grad is not None and x[n].grad.abs().sum() > 0 for n in ("q", "k", "v"))
    assert all(x[n].grad is None for n in ("q_idx", "k_idx", "w_idx"))


# ---------------------------------------------------------------------------- indexer loss
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("kv", [1, 2])
def test_indexer_loss_matches_loops(dense, kv):
    spec = small(heads_kv=kv)
    x = inputs(spec, B=2, T=9, seed=10 + kv)
    x.pop("v")
    got = reference.dsa_indexer_loss(**x, spec=spec, dense=dense)
    assert got.dim() == 0
    assert math.isclose(float(got), loop_loss(spec, x, dense), rel_tol=1e-10, abs_tol=1e-12)


def test_indexer_loss_gradient_reaches_the_indexer_only():
    spec = small()
    x = inputs(spec, B=1, T=9, seed=12)
    x.pop("v")
    for t in x.values():
        t.requires_grad_(True)
    reference.dsa_indexer_loss(**x, spec=spec).backward()
    assert all(x[n].grad is not None and x[n].grad.abs().sum() > 0
               for n in ("q_idx", "k_idx", "w_idx"))
    assert x["q"].grad is None and x["k"].grad is None
    # and it is the gradient of the loss: a finite-difference check in float64
    assert torch.autograd.gradcheck(
        lambda qi: reference.dsa_indexer_loss(x["q"].detach(), x["k"].detach(), qi,
                                              x["k_idx"].detach(), x["w_idx"].detach(), spec),
        (x["q_idx"].detach().clone().requires_grad_(True),))


def test_sparse_loss_is_the_dense_loss_when_topk_covers_every_token():
    spec = small(topk=16)
    x = inputs(spec, B=1, T=10, seed=13)
    x.pop("v")
    sparse = reference.dsa_indexer_loss(**x, spec=spec)
    dense = reference.dsa_indexer_loss(**x, spec=spec, dense=True)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)


def test_inputs_are_checked_by_name():
    spec = small()
    x = inputs(spec, B=1, T=5, seed=14)
    with pytest.raises(ValueError, match=r"k_idx: expected shape \[B, T, DI\]"):
        reference.dsa(**dict(x, k_idx=x["k_idx"][..., :4]), spec=spec)
    with pytest.raises(ValueError, match=r"w_idx: expected shape \[B, T, HI\]"):
        reference.dsa(**dict(x, w_idx=x["w_idx"][..., :2]), spec=spec)
    with pytest.raises(TypeError, match="k: dtype torch.float32 does not match"):
        reference.dsa(**dict(x, k=x["k"].float()), spec=spec)
    with pytest.raises(ValueError, match="v: required, since head_dim.v"):
        reference.dsa(**dict(x, v=None), spec=small(dim_v=12))


# ---------------------------------------------------------------------------- the spec
DSA_V32 = {"attention": "dsa", "name": "x", "heads": {"q": 128, "kv": 1},
           "head_dim": {"qk": 576, "v": 512}, "indexer": {"heads": 64, "dim": 128, "topk": 2048}}


def test_spec_family_dispatch_and_round_trip():
    s = spec_from_dict(DSA_V32)
    assert isinstance(s, DSASpec) and s.family == "dsa" and s.group == 128
    assert s.key_dtype == "bfloat16" and s.softmax_scale == 576 ** -0.5
    assert spec_from_dict(s.to_dict()) == s
    assert s.uri == "dsa_bf16_qk576_v512_h1g128_i64x128k2048"
    assert s.replace(key_dtype="float8_e4m3").uri.endswith("_fp8keys")
    assert spec_from_dict({"attention": "nsa", "name": "n", "heads": {"q": 4, "kv": 2},
                           "head_dim": 8}).family == "nsa"


@pytest.mark.parametrize("change,key,rule", [
    ({"attention": "mla"}, "attention", "choose from nsa, dsa"),
    ({"indexer": {"heads": 64, "dim": 128}}, "indexer.topk", "required key is missing"),
    ({"indexer": {"heads": 64, "dim": 128, "topk": 0}}, "indexer.topk", "positive integer"),
    ({"indexer": {"heads": 64, "dim": 128, "topk": 8, "key_dtype": "int8"}},
     "indexer.key_dtype", "choose from bfloat16, float8_e4m3"),
    ({"indexer": {"heads": 64, "dim": 128, "topk": 8, "keys": 1}}, "indexer.keys", "unknown key"),
    ({"heads": {"q": 6, "kv": 4}}, "heads.q", "multiple of heads.kv"),
    ({"head_dim": {"qk": 2048, "v": 8}}, "head_dim.qk", "at most 1024"),
    ({"scale": -1.0}, "scale", "positive finite"),
    ({"window": 512}, "window", "unknown key"),
])
def test_spec_errors_name_the_key(change, key, rule):
    with pytest.raises(SpecError) as info:
        spec_from_dict(dict(DSA_V32, **change), source="d.yaml")
    assert info.value.key == key and rule in str(info.value)


def test_shipped_dsa_specs_build_their_forward():
    names = sorted(shipped_specs("dsa"))
    assert names == ["dsa-gqa", "dsa-v32", "dsa-v32-fp8"]
    for name in names:
        s = load_spec(name)
        assert s.family == "dsa" and s.name == name
        op = nsagen.build(s)
        assert type(op).__name__ == "DSAOp" and op.module.URI == s.uri
        assert op.module_name.startswith(s.uri + "_")


def test_every_shipped_spec_is_named_after_its_family():
    for name in shipped_specs():
        assert name.startswith(load_spec(name).family + "-"), name


def test_dsa_op_graph_and_explain(capsys):
    """The family's graph: indexer -> top-k -> sparse attention -> o, and the indexer loss from
    the indexer's scores and the attention's LSE; `generate --explain` prints it with the
    kernels each node lowers to, and the decisions."""
    from nsagen.cli import main
    from nsagen.ir import build_graph

    g = build_graph(load_spec("dsa-gqa"))
    assert {n for n, a in g.nodes(data=True) if a["op"] not in ("input", "output")} == {
        "indexer", "topk_tokens", "sparse_attn", "indexer_loss"}
    for a, b in [("indexer", "topk_tokens"), ("topk_tokens", "sparse_attn"), ("sparse_attn", "o"),
                 ("indexer", "indexer_loss"), ("sparse_attn", "indexer_loss"),
                 ("q_idx", "indexer"), ("k", "sparse_attn")]:
        assert g.has_edge(a, b), (a, b)
    assert g.edges["topk_tokens", "sparse_attn"]["shape"][2] == 1024
    assert main(["generate", "dsa-gqa", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "topk_tokens [topk_tokens] {'topk': 1024}  -> kernel dsa_topk" in out
    assert "indexer [indexer]" in out and "-> kernel dsa_indexer" in out
    assert "[tiles] dsa_attention:" in out and "decode step: no kernels yet" in out
