"""The benchmark's plumbing on the CPU (interpreter): rows, FLOP accounting, table, JSON.
Timing itself is stubbed here: benchmarks are run on a GPU and never asserted on."""
import json
import os

import pytest
import torch

import nsagen
from nsagen import bench

from kernel_checks import scaled

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU plumbing check")


@pytest.mark.parametrize("backward", [False, True])
def test_bench_rows_and_table(monkeypatch, tmp_path, backward):
    calls = []

    def fake_bench(fn, warmup=25, rep=100):
        fn()  # the timed function must run
        calls.append(fn)
        return 2.0

    monkeypatch.setattr(bench, "median_ms", fake_bench)
    monkeypatch.setattr(bench, "ceilings", lambda device="cuda": {"copy_TBps": 1.0, "mm_TFLOPs": 100.0})
    spec = scaled(nsagen.load_spec("nsa-d128"))
    doc = bench.bench_forward(spec, [9, 24], baselines=False, backward=backward, device="cpu",
                              progress=lambda m: None)
    assert doc["mode"] == ("forward+backward" if backward else "forward")
    assert [r["T"] for r in doc["rows"]] == [9, 24] and len(calls) == 2
    r = doc["rows"][1]
    assert r["nsagen_ms"] == 2.0 and r["nsagen_TFLOPs"] > 0 and 0 < r["floor_frac"]
    table = bench.format_table(doc)
    assert "| 24 | 2.000 |" in table
    bench.write_results(doc, tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["rows"][0]["T"] == 9
    assert ">= 7 calls" in saved["env"]["timing"]   # results say how they were timed


@pytest.mark.parametrize("backward", [False, True])
def test_dense_baselines_and_the_best_of_them(monkeypatch, backward):
    """FlashAttention-3 (forward only) and -4 join SDPA's backends where they load; the row
    reports the fastest dense baseline and nsagen against it; a baseline that fails (here
    FlashAttention-4, and cuDNN on the CPU) is left out, never fatal."""
    seen = []

    def fake_fa(q, k, v, causal=False):
        seen.append((tuple(q.shape), tuple(k.shape), causal))
        G = q.shape[2] // k.shape[2]
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2),
            v.repeat_interleave(G, 2).transpose(1, 2), is_causal=True)
        return o.transpose(1, 2), None

    def broken(*a, **k):
        raise RuntimeError("not on this GPU")

    def fake_bench(fn, warmup=25, rep=100):
        fn()
        return 3.0 if seen else 2.0          # nsagen first, then FlashAttention-3

    monkeypatch.setattr(bench, "median_ms", fake_bench)
    monkeypatch.setattr(bench, "ceilings", lambda device="cuda": {"copy_TBps": 1.0, "mm_TFLOPs": 100.0})
    monkeypatch.setattr(bench, "_fa3", lambda: fake_fa)
    monkeypatch.setattr(bench, "_fa4", lambda: broken)
    monkeypatch.setattr(bench, "_fla", lambda: None)
    monkeypatch.setattr(bench, "_flex", lambda: None)
    spec = scaled(nsagen.load_spec("nsa-d128"))
    doc = bench.bench_forward(spec, [24], baselines=True, backward=backward, device="cpu",
                              progress=lambda m: None)
    r = doc["rows"][0]
    assert "fa4_ms" not in r and "cudnn_ms" not in r
    if backward:                  # the fa3-fwd wheel has no backward
        assert not seen and "fa3_ms" not in r
    else:
        assert seen and seen[0][2] and seen[0][0] == (1, 24, spec.heads_q, spec.dim_qk)
        assert r["fa3_ms"] == 3.0
    present = [r[n] for n in bench.DENSE if n in r]
    assert r.get("best_dense_ms") == (min(present) if present else None)
    if present:
        assert r["speedup_vs_best_dense"] == r["best_dense_ms"] / 2.0
        assert "x best dense" in bench.format_table(doc)


def test_bench_decode_rows_and_table(monkeypatch):
    """A timed decode call is DECODE_STEPS consecutive steps ending at the row's cache length
    (the time reported per step); the attention alone and the paged step are timed the same
    way at that length."""
    monkeypatch.setattr(bench, "median_ms", lambda fn, warmup=25, rep=100: (fn(), 0.01)[1])
    monkeypatch.setattr(bench, "DECODE_STEPS", 3)     # a short run under the interpreter
    from nsagen.decode import DecodeCache
    lens = []
    real = DecodeCache.decode
    monkeypatch.setattr(DecodeCache, "decode",
                        lambda self, *a, **k: (real(self, *a, **k), lens.append(
                            tuple(self.lens.tolist())))[0])
    spec = scaled(nsagen.load_spec("nsa-d128"))
    doc = bench.bench_decode(spec, [40], [1, 2], baselines=False, device="cpu",
                             progress=lambda m: None, page_size=8)
    assert doc["mode"] == "decode" and len(doc["rows"]) == 2
    n = bench.DECODE_STEPS
    assert lens[-2 * n:] == [(t, t) for t in range(41 - n, 41)] * 2    # warm-up call, timed call
    r = doc["rows"][-1]
    assert r["B"] == 2 and r["T"] == 40 and r["nsagen_us"] == 10.0 / n and r["nsa_bytes"] > 0
    assert r["paged_us"] == 10.0 / n and r["step_us"] == 10.0 / n and r["page_size"] == 8
    assert f"| 2 | 40 | {10.0 / n:.1f} |" in bench.format_table(doc)


