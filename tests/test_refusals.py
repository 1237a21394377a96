"""Bad inputs get a clear error or a right answer, never a wrong one: bfloat16 on the CPU, a
refused decode call that must leave the cache untouched, wrong prompt tensors, and tuned tables
or launch overrides that do not fit the kernels."""
import json
import logging
import os

import pytest
import torch

import nsagen
from nsagen import tables
from nsagen.decode import DecodeCache

from kernel_checks import TOL, make_inputs, rel_err, scaled

INTERP = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
BF16 = torch.bfloat16


def _d(t):
    return None if t is None else t.double()


# ---------------------------------------------------------------------------- bfloat16 on the CPU
@pytest.mark.skipif(not INTERP, reason="the interpreter's bfloat16 on CPU-only machines")
@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper"])
def test_bfloat16_on_the_cpu_matches_the_reference(name):
    """The interpreter computes bfloat16 wrongly (off by ~1e9 before): the op runs it in float32
    and rounds, forward and gradients."""
    spec = scaled(nsagen.load_spec(name), kv_heads=2)
    op = nsagen.build(spec)
    x = make_inputs(spec, 2, 30, BF16, "cpu", seed=5)   # 2 selection blocks <= n: no near-ties
    args = [x[k] for k in ("q", "k", "v", "gates")]
    for t in args:
        t.requires_grad_()
    o = op(*args, k_cmp=x["k_cmp"], v_cmp=x["v_cmp"])
    assert o.dtype == BF16 and torch.isfinite(o).all()
    ref = nsagen.reference.nsa(*[_d(t.detach()).requires_grad_() for t in args], spec,
                               _d(x["k_cmp"]), _d(x["v_cmp"]))
    assert rel_err(o, ref) < TOL[BF16]
    do = torch.randn_like(o)
    o.backward(do)
    ref_in = [_d(t.detach()).requires_grad_() for t in args]
    ref = nsagen.reference.nsa(*ref_in, spec, _d(x["k_cmp"]), _d(x["v_cmp"]))
    ref.backward(do.double())
    for name_, got, want in zip("q k v gates".split(), args, ref_in):
        assert got.grad.dtype == BF16
        assert rel_err(got.grad, want.grad) < 2 * TOL[BF16], name_


@pytest.mark.skipif(not INTERP, reason="the interpreter's bfloat16 on CPU-only machines")
def test_bfloat16_decode_on_the_cpu_defaults_to_the_spec_dtype():
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    cache = op.new_cache(1, 40)
    assert cache.k.dtype == BF16 == cache.v.dtype                # the spec's dtype
    x = make_inputs(spec, 1, 40, BF16, "cpu", seed=6)
    ref = nsagen.reference.nsa(_d(x["q"]), _d(x["k"]), _d(x["v"]), _d(x["gates"]), spec)
    cache.prefill(x["k"][:, :33], x["v"][:, :33])
    for t in range(33, 40):
        o = cache.decode(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["gates"][:, t])
        assert o.dtype == BF16
        assert rel_err(o, ref[:, t]) < TOL[BF16], t


# ---------------------------------------------------------------------------- the decode cache
def _snapshot(cache):
    return {name: t.clone() for name, t in vars(cache).items()
            if isinstance(t, torch.Tensor)} | {"_longest": cache._longest}


def _same(cache, snap):
    for name, val in snap.items():
        now = getattr(cache, name)
        assert (torch.equal(now, val) if isinstance(val, torch.Tensor) else now == val), name


@pytest.fixture(scope="module")
def filled():
    spec = scaled(nsagen.load_spec("nsa-paper"), kv_heads=2)     # learned compression, H=2
    op = nsagen.build(spec)
    x = make_inputs(spec, 2, 40, torch.float32, "cpu", seed=7)
    return spec, op, x


def _cache(spec, op, x, T=33):
    cache = DecodeCache(op, 2, 40, device="cpu", dtype=torch.float32)
    nc = spec.num_cmp(T)
    cache.prefill(x["k"][:, :T], x["v"][:, :T], k_cmp=x["k_cmp"][:, :nc],
                  v_cmp=x["v_cmp"][:, :nc])
    return cache


