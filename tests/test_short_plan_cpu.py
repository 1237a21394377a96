"""The short-length plan (docs/architecture.md, "Length plans"): while t < n*l' every candidate
block of a query is chosen, so a call whose sequences all fit runs the selected branch as dense
causal attention in the window kernel, with no block scores and no top-n. Under
TRITON_INTERPRET=1 (float32) against the float64 reference: outputs and every gradient, and which
plan ran."""
from __future__ import annotations

import os

import pytest
import torch

import nsagen
from nsagen import reference
from nsagen.codegen import explain
from nsagen.ir import lower
from nsagen.layout import build_layout
from nsagen.ops import pack

from grad_checks import check_backward
from kernel_checks import make_inputs, rel_err, scaled

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests run on CPU-only machines (the GPU module covers CUDA)")

FULL_ONLY = ("launch_select_blocks", "launch_slc_attention", "launch_slc_attention_kb",
             "launch_slc_attention_bwd")


def _count_full_plan(op, monkeypatch) -> list:
    """Record every launch that only the full plan makes (the top-n, the gathered selected
    attention and its backward); they still run."""
    calls = []
    for name in FULL_ONLY:
        fn = getattr(op.module, name, None)
        if fn is not None:
            def wrapped(*a, _fn=fn, _name=name, **k):
                calls.append(_name)
                return _fn(*a, **k)
            monkeypatch.setattr(op.module, name, wrapped)
    return calls


def _short_len(spec) -> int:
    return spec.slc_count * spec.slc_block


@pytest.mark.parametrize("name", ["nsa-d128", "nsa-fla", "nsa-paper", "nsa-g1"])
def test_short_plan_gradients(name, monkeypatch):
    """Shipped specs scaled down, at the plan's longest length: output and every gradient
    equal the reference's (whose top-n chooses every block there); no top-n ran."""
    spec = scaled(nsagen.load_spec(name))
    calls = _count_full_plan(nsagen.build(spec), monkeypatch)
    check_backward(spec, B=2, T=_short_len(spec), dtype=torch.float32, device="cpu", seed=41,
                   indices=False)
    assert calls == []


@pytest.mark.parametrize("variant", ["no-cmp", "slc-only", "separate-q_cmp", "suffix",
                                     "fused-window"])
def test_short_plan_structures(variant, monkeypatch):
    """Without a compressed branch the dense selected branch initialises o; separate window
    keys with a compressed query of its own; queries that end longer key sequences (varlen);
    a window small enough that the full plan fuses it into the selected kernel (the module
    then holds the window kernel for the short plan alone)."""
    spec = scaled(nsagen.load_spec("nsa-d128"))
    kw = dict(B=1, T=0, dtype=torch.float32, device="cpu", seed=43, indices=False)
    lens = [_short_len(spec), 9, 30]
    if variant == "no-cmp":
        spec = spec.replace(branches=("slc", "win"))
    elif variant == "slc-only":
        spec = spec.replace(branches=("slc",), window=None)
    elif variant == "fused-window":
        spec = spec.replace(window=8)
        assert "win_attention" not in [k.name for k in lower(spec).kernels]
    elif variant == "separate-q_cmp":
        spec = spec.replace(kv_per_branch="separate")
        kw["q_cmp"] = True
    else:
        kw["qlens"] = [20, 9, 1]
    calls = _count_full_plan(nsagen.build(spec), monkeypatch)
    check_backward(spec, varlen_lens=lens, **kw)
    assert calls == []


@pytest.mark.parametrize("branches", [("cmp", "slc", "win"), ("slc", "win")])
def test_short_plan_poisoned_output(branches):
    """The packed forward picks the short plan by itself, writes every output row (the buffer
    starts as NaN, so the first launch must initialise o) and returns no block indices."""
    spec = scaled(nsagen.load_spec("nsa-d128")).replace(branches=branches)
    op = nsagen.build(spec)
    lens = [_short_len(spec), 17]
    x = make_inputs(spec, 1, 0, torch.float32, "cpu", 44, varlen_lens=lens)
    lay = build_layout(spec, tuple(lens), torch.device("cpu"))
    out = torch.full((sum(lens), spec.heads_q, spec.dim_v), float("nan"))
    with torch.no_grad():
        o, idx, _ = op.module.forward(pack(x["q"]), pack(x["k"]), pack(x["v"]), pack(x["gates"]),
                                      None, None, lay, out=out)
    assert idx is None
    ref = reference.nsa(*(x[n].double() for n in ("q", "k", "v", "gates")), spec,
                        cu_seqlens=x["cu_seqlens"])
    assert rel_err(o.view(1, -1, spec.heads_q, spec.dim_v), ref) < 1e-5


def test_full_plan_past_the_bound_and_for_indices(monkeypatch):
    """One token past n*l', or a call that asks for the block indices, takes the full plan."""
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    calls = _count_full_plan(op, monkeypatch)
    for T, want in ((_short_len(spec) + 1, False), (_short_len(spec), True)):
        x = make_inputs(spec, 1, T, torch.float32, "cpu", 45)
        calls.clear()
        out = op(x["q"], x["k"], x["v"], x["gates"], return_indices=want)
        assert "launch_select_blocks" in calls
        o = out[0] if want else out
        ref = reference.nsa(*(x[n].double() for n in ("q", "k", "v", "gates")), spec)
        assert rel_err(o, ref) < 1e-5


def test_short_plan_is_explained_and_absent_without_selection():
    """--explain states the bound and the launches; a spec without the selected branch has no
    short plan, and asking its module for one is an error."""
    spec = nsagen.load_spec("nsa-d128")
    text = explain(spec)
    assert "n*l' = 16*64 = 1024" in text and "short plan launches:" in text
    assert "win_attention [slc_attn] window=1024, branch=1" in text
    short = text[text.index("short plan ("):text.index("short plan launches:")]
    assert "importance" not in short and "topk" not in short
    assert "'backward_kernel': 'win_attention_bwd', 'dense': True}  -> kernel win_attention" in short
    small = scaled(spec).replace(branches=("cmp", "win"))
    assert "short plan" not in explain(small)
    op = nsagen.build(small)
    x = make_inputs(small, 1, 8, torch.float32, "cpu", 46)
    lay = build_layout(small, (8,), torch.device("cpu"))
    with pytest.raises(ValueError, match="no short-length plan"):
        op.module.forward(pack(x["q"]), pack(x["k"]), pack(x["v"]), pack(x["gates"]), None,
                          None, lay, short=True)