def test_bench_decode_pdl_switch_is_restored(monkeypatch):
    """`nsagen bench --decode --no-pdl` turns the decode kernels' dependent launches off for the
    run only; on a CPU device they are never on."""
    monkeypatch.setattr(bench, "median_ms", lambda fn, warmup=25, rep=100: (fn(), 0.01)[1])
    monkeypatch.setattr(bench, "DECODE_STEPS", 3)     # a short run under the interpreter
    spec = scaled(nsagen.load_spec("nsa-d128"))
    mod = nsagen.build(spec).module
    assert not mod._decode_pdl(torch.device("cpu"))
    before = mod.DECODE_PDL
    seen = []
    real = mod.decode_step
    monkeypatch.setattr(mod, "decode_step",
                        lambda *a, **k: (seen.append(mod.DECODE_PDL), real(*a, **k))[1])
    doc = bench.bench_decode(spec, [40], [1], baselines=False, device="cpu",
                             progress=lambda m: None, pdl=False)
    assert seen and not any(seen) and mod.DECODE_PDL == before
    assert doc["pdl"] is False and "dependent launches off" in bench.format_table(doc)


def _small_dsa(**kw):
    from nsagen.dsa_spec import DSASpec

    args = dict(name="dsa-bench", heads_q=4, heads_kv=1, dim_qk=24, dim_v=16, indexer_heads=2,
                indexer_dim=8, topk=8)
    args.update(kw)
    return DSASpec(**args)


@pytest.mark.parametrize("backward", [False, True])
def test_dsa_bench_rows_and_table(monkeypatch, tmp_path, backward):
    """`nsagen bench` of a DSA spec: every timed call runs, FLOPs are counted from the spec
    (indexer over causal pairs, attention over the picks), the table and JSON are written."""
    from nsagen import dsa_bench

    calls = []
    monkeypatch.setattr(bench, "median_ms", lambda fn, warmup=25, rep=100:
                        (fn(), calls.append(fn), 2.0)[2])
    monkeypatch.setattr(bench, "ceilings", lambda device="cuda": {"copy_TBps": 1.0,
                                                                  "mm_TFLOPs": 100.0})
    spec = _small_dsa()
    doc = dsa_bench.bench_dsa(spec, [6, 20], baselines=False, backward=backward, device="cpu",
                              progress=lambda m: None)
    assert doc["mode"] == ("forward+backward" if backward else "forward") and len(calls) == 2
    fl = dsa_bench.dsa_flops(spec, 20)
    assert fl["indexer"] == 20 * 21 / 2 * 2 * 8 * 2
    assert fl["attention"] == (8 * 9 / 2 + 12 * 8) * 4 * (24 + 16) * 2
    r = doc["rows"][1]
    assert r["nsagen_ms"] == 2.0 and r["nsagen_TFLOPs"] > 0
    assert "| 20 | 2.000 |" in bench.format_table(doc)
    bench.write_results(doc, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["T"] == 6


@pytest.mark.parametrize("kv,dv", [(1, 16), (2, 24)])
def test_dsa_bench_decode_rows(monkeypatch, kv, dv):
    """Decode rows of a DSA spec (MLA-style cache without values when Dv < Dk): the whole step
    (consecutive steps ending at the row's length, the time per step) and the attention alone
    are timed; the cache is rewound after each timed call."""
    from nsagen import dsa_bench
    from nsagen.dsa_decode import DSACache

    monkeypatch.setattr(bench, "median_ms", lambda fn, warmup=25, rep=100: (fn(), 0.01)[1])
    monkeypatch.setattr(bench, "DECODE_STEPS", 3)     # a short run under the interpreter
    lens = []
    real = DSACache.decode
    monkeypatch.setattr(DSACache, "decode",
                        lambda self, *a, **k: (real(self, *a, **k), lens.append(
                            tuple(self.lens.tolist())))[0])
    spec = _small_dsa(heads_kv=kv, dim_v=dv)
    doc = dsa_bench.bench_dsa_decode(spec, [12], [2], baselines=True, device="cpu",
                                     progress=lambda m: None)
    n = bench.DECODE_STEPS
    assert lens == [(t, t) for t in range(13 - n, 13)] * 2       # warm-up call, timed call
    r = doc["rows"][0]
    assert doc["mode"] == "decode" and r["B"] == 2 and r["T"] == 12
    assert r["nsagen_us"] == 10.0 / n and r["step_us"] == 10.0 / n
    assert r["dense_us"] == 10.0 and r["speedup_vs_dense"] == n
    table = bench.format_table(doc)
    assert f"| 2 | 12 | {10.0 / n:.1f} |" in table and "x dense" in table


def test_dense_decode_baseline_is_attention():
    """The DSA decode baseline computes attention: against a float64 softmax per head."""
    from nsagen import dsa_bench

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64)
               for s in ((2, 2, 3, 8), (2, 2, 11, 8), (2, 2, 11, 5)))
    want = torch.softmax(torch.einsum("bhgd,bhld->bhgl", q, k) * 0.3, -1) @ v
    torch.testing.assert_close(dsa_bench._dense_decode(q, k, v, 0.3), want)


@pytest.mark.parametrize("call_ms, rep", [(0.5, 100), (140.0, 7 * 140.0)])
def test_median_ms_times_at_least_seven_calls(monkeypatch, call_ms, rep):
    """do_bench times `rep` ms' worth of calls: one call of anything slower than 100 ms, so the
    median asks for at least seven calls' worth (timed on a warm call, not the compiling one)."""
    from nsagen.tune import timing

    clock = {"t": 0.0}
    calls = []

    def fn():
        calls.append(1)
        clock["t"] += (30.0 if len(calls) == 1 else call_ms) / 1e3   # the first call compiles

    def fake_do_bench(f, warmup, rep, return_mode):
        assert return_mode == "median"
        return rep

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(timing, "do_bench", fake_do_bench)
    assert timing.median_ms(fn) == pytest.approx(rep)
    assert len(calls) == 2
