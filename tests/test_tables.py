"""Tuned tables: keying on GPU and versions, shape buckets, atomic replacement, the fallback;
the tuner's plumbing on the CPU (timing stubbed): forward, backward and decode searches, the
budget, the margin rule, and tuned decode configs reaching DecodeCache."""
import json
import os

import pytest
import torch

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


def test_decode_buckets():
    assert tables.batch_bucket(1) == "B<=1" and tables.batch_bucket(5) == "B<=8"
    assert tables.batch_bucket(64) == "B<=64" and tables.batch_bucket(1000) == "B>512"
    key = tables.decode_bucket(8, 65536)
    assert key == "decode B<=8 T<=65536" and key != tables.bucket(65536)
    entry = {"decode_combine": {"num_warps": 2}, tables.DECODE_SPLITS: {"cmp": 3}}
    buckets = dict(BUCKETS, **{key: entry})
    assert tables.decode_configs_for(buckets, 6, 40000) == ({"decode_combine": {"num_warps": 2}},
                                                            {"cmp": 3})
    assert tables.decode_configs_for(buckets, 64, 40000) == ({}, {})   # other batch bucket
    assert tables.decode_configs_for(None, 8, 65536) == ({}, {})
    assert tables.configs_for(buckets, 40000) == {}                    # never a forward bucket


# ---------------------------------------------------------------------------- the search
def _fake(times_by_round):
    """make_run and timer stubs: round i of the sweep reports times_by_round[i] per kernel."""
    calls = []

    def make_run(cfg):
        def run():
            return cfg
        run.cfg = cfg
        return run

    def timer(run):
        calls.append(run.cfg)
        return times_by_round[len(calls) - 1]
    return make_run, timer, calls


def test_margin_rule_keeps_the_default_unless_clearly_beaten():
    from nsagen.tune import search

    cands = {"a": [{"x": 0}, {"x": 1}, {"x": 2}], "b": [{"y": 0}, {"y": 1}]}
    # a: candidate 2 is 2% faster (inside the margin); b: candidate 1 is 10% faster
    rounds = [{"a": 1.0, "b": 1.0}, {"a": 0.99, "b": 0.9}, {"a": 0.98, "b": 1.0},
              {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 0.9}]      # then the confirming pair
    make_run, timer, calls = _fake(rounds)
    rep = search.sweep(make_run, ["a", "b"], cands, {}, timer=timer, progress=lambda m: None,
                         on_gpu=False)
    assert rep["a"]["best"] == {"x": 0} and rep["a"]["best_ms"] == 1.0
    assert rep["b"]["best"] == {"y": 1} and rep["b"]["best_ms"] == 0.9
    assert calls[3] == {"a": {"x": 0}, "b": {"y": 0}}             # defaults ...
    assert calls[4] == {"a": {"x": 0}, "b": {"y": 1}}             # ... against the winners


def test_unconfirmed_winner_is_dropped():
    from nsagen.tune import search

    cands = {"a": [{"x": 0}, {"x": 1}]}
    rounds = [{"a": 1.0}, {"a": 0.5}, {"a": 1.0}, {"a": 1.2}]  # the confirming run disagrees
    make_run, timer, _ = _fake(rounds)
    rep = search.sweep(make_run, ["a"], cands, {}, timer=timer, progress=lambda m: None,
                         on_gpu=False)
    assert rep["a"]["best"] == {"x": 0}


def test_budget_stops_the_search_and_keeps_the_best_so_far():
    from nsagen.tune import search

    msgs = []
    clock = search.Budget(3600, msgs.append)
    cands = {"a": [{"x": i} for i in range(6)]}
    seen = []

    def make_run(cfg):
        return lambda: cfg

    def timer(run):
        seen.append(run())
        if len(seen) == 2:
            clock.deadline = clock.start - 1      # the budget runs out after the second round
        return {"a": 1.0 / len(seen)}

    rep = search.sweep(make_run, ["a"], cands, {}, timer=timer, budget=clock,
                         progress=msgs.append, label="forward T=1", on_gpu=False)
    assert len(seen) == 2 and rep["a"]["tried"] == 2
    assert rep["a"]["best"] == {"x": 1}           # best found so far, unconfirmed (no time left)
    assert sum("budget" in m for m in msgs) == 1 and "forward T=1" in msgs[0]


