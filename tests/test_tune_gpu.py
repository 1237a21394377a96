"""Tuning a small spec end to end on a CUDA GPU: search, reference check, saved table used by the
next build. Skipped without a GPU."""
import pytest
import torch

import nsagen
from nsagen import autotune, tables

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_tune_small_spec_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    spec = nsagen.load_spec("nsa-g4").replace(name="tune-small", window=256)
    path, rows = autotune.tune(spec, [2048], kernels=["select_blocks", "win_attention"],
                               progress=lambda m: None)
    assert path.is_file() and rows
    op = nsagen.build(spec)
    op._tables_loaded = False
    cfg = op.configs_for(torch.device("cuda"), 2000)
    assert cfg == tables.load(op.module_name, tables.device_meta())[tables.bucket(2000)]
    assert {r["kernel"] for r in rows} == {"select_blocks", "win_attention"}
