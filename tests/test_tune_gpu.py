"""Tuning a small spec end to end on a CUDA GPU: forward, backward and decode searches with
parallel compilation and profiler timings, reference checks, a saved table that the next op and
DecodeCache launch with. Skipped without a GPU."""
import json

import pytest
import torch

import nsagen
from nsagen import tables
from nsagen.tune import search, timing, workloads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_tune_small_spec_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    spec = nsagen.load_spec("nsa-g4").replace(name="tune-small", window=256)
    op = nsagen.build(spec)
    dec = search.decode_kernel_names(op)
    assert dec
    msgs = []
    path, rows = search.tune(spec, [2048], kernels=["select_blocks", "win_attention",
                                                      "gate_delta", dec[-1]],
                               decode_batches=[4], decode_len=4096, progress=msgs.append,
                               budget=120)
    assert path.is_file() and rows
    assert {r["kernel"] for r in rows} >= {"select_blocks", "win_attention", "gate_delta", dec[-1]}
    assert any("compiled" in m for m in msgs)
    op.use_tuned_tables(True)
    cfg = op.configs_for(torch.device("cuda"), 2000)
    table = tables.load(op.module_name, tables.device_meta(), check=op._table_entry_error)
    defaults = op.default_configs
    for r in rows:   # a winner replaced its default only by the margin rule, and it is saved
        if r["kernel"] in defaults and r["config"] != defaults[r["kernel"]]:
            assert r["best_ms"] < r["default_ms"] * (1 - search.MARGIN), r
            saved = table.get(tables.bucket(r["T"]) if r["B"] is None
                              else tables.decode_bucket(r["B"], 4096), {})
            assert saved.get(r["kernel"]) == r["config"], r
    assert cfg == table[tables.bucket(2000)]
    entry = table[tables.decode_bucket(4, 4096)]
    cache = op.new_cache(4, 4096, device="cuda")
    assert cache._launch_configs()[dec[-1]] == entry[dec[-1]]
    assert all(cache.splits[k] == v for k, v in entry["splits"].items())


def test_profiler_attributes_kernel_times():
    """Per-kernel GPU times of one forward come back under the plan's kernel names."""
    spec = nsagen.load_spec("nsa-g4")
    op = nsagen.build(spec)
    fwd, _ = search.kernel_names(op)
    x = workloads.random_inputs(spec, 4096, 1, "cuda", torch.bfloat16)
    run = workloads.forward_pass(op, x)(dict(op.module.CONFIGS))
    run()
    t = timing.kernel_times(run, fwd, iters=2)
    assert set(t) == set(fwd) and all(v > 0 for v in t.values())


def test_tune_dsa_on_the_gpu(tmp_path):
    """The DSA search on real timings: a table is written and every saved entry is a config
    the op accepts."""
    from nsagen.tune.dsa import tune_dsa

    spec = nsagen.load_spec("dsa-gqa").replace(topk=256)
    path, rows = tune_dsa(spec, [4096], kernels=["dsa_topk", "dsa_attention"], budget=90,
                          out_dir=tmp_path, progress=lambda m: None)
    op = nsagen.build(spec)
    assert {r["kernel"] for r in rows} <= {"dsa_topk", "dsa_attention"}
    for bucket, entry in json.loads(path.read_text())["buckets"].items():
        for k, cfg in entry.items():
            assert op._table_entry_error(bucket, k, cfg) is None, (k, cfg)