def test_candidates_are_pruned_ordered_and_capped():
    import nsagen
    from nsagen import configspace
    from nsagen.kernels import regs
    from nsagen.target import current

    spec = nsagen.load_spec("nsa-paper")
    op_cfg = nsagen.build(spec).module.CONFIGS
    for name in ("cmp_attention", "slc_attention", "win_attention", "select_blocks",
                 "cmp_attention_bwd", "slc_attention_bwd", "win_attention_bwd", "gate_delta"):
        c = configspace.candidates(spec, name, op_cfg[name])
        assert c[0] == op_cfg[name] and 1 < len(c) <= 8
        assert len({tuple(sorted(x.items())) for x in c}) == len(c)
        dist = [sum(x[k] != v for k, v in op_cfg[name].items()) for x in c]
        assert dist == sorted(dist)
    for x in configspace.candidates(spec, "cmp_attention", op_cfg["cmp_attention"], limit=None)[1:]:
        assert x["BC"] % 4 == 0 and regs(x["BT"] * 16, x["BC"], 256, 128,
                                                      x["num_warps"]) <= current().reg_limit


def test_backward_candidates_cover_the_dkdv_steps():
    """Both halves of a backward kernel get candidates, inside shared memory and with the dk/dv
    accumulators inside the registers; the selected branch's nearest the default first."""
    import nsagen
    from nsagen import configspace
    from nsagen.kernels.base import dkdv_regs, dkdv_smem_bytes
    from nsagen.target import current

    spec = nsagen.load_spec("nsa-d128")
    cfg = nsagen.build(spec).module.CONFIGS
    for name, keys in (("cmp_attention_bwd", "BC_KV"), ("win_attention_bwd", "BK_KV")):
        c = configspace.candidates(spec, name, cfg[name])
        kv = [x for x in c[1:] if any(x[k] != cfg[name][k]
                                      for k in ("BT_KV", keys, "WARPS_KV", "STAGES_KV"))]
        assert kv and len(kv) < len(c) - 1       # dk/dv variants and dq variants
        for x in configspace.candidates(spec, name, cfg[name], limit=None):
            assert dkdv_smem_bytes(spec, x["BT_KV"] * x["GP"], x[keys],
                                   x["STAGES_KV"]) <= current().smem_per_block
            assert dkdv_regs(spec, x[keys], x["WARPS_KV"]) <= 128
    c = configspace.candidates(spec, "slc_attention_bwd", cfg["slc_attention_bwd"])
    assert c[0] == cfg["slc_attention_bwd"]
    dist = [sum(x[k] != v for k, v in c[0].items()) for x in c[1:]]
    assert dist == sorted(dist)


def _interp():
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU plumbing check")


def _halving():
    """A stub timer whose every call is twice as fast as the last: later candidates win."""
    state = {"t": 100.0}

    def timer(f):
        state["t"] /= 2
        return state["t"]
    return timer


def test_tuned_kernels_follow_the_plan_of_each_length():
    """A length inside the short-length plan's bound tunes the kernels that plan launches (no
    top-n, no gathered selected attention); a longer one the full plan's."""
    import nsagen
    from nsagen.tune import search

    op = nsagen.build("nsa-d128")
    fwd, bwd = search.kernel_names(op, 1024)
    assert fwd == ["mean_compress", "cmp_attention", "win_attention"]
    assert bwd == ["gate_delta", "cmp_attention_bwd", "mean_compress_bwd", "win_attention_bwd"]
    fwd, bwd = search.kernel_names(op, 1025)
    assert "select_blocks" in fwd and "slc_attention_bwd" in bwd
    assert search.kernel_names(op) == search.kernel_names(op, 65536)