def test_refused_decode_leaves_the_cache_unchanged(filled):
    spec, op, x = filled
    cache = _cache(spec, op, x)
    snap = _snapshot(cache)
    t = 33
    good = dict(q=x["q"][:, t], k_t=x["k"][:, t], v_t=x["v"][:, t], gates=x["gates"][:, t],
                k_cmp_t=x["k_cmp"][:, 0], v_cmp_t=x["v_cmp"][:, 0])
    bad = [("q", x["q"][:, t, :1]), ("gates", x["gates"][:, t, :, :2]),
           ("q", x["q"][:, t].double()), ("v_t", x["v"][:1, t]),
           ("k_cmp_t", None), ("k_t", x["k"][:, t].to(BF16))]
    for arg, value in bad:
        with pytest.raises((ValueError, TypeError), match=arg):
            cache.decode(**dict(good, **{arg: value}))
        _same(cache, snap)
    cache.decode(**good)                      # a good call still works after the refusals
    assert cache._longest == 34


@pytest.mark.parametrize("arg, change, message", [
    ("k", lambda x, T: x["k"][:, :T, :1], r"k: expected shape .*\(2, 33, 2, \d+\), got \(2, 33, 1"),
    ("v", lambda x, T: x["v"][:1, :T], r"v: expected shape .*\(2, 33, 2, \d+\), got \(1, 33"),
    ("seqlens", lambda x, T: torch.tensor([5, -1]), r"seqlens: .*0..T=33.*\[-1\]"),
    ("seqlens", lambda x, T: torch.tensor([5, 34]), r"seqlens: .*0..T=33.*\[34\]"),
    ("seqlens", lambda x, T: torch.tensor([5]), r"seqlens: expected .*\(2,\)"),
    ("k_cmp", lambda x, T: x["k_cmp"][:, :3], r"k_cmp: expected shape .*\(2, \d+, 2, \d+\), got"),
])
def test_prefill_refuses_wrong_tensors(filled, arg, change, message):
    """One KV head where the spec has two, batch 1 where the cache has 2 (it used to
    broadcast), negative lengths, lengths past the prompt: refused, naming the argument."""
    spec, op, x = filled
    cache = DecodeCache(op, 2, 40, device="cpu", dtype=torch.float32)
    snap = _snapshot(cache)
    T = 33
    nc = spec.num_cmp(T)
    kw = dict(k=x["k"][:, :T], v=x["v"][:, :T], k_cmp=x["k_cmp"][:, :nc], v_cmp=x["v_cmp"][:, :nc])
    kw[arg] = change(x, T)
    with pytest.raises(ValueError, match=message):
        cache.prefill(**kw)
    _same(cache, snap)


def test_append_refuses_wrong_tensors(filled):
    spec, op, x = filled
    cache = _cache(spec, op, x)
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match=r"k_t: expected shape \[B, H, Dk\] = \(2, 2, \d+\), "
                                         r"got \(1, 2"):
        cache.append(x["k"][:1, 33], x["v"][:1, 33], x["k_cmp"][:, 0], x["v_cmp"][:, 0])
    with pytest.raises(ValueError, match="v_cmp_t"):
        cache.append(x["k"][:, 33], x["v"][:, 33], x["k_cmp"][:, 0], x["v_cmp"][:, 0, :1])
    _same(cache, snap)


# ---------------------------------------------------------------------------- configs and tables
META = {"gpu": "NVIDIA H200", "capability": "9.0", "sm_count": 132, "triton": "3.6.0",
        "torch": "2.11.0", "nsagen": "0.1.0"}


@pytest.fixture
def op_g4(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tables, "device_meta", lambda device=None: dict(META))
    op = nsagen.build(nsagen.load_spec("nsa-g4"))
    saved = (op._tables, op._tables_loaded, dict(op.configs))
    op._tables, op._tables_loaded = None, False
    yield op
    op._tables, op._tables_loaded, op.configs = saved


