"""Tuned tables: keying on GPU and versions, shape buckets, atomic replacement, the fallback."""
import json

import pytest

from nsagen import tables

META = {"gpu": "NVIDIA H200", "capability": "9.0", "sm_count": 132, "triton": "3.6.0",
        "torch": "2.11.0", "nsagen": "0.1.0"}
BUCKETS = {"T<=16384": {"slc_attention": {"GP": 16, "BK": 64, "num_warps": 2, "num_stages": 2}}}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))


def test_round_trip_and_path():
    path = tables.save("mod_abc", META, BUCKETS)
    assert path.parent.name == "nvidia-h200" and path.name == "mod_abc.json"
    assert tables.load("mod_abc", META) == BUCKETS


@pytest.mark.parametrize("key, value", [("gpu", "NVIDIA H100 80GB HBM3"), ("capability", "8.0"),
                                        ("sm_count", 114), ("triton", "3.7.0"), ("torch", "2.12.0"),
                                        ("nsagen", "0.2.0")])
def test_any_metadata_mismatch_means_untuned(key, value):
    tables.save("mod_abc", META, BUCKETS)
    assert tables.load("mod_abc", dict(META, **{key: value})) is None
    assert tables.load("mod_other", META) is None


def test_buckets():
    assert tables.bucket(1) == "T<=1024" and tables.bucket(1024) == "T<=1024"
    assert tables.bucket(1025) == "T<=4096" and tables.bucket(65536) == "T<=65536"
    assert tables.bucket(10 ** 6) == "T>262144"
    assert tables.configs_for(BUCKETS, 9000) == BUCKETS["T<=16384"]
    assert tables.configs_for(BUCKETS, 100) == {}   # untuned bucket: IR defaults
    assert tables.configs_for(None, 100) == {}


def test_interrupted_write_keeps_the_old_table(monkeypatch):
    path = tables.save("mod_abc", META, BUCKETS)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", lambda *a, **k: "{" + "x" * 10)  # junk content...
    import os

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", boom)                            # ...never lands
    with pytest.raises(KeyboardInterrupt):
        tables.save("mod_abc", META, {"T<=1024": {}})
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads(path.read_text())["buckets"] == BUCKETS
    assert [p.name for p in path.parent.iterdir()] == ["mod_abc.json"]


def test_unreadable_table_is_ignored():
    path = tables.save("mod_abc", META, BUCKETS)
    path.write_text("{not json")
    assert tables.load("mod_abc", META) is None


def test_tune_plumbing_on_cpu(monkeypatch):
    """The search, the reference check and the saved table, with timing stubbed (CPU)."""
    import os

    import torch

    import nsagen
    from nsagen import autotune

    from kernel_checks import scaled

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU plumbing check")
    spec = scaled(nsagen.load_spec("nsa-d128"))
    costs = iter(range(100, 0, -1))  # later candidates "faster": the search must pick the last
    path, rows = autotune.tune(spec, [20], kernels=["select_blocks"], device="cpu",
                               dtype=torch.float32, timer=lambda f: float(next(costs)),
                               progress=lambda m: None, check_len=20)
    cands = autotune.candidates(spec, "select_blocks", nsagen.build(spec).module.CONFIGS["select_blocks"])
    assert rows[0]["config"] == cands[-1] and rows[0]["best_ms"] < rows[0]["default_ms"]
    doc = json.loads(path.read_text())
    assert doc["buckets"]["T<=1024"]["select_blocks"] == cands[-1]
    assert doc["meta"]["module"] == nsagen.build(spec).module_name


def test_tune_backward_kernel_plumbing(monkeypatch):
    """A backward kernel is searched on forward+backward timings and its winner's gradients are
    checked against the reference before the table is saved."""
    import os

    import torch

    import nsagen
    from nsagen import autotune

    from kernel_checks import scaled

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU plumbing check")
    spec = scaled(nsagen.load_spec("nsa-fla"))
    full = autotune.candidates
    assert len(full(spec, "gate_delta", nsagen.build(spec).module.CONFIGS["gate_delta"])) > 2
    # two candidates keep the interpreter run short
    monkeypatch.setattr(autotune, "candidates", lambda *a, **kw: full(*a, **kw)[:2])
    costs = iter(range(100, 0, -1))
    path, rows = autotune.tune(spec, [20], kernels=["gate_delta"], device="cpu",
                               dtype=torch.float32, timer=lambda f: float(next(costs)),
                               progress=lambda m: None, check_len=20)
    op = nsagen.build(spec)
    cands = autotune.candidates(spec, "gate_delta", op.module.CONFIGS["gate_delta"])
    assert len(cands) > 1 and [r["kernel"] for r in rows] == ["gate_delta"]
    assert rows[0]["config"] == cands[-1]
    doc = json.loads(path.read_text())
    assert doc["buckets"]["T<=1024"]["gate_delta"] == cands[-1]