def test_tune_plumbing_on_cpu():
    """The search, the reference check and the saved table, with timing stubbed (CPU)."""
    import torch

    import nsagen
    from nsagen.tune import search

    from kernel_checks import scaled

    _interp()
    spec = scaled(nsagen.load_spec("nsa-fla"))
    T = spec.slc_count * spec.slc_block + 4   # past the short-length plan, which has no top-n
    path, rows = search.tune(spec, [T], kernels=["select_blocks"], device="cpu",
                               dtype=torch.float32, timer=_halving(),
                               progress=lambda m: None, check_len=T)
    cands = search.candidates(spec, "select_blocks", nsagen.build(spec).module.CONFIGS["select_blocks"])
    assert rows[0]["config"] == cands[-1] and rows[0]["best_ms"] < rows[0]["default_ms"]
    doc = json.loads(path.read_text())
    assert doc["buckets"]["T<=1024"]["select_blocks"] == cands[-1]
    assert doc["meta"]["module"] == nsagen.build(spec).module_name


def test_tune_backward_kernel_plumbing(monkeypatch):
    """A backward kernel is searched on the backward's timings and its winner's gradients are
    checked against the reference before the table is saved."""
    import torch

    import nsagen
    from nsagen.tune import search

    from kernel_checks import scaled

    _interp()
    spec = scaled(nsagen.load_spec("nsa-fla"))
    full = search.candidates
    assert len(full(spec, "gate_delta", nsagen.build(spec).module.CONFIGS["gate_delta"])) > 2
    # two candidates keep the interpreter run short
    monkeypatch.setattr(search, "candidates", lambda *a, **kw: full(*a, **kw)[:2])
    path, rows = search.tune(spec, [20], kernels=["gate_delta"], device="cpu",
                               dtype=torch.float32, timer=_halving(),
                               progress=lambda m: None, check_len=20)
    op = nsagen.build(spec)
    cands = search.candidates(spec, "gate_delta", op.module.CONFIGS["gate_delta"])
    assert len(cands) > 1 and [r["kernel"] for r in rows] == ["gate_delta"]
    assert rows[0]["config"] == cands[-1]
    doc = json.loads(path.read_text())
    assert doc["buckets"]["T<=1024"]["gate_delta"] == cands[-1]


def test_tune_decode_plumbing(monkeypatch, tmp_path):
    """Decode kernels and split counts are searched per batch bucket, the winners run token by
    token against the reference, and the entry lands in the table (under --out-dir). Kernels
    are timed without dependent launches (a kernel's profiled time would count its wait for
    the one before), whole steps with them as the module has them."""
    import torch

    import nsagen
    from nsagen.tune import search

    from kernel_checks import scaled

    _interp()
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    names = search.decode_kernel_names(op)
    assert names and set(names) <= set(op.module.DECODE_CONFIGS)
    last = names[-1]
    full_c, full_s = search.decode_candidates, search.split_candidates
    monkeypatch.setattr(search, "decode_candidates", lambda *a, **kw: full_c(*a, **kw)[:2])
    monkeypatch.setattr(search, "split_candidates", lambda *a, **kw: full_s(*a, **kw)[:2])
    msgs, pdl = [], []
    halving = _halving()

    def timer(run):
        pdl.append(op.module.DECODE_PDL)
        return halving(run)
    monkeypatch.setattr(op.module, "DECODE_PDL", True)
    path, rows = search.tune(spec, [], kernels=[last], device="cpu", dtype=torch.float32,
                               timer=timer, progress=msgs.append, decode_batches=[2],
                               decode_len=40, out_dir=tmp_path / "autotune")
    # two split variants timed last, on whole steps
    assert pdl[-2:] == [True, True] and pdl[:-2] and not any(pdl[:-2])
    assert op.module.DECODE_PDL is True
    assert path.parent.parent == tmp_path / "autotune" and path.name == op.module_name + ".json"
    doc = json.loads(path.read_text())
    key = nsagen.tables.decode_bucket(2, 40)
    entry = doc["buckets"][key]
    want = search.decode_candidates(spec, last, op.module.DECODE_CONFIGS[last])[-1]
    assert entry[last] == want and set(entry) == {last, "splits"}
    from nsagen.ir.passes import decode_splits

    base = decode_splits(spec, 2, 40)
    variant = search.split_candidates(spec, base)[-1]
    assert entry["splits"] == {k: v for k, v in variant.items() if base[k] != v} != {}
    assert [r["kernel"] for r in rows] == [last, "step (splits)"]
    assert any("compiled" in m or "decode B=2" in m for m in msgs)