def _write_table(op, doc):
    path = tables.table_paths(op.module_name, META)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_invalid_table_entries_are_dropped_with_one_warning(op_g4, caplog):
    op = op_g4
    default = op.module.CONFIGS
    good_slc = dict(default["slc_attention_kb"], num_warps=8)
    buckets = {"T<=1024": {
        "cmp_attention": dict(default["cmp_attention"], BT=-1),          # wrong output before
        "win_attention": {k: v for k, v in default["win_attention"].items() if k != "GP"},
        "slc_attention_kb": good_slc,
        "select_blocks": dict(default["select_blocks"], num_warps=3),
        "gate_delta": [1, 2],
        "decode_cmp": {"num_warps": 4},                                   # not a forward kernel
    }, "decode B<=8 T<=65536": {"splits": {"cmp": 0}}, "T<=4096": "junk"}
    path = _write_table(op, {"meta": dict(META, module=op.module_name), "buckets": buckets})
    with caplog.at_level(logging.WARNING, logger="nsagen"):
        cfg = op.configs_for(torch.device("cuda"), 1000)     # only the type is read
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0]
    for key in ("cmp_attention", "win_attention", "select_blocks", "gate_delta", "decode_cmp",
                "splits", "T<=4096"):
        assert key in warnings[0], key
    assert "BT=-1" in warnings[0] and "missing GP" in warnings[0]
    assert cfg == {"slc_attention_kb": good_slc}           # the rest run their defaults
    assert op.module.CONFIGS == default


@pytest.mark.parametrize("doc", [[1, 2, 3], {"meta": [], "buckets": {}}, {"meta": {}},
                                 {"meta": dict(META), "buckets": [1]}, "text"])
def test_table_of_the_wrong_shape_is_ignored(op_g4, caplog, doc):
    op = op_g4
    if isinstance(doc, dict) and isinstance(doc.get("meta"), dict):
        doc["meta"]["module"] = op.module_name
    _write_table(op, doc)
    with caplog.at_level(logging.WARNING, logger="nsagen"):
        assert op.configs_for(torch.device("cuda"), 1000) == {}
    assert any("ignoring tuned table" in r.getMessage() for r in caplog.records)


def test_launch_overrides_are_checked_when_set(op_g4):
    op = op_g4
    with pytest.raises(ValueError, match=r"configs\['cmp_attention'\]: BT=-1"):
        op.configs = {"cmp_attention": {"BT": -1}}
    with pytest.raises(ValueError, match="num_warps=3"):
        op.configs["win_attention"] = {"num_warps": 3}
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        op.configs["nope"] = {}
    with pytest.raises(ValueError, match="GP"):
        op.configs["slc_attention_kb"] = {"GP": 2}
    with pytest.raises(ValueError, match="splits: .*slc_blocks"):
        DecodeCache(op, 1, 64, device="cpu", dtype=torch.float32, splits={"slc_blocks": 99})
    with pytest.raises(ValueError, match=r"configs\['decode_slc'\]"):
        DecodeCache(op, 1, 64, device="cpu", dtype=torch.float32,
                    configs={"decode_slc": {"BK": 0}})
    # a compressed tile wider than the split quantum: refused by name, not by the compiler
    wide = {"decode_cmp": {"BC": 4 * op.module.DECODE_CONFIGS["decode_cmp"]["BC"]}}
    with pytest.raises(ValueError, match="configs: decode_cmp's BC=.*cmp_quantum"):
        DecodeCache(op, 1, 64, device="cpu", dtype=torch.float32, configs=wide)
    quantum = 4 * DecodeCache(op, 1, 64, device="cpu", dtype=torch.float32).splits["cmp_quantum"]
    DecodeCache(op, 1, 64, device="cpu", dtype=torch.float32, configs=wide,
                splits={"cmp_quantum": quantum})          # with a quantum of whole tiles
    op.configs["cmp_attention"] = {"num_warps": 8}     # partial: completed from the default
    assert op.configs["cmp_attention"] == dict(op.module.CONFIGS["cmp_attention"], num_warps=8)