@pytest.mark.parametrize("faster", [True, False])
def test_tune_decode_merge_placement_on_whole_steps(monkeypatch, tmp_path, faster):
    """Where decode_slc's merge runs (its MERGE, which leaves decode_combine out) is decided on
    whole steps after the splits: the flip is kept only when the step is faster by the margin,
    and the table holds what was kept."""
    import torch

    import nsagen
    from nsagen.tune import search

    from kernel_checks import scaled

    _interp()
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    def space(spec, kernel, default, limit=0):
        """Kernels searched alone keep their defaults; the full space (limit=None, what the
        whole-step choice checks against) also holds MERGE flipped."""
        if limit is not None or "MERGE" not in default:
            return [dict(default)]
        return [dict(default), dict(default, MERGE=1 - default["MERGE"])]

    monkeypatch.setattr(search, "decode_candidates", space)
    monkeypatch.setattr(search, "split_candidates", lambda spec, base: [dict(base)])
    steps = {"t": 10.0}

    def timer(run):
        steps["t"] *= 0.5 if faster else 1.0
        return steps["t"]

    msgs = []
    path, rows = search.tune(spec, [], kernels=["decode_slc"], device="cpu",
                             dtype=torch.float32, timer=timer, progress=msgs.append,
                             decode_batches=[2], decode_len=40, out_dir=tmp_path / "autotune")
    default = op.module.DECODE_CONFIGS["decode_slc"]["MERGE"]
    entry = json.loads(path.read_text())["buckets"][nsagen.tables.decode_bucket(2, 40)]
    knob = [r for r in rows if r["kernel"] == "step (decode_slc MERGE)"]
    assert len(knob) == 1 and knob[0]["config"]["MERGE"] == (1 - default if faster else default)
    assert entry.get("decode_slc", {}).get("MERGE", default) == (1 - default if faster
                                                                   else default)
    assert any(("(kept)" if faster else "(not kept)") in m and "MERGE" in m for m in msgs)


class _PassRecorder:
    """Stands in for nsagen.tune.compile.Compiler: keeps the passes it is asked to compile."""

    def __init__(self):
        self.passes = []

    def record(self, passes):
        self.passes += list(passes)
        return len(passes)

    def wait(self, budget=None):
        pass


def test_reference_checks_are_compiled_ahead(monkeypatch):
    """Before each reference check the tuner hands the passes that check will launch (forward,
    forward keeping the backward's tensors, backward; a decode step at the check's cache
    length) to the parallel compiler, with the configs being checked; each pass runs."""
    import torch

    import nsagen
    from nsagen.tune import search

    from kernel_checks import scaled

    _interp()
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    calls = []
    real_f, real_d = search.precompile_check, search.precompile_decode_check
    monkeypatch.setattr(search, "precompile_check",
                        lambda *a, **kw: calls.append(("fwd", a[2], a[3], a[6])))
    monkeypatch.setattr(search, "precompile_decode_check",
                        lambda *a, **kw: calls.append(("dec", a[2], a[3], a[4])))
    search.tune(spec, [20], kernels=["select_blocks", "gate_delta", "decode_combine"],
                  device="cpu", dtype=torch.float32, timer=_halving(), progress=lambda m: None,
                  check_len=16, decode_batches=[2], decode_len=40, check_decode_len=24,
                  budget=0)
    (kind, cfg, T, bwd), (kind_d, cfg_d, splits, L) = calls
    assert (kind, T, bwd, kind_d, L) == ("fwd", 16, True, "dec", 24)
    assert cfg == op.module.CONFIGS and cfg_d == {} and splits == {}

    rec = _PassRecorder()
    real_f(rec, op, dict(op.module.CONFIGS), 16, "cpu", torch.float32, progress=lambda m: None)
    real_d(rec, op, {}, {}, 24, "cpu", torch.float32, progress=lambda m: None)
    assert len(rec.passes) == 4
    o, idx = rec.passes[0]()[:2]
    assert o.shape[0] == 16 and torch.isfinite(o).all()
    assert rec.passes[1]()[2] is not None          # the saved tensors of the backward
    grads = rec.passes[2]()
    assert any(g is not None for g in grads)
    o_dec, _ = rec.passes[3]()
    assert o_dec.shape == (2, spec.heads_q, spec.dim_v) and torch.isfinite(o_dec).all()


def test_tune_budget_zero_saves_defaults():
    import torch

    import nsagen
    from nsagen.tune import search

    from kernel_checks import scaled

    _interp()
    spec = scaled(nsagen.load_spec("nsa-fla"))
    msgs = []
    T = spec.slc_count * spec.slc_block + 4   # past the short-length plan, which has no top-n
    path, rows = search.tune(spec, [T], kernels=["select_blocks"], device="cpu",
                               dtype=torch.float32, timer=_halving(), progress=msgs.append,
                               check_len=T, budget=0)
    assert rows == [] and any("budget of 0 s reached" in m for m in msgs)
    doc = json.loads(path.read_text())
    assert doc["buckets"]["T<=1024"]["select_blocks"] == \
        nsagen.build(spec).module.CONFIGS["select_blocks"]


def test_tuned_decode_configs_reach_decode_cache(monkeypatch):
    """A matching table's decode entry sets the cache's splits and the configs each step
    launches with; explicit splits/configs replace it."""
    import torch

    import nsagen
    from nsagen.decode import DecodeCache
    from nsagen.ir.passes import decode_splits

    from kernel_checks import scaled

    _interp()
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    name = list(op.module.DECODE_CONFIGS)[-1]
    tuned = dict(op.module.DECODE_CONFIGS[name], num_warps=2)
    table = {tables.decode_bucket(2, 40): {name: tuned, "splits": {"cmp": 3}}}
    monkeypatch.setattr(op, "_tables", table)
    monkeypatch.setattr(op, "_tables_loaded", True)
    seen = {}
    real = op.module.decode_step

    def spy(*a, configs=None, **kw):
        seen["configs"], seen["splits"] = configs, a[7]
        return real(*a, configs=configs, **kw)

    monkeypatch.setattr(op.module, "decode_step", spy)
    cache = DecodeCache(op, 2, 40, device="cpu", dtype=torch.float32)
    assert cache.splits == dict(decode_splits(spec, 2, 40), cmp=3)
    k = torch.randn(2, 30, spec.heads_kv, spec.dim_qk)
    cache.prefill(k, torch.randn(2, 30, spec.heads_kv, spec.dim_v))
    q = torch.randn(2, spec.heads_q, spec.dim_qk)
    cache.step(q, torch.rand(2, spec.heads_q, 3))
    assert seen["configs"][name] == tuned and seen["splits"]["cmp"] == 3
    other = DecodeCache(op, 64, 40, device="cpu", dtype=torch.float32)     # other bucket
    assert other.splits == decode_splits(spec, 64, 40) and other._launch_configs() == op.configs
    forced = DecodeCache(op, 2, 40, device="cpu", dtype=torch.float32, splits={"cmp": 1})
    assert forced.splits["cmp"] == 1 and forced._launch_configs() == op.configs


def test_cli_tune_and_build_arguments(capsys):
    from nsagen.cli import build_parser, main

    a = build_parser().parse_args(["tune", "nsa-g4", "--budget", "40", "--decode-batch", "1", "8",
                                   "--out-dir", "autotune", "--no-backward"])
    assert a.budget == 40 and a.decode_batch == [1, 8] and a.out_dir == "autotune"
    assert a.no_backward and not a.no_decode and a.seq_len is None
    # a search stops by default in time for the checks to finish near two minutes
    assert build_parser().parse_args(["tune", "nsa-g4"]).budget == 90
    assert build_parser().parse_args(["tune", "nsa-g4", "--budget", "inf"]).budget == float("inf")
    assert main(["build", "nsa-g4", "--no-compile"]) == 0
    assert "nsa-g4: module" in capsys.readouterr().out


def test_use_tuned_tables_switches_between_table_and_defaults():
    """`nsagen bench --untuned` turns the op's table off: configs come from the overrides and
    IR defaults only; turning it back on reloads the table at the next call."""
    import torch

    import nsagen

    op = nsagen.build(nsagen.load_spec("nsa-g4"))
    saved = (op._tables, op._tables_loaded, dict(op.configs))
    try:
        op._tables = {tables.bucket(1000): {"win_attention": {"BK": 16}}}
        op._tables_loaded = True
        op.configs = {"cmp_attention": {"BC": 32}}          # completed from the default
        override = dict(op.module.CONFIGS["cmp_attention"], BC=32)
        cuda = torch.device("cuda")          # only its type is read: nothing runs
        assert op.configs_for(cuda, 1000) == {"win_attention": {"BK": 16},
                                              "cmp_attention": override}
        op.use_tuned_tables(False)
        assert op.configs_for(cuda, 1000) == {"cmp_attention": override}
        op.use_tuned_tables(True)
        assert op._tables is None and not op._tables_loaded
    finally:
        op._tables, op._tables_loaded, op.configs = saved


RECORDING_CHECK = """
import gc, weakref
import torch, triton, triton.language as tl
from nsagen.tune.compile import recording, variant_key

@triton.jit
def k(x_ptr, n, B: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, B), 0.0, mask=tl.arange(0, B) < n)

big = torch.zeros(1 << 20, dtype=torch.float16)
freed = weakref.ref(big)
for t in (big, big[1:]):                  # 16-byte aligned, and not
    with recording(calls := []):
        k[(1,)](t, 5, B=16)
    (_, args, _, kw), = calls
    assert args[0].dtype == t.dtype and args[0].numel() == 1, args[0]
    assert variant_key(k, args, kw) == variant_key(k, (t, 5), kw)
del big, t, args, calls
gc.collect()
assert freed() is None
print("ok")
"""


def test_recorded_launches_keep_no_buffer_of_the_pass(tmp_path):
    """Variants are recorded for compiling with one-element stand-ins of each tensor argument
    (same dtype, same 16-byte alignment: the same variant), so a pass's buffers are freed when
    it returns, not when its variants have compiled. (Recording patches Triton's JIT launcher,
    so this runs in a process without the interpreter; nothing is compiled or launched.)"""
    import subprocess
    import sys

    script = tmp_path / "check.py"       # triton.jit reads the kernel's source from its file
    script.write_text(RECORDING_CHECK)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_tune_dsa_plumbing(tmp_path, monkeypatch):
    """`nsagen tune` on a DSA spec: the forward, backward and loss kernels searched on their
    own passes (timing stubbed), the winners checked against the float64 reference, the table
    saved where asked."""
    import torch

    import nsagen
    from nsagen.dsa_spec import DSASpec
    from nsagen.tune import dsa, search

    _interp()
    spec = DSASpec(name="dsa-tune", heads_q=4, heads_kv=1, dim_qk=24, dim_v=16,
                   indexer_heads=2, indexer_dim=8, topk=8, dtype="float32")
    full = dsa.candidates
    monkeypatch.setattr(dsa, "candidates", lambda *a, **kw: full(*a, **kw)[:2])
    path, rows = dsa.tune_dsa(spec, [24], kernels=["dsa_topk", "dsa_attention_bwd",
                                                   "dsa_indexer_loss"],
                              device="cpu", dtype=torch.float32, timer=_halving(),
                              progress=lambda m: None, check_len=24, out_dir=tmp_path)
    op = nsagen.build(spec)
    assert [r["kernel"] for r in rows] == ["dsa_topk", "dsa_attention_bwd", "dsa_indexer_loss"]
    doc = json.loads(path.read_text())
    assert path.is_relative_to(tmp_path) and doc["meta"]["module"] == op.module_name
    got = doc["buckets"]["T<=1024"]
    for k in ("dsa_topk", "dsa_attention_bwd", "dsa_indexer_loss"):
        cands = full(spec, k, op.module.CONFIGS[k])
        assert len(cands) > 1 and got[k] == cands[1], k      # the stub makes later ones win
        assert op._table_entry_error("T<=1024", k, got[k]) is None
    assert search.MARGIN > 0


def test_dsa_switches_and_candidate_caps_may_be_zero():
    """Every value the DSA search spaces hold passes the table check (switches 0 / 1, CAP 0:
    no candidate lists), and values outside them are refused by name."""
    import nsagen
    from nsagen.dsa_spec import DSASpec
    from nsagen.tune import dsa

    spec = DSASpec(name="dsa-space", heads_q=4, heads_kv=1, dim_qk=24, dim_v=16,
                   indexer_heads=2, indexer_dim=8, topk=8, dtype="float32")
    op = nsagen.build(spec)
    for k in ("dsa_indexer", "dsa_topk", "dsa_attention"):
        for cfg in dsa.candidates(spec, k, op.module.CONFIGS[k]):
            assert op._table_entry_error("T<=1024", k, cfg) is None, (k, cfg)
    top, att = op.module.CONFIGS["dsa_topk"], op.module.CONFIGS["dsa_attention"]
    assert "CAP" in op._table_entry_error("T<=1024", "dsa_topk", dict(top, CAP=-1))
    assert "HFAST" in op._table_entry_error("T<=1024", "dsa_attention", dict(att, HFAST=2))


def test_tune_dsa_never_saves_what_the_reference_rejects(tmp_path, monkeypatch):
    import torch

    from nsagen.dsa_spec import DSASpec
    from nsagen.tune import dsa

    _interp()
    spec = DSASpec(name="dsa-tune", heads_q=4, heads_kv=1, dim_qk=24, dim_v=16,
                   indexer_heads=2, indexer_dim=8, topk=8, dtype="float32")
    full = dsa.candidates
    monkeypatch.setattr(dsa, "candidates", lambda *a, **kw: full(*a, **kw)[:2])

    def broken(*a, **kw):
        raise RuntimeError("relative error 0.5")

    monkeypatch.setattr(dsa, "check_dsa", broken)
    said = []
    path, _ = dsa.tune_dsa(spec, [24], kernels=["dsa_topk"], device="cpu",
                           dtype=torch.float32, timer=_halving(), progress=said.append,
                           check_len=24, out_dir=tmp_path)
    assert json.loads(path.read_text())["buckets"] == {}
    assert any("fail the reference check" in m for m in said)


def test_reference_checks_run_the_plan_of_their_length(monkeypatch):
    """The tuner's reference checks (outputs and gradients) call the op as calls of their
    length run: inside the short-length bound no top-n is launched (the short plan), past it
    the full plan's is."""
    import torch

    import nsagen
    from nsagen.tune import verify

    from kernel_checks import scaled

    _interp()
    spec = scaled(nsagen.load_spec("nsa-d128"))
    op = nsagen.build(spec)
    topn = []
    real = op.module.launch_select_blocks
    monkeypatch.setattr(op.module, "launch_select_blocks",
                        lambda *a, **kw: topn.append(1) or real(*a, **kw))
    n = op.module.SHORT_LEN
    for check in (verify.check_against_reference, verify.check_backward_against_reference):
        for T, launched in ((n, False), (n + 5, True)):
            topn.clear()
            assert check(op, spec, op.module.CONFIGS, T, "cpu", torch.float32, 1e-3) < 1e-3
            assert bool(topn) == launched, (check.__name__, T)


def test_shipped_tables_name_the_modules_the_templates_render():
    """A module's name hashes its rendered text, so a template change renames it and a table of
    the old name stops loading (the spec then runs untuned). Every shipped table must name the
    module its spec renders today for that GPU's preset and the table's Triton release, and
    every entry must be one that module's kernels accept (none dropped at load)."""
    import nsagen
    from nsagen.codegen import module_name
    from nsagen.resources import data_dir, shipped_specs
    from nsagen.specfile import load_spec
    from nsagen.target import Target

    specs = {}
    for path in shipped_specs().values():
        spec = load_spec(path)
        specs.setdefault(spec.uri, spec)
    shipped = sorted(data_dir("autotune").glob("*/*.json"))
    assert shipped
    for path in shipped:
        doc = json.loads(path.read_text())
        meta = doc["meta"]
        assert meta["module"] == path.stem
        spec = specs[path.stem.rsplit("_", 1)[0]]
        target = Target.preset(path.parent.name)
        want = module_name(spec, meta["triton"], target)
        assert path.stem == want, f"{path.name}: the templates now render {want}"
        op = nsagen.build(spec, target=target)
        for bucket, entries in doc["buckets"].items():
            for kernel, entry in entries.items():
                why = op._table_entry_error(bucket, kernel, entry)
                assert why is None, f"{path.name} {bucket} {kernel}: {why}"
