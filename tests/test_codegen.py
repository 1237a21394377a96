"""IR lowering decisions, rendering, the module cache, and the committed generated/ folder."""
import ast
import os

import pytest

import nsagen
from nsagen import cache, codegen
from nsagen.ir import build_graph, lower
from nsagen.kernels import KERNELS, inverse_map_launch
from nsagen.resources import data_dir, shipped_specs


def _kernels(spec):
    return [k.name for k in lower(spec).kernels]


def test_graph_nodes_follow_branches():
    spec = nsagen.load_spec("nsa-d128")
    g = build_graph(spec)
    assert {"compress", "cmp_attn", "importance", "topk", "slc_attn", "win_attn", "combine"} <= set(g)
    g2 = build_graph(spec.replace(branches=("win",), window=512))
    assert "cmp_attn" not in g2 and "topk" not in g2 and "win_attn" in g2
    g3 = build_graph(nsagen.load_spec("nsa-paper"))
    assert "compress" not in g3 and "k_cmp" in g3  # learned compression comes in as an input
    for _, _, e in g.edges(data=True):
        assert e["shape"] and e["tensor"]


def test_lowering_depends_on_spec():
    d128 = nsagen.load_spec("nsa-d128")
    fla = nsagen.load_spec("nsa-fla")
    assert "win_attention" in _kernels(d128)
    assert "win_attention" not in _kernels(fla)                      # no window branch
    assert lower(fla).kernel("cmp_attention").importance_map == "identity"   # l = d = l'
    assert lower(d128).kernel("cmp_attention").importance_map == "overlap"
    assert lower(d128).kernel("cmp_attention").spill                 # l > d: windows spill
    small_w = d128.replace(window=64)
    assert lower(small_w).kernel("slc_attention").fuse_window         # w <= l'
    g1 = lower(nsagen.load_spec("nsa-g1")).kernel("cmp_attention").config
    g16 = lower(d128).kernel("cmp_attention").config
    assert g1["BT"] > g16["BT"] and g1["GP"] < g16["GP"]              # G sets tokens per tile
    paper = lower(nsagen.load_spec("nsa-paper"))
    assert any("Dk 192->256" in d for d in paper.decisions)            # Dk != Dv, padded separately
    only_slc = lower(d128.replace(branches=("slc",), window=None))
    assert not only_slc.kernel("cmp_attention").with_output
    assert only_slc.kernel("slc_attention").first


def test_combine_has_exactly_one_initialiser():
    for name in shipped_specs("nsa"):
        plan = lower(nsagen.load_spec(name))
        firsts = [k.name for k in plan.kernels if k.params.get("first")]
        assert len(firsts) == 1, (name, firsts)


def test_render_is_valid_python_without_kernel_strings_in_package():
    src = codegen.render(nsagen.load_spec("nsa-paper"))
    tree = ast.parse(src)
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"cmp_attention", "select_blocks", "slc_attention", "win_attention", "forward"} <= names
    assert "mean_compress" not in names  # learned compression: no compression kernel
    # kernel source lives in templates/ only
    pkg = os.path.dirname(nsagen.__file__)
    for root, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py"):
                assert "@triton.jit" not in open(os.path.join(root, f)).read(), f


def test_explain_lists_graph_decisions_and_kernels():
    text = codegen.explain(nsagen.load_spec("nsa-d128"))
    assert "graph before the passes" in text and "graph after the passes" in text
    assert "-> kernel cmp_attention" in text and "decisions:" in text


def test_module_name_keys_on_content(monkeypatch):
    spec = nsagen.load_spec("nsa-d128")
    name = codegen.module_name(spec)
    assert name.startswith(spec.uri + "_")
    assert codegen.module_name(spec.replace(name="renamed")) == name       # name is not semantic
    assert codegen.module_name(spec.replace(window=256)) != name
    assert codegen.module_name(spec, "3.6.0") != codegen.module_name(spec, "3.7.1")
    assert codegen.module_name(spec, "3.6.0") == codegen.module_name(spec, "3.6.2")
    real = codegen.render
    monkeypatch.setattr(codegen, "render", lambda s, plan=None, target=None: real(s) + "# changed\n")
    assert codegen.module_name(spec) != name                           # any change in the text


def test_specs_differing_only_in_name_share_one_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    a = nsagen.load_spec("nsa-g2").replace(name="layer-one", window=448)
    b = a.replace(name="layer-two")
    assert codegen.render(a) == codegen.render(b) and "layer-one" not in codegen.render(a)
    _, path, _ = cache.load_module(codegen.module_name(a), codegen.render(a))
    mtime = path.stat().st_mtime_ns
    _, path_b, reused = cache.load_module(codegen.module_name(b), codegen.render(b))
    assert reused and path_b == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "modules").iterdir()] == [path.name]


def test_templates_print_values_only_through_the_literal_gate():
    env = codegen._env()
    for hostile in ['x"""; import os; os.system("id") #', "a\nimport os", "f(1)", "'q'"]:
        with pytest.raises(codegen.CodegenError):
            env.from_string("NAME = {{ v }}").render(v=hostile)
        src = env.from_string("NAME = {{ v | pyrepr }}").render(v=hostile)
        assert ast.literal_eval(src.split(" = ", 1)[1]) == hostile
        src = env.from_string('"""doc {{ v | pyrepr }}"""').render(v=hostile[:3])
    for bad in [float("inf"), float("nan"), {"scale": float("inf")}, object()]:
        with pytest.raises(codegen.CodegenError):
            env.from_string("X = {{ v | pyrepr }}").render(v=bad)
    with pytest.raises(codegen.CodegenError):
        env.from_string("X = {{ v }}").render(v=float("inf"))
    assert env.from_string("X = {{ v }}, {{ w }}, {{ n }}").render(v=3, w=0.5, n="slc_attention") \
        == "X = 3, 0.5, slc_attention"


def test_build_reuses_cached_module(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    spec = nsagen.load_spec("nsa-g2").replace(name="cache-test", window=384)
    name = codegen.module_name(spec)
    mod, path, reused = cache.load_module(name, codegen.render(spec))
    assert not reused and path.parent == tmp_path / "modules" and path.name == name + ".py"
    mtime = path.stat().st_mtime_ns
    mod2, path2, reused2 = cache.load_module(name, codegen.render(spec))
    assert reused2 and path2 == path and mod2 is mod and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    """A write interrupted after the new text is on disk but before it replaces the file
    leaves the old file and no temp file."""
    target = tmp_path / "x.json"
    cache.atomic_write(target, "old")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize("name", sorted(shipped_specs("nsa")))
def test_generated_folder_is_current(name):
    """generated/ holds the rendered modules of the shipped specs; regenerate with
    `nsagen generate --shipped` when this fails."""
    path = data_dir("generated") / f"{name.replace('-', '_')}.py"
    assert path.is_file(), f"{path} is missing"
    assert path.read_text() == codegen.render(nsagen.load_spec(name)), f"{path} is stale"


def test_build_every_shipped_spec():
    for name in shipped_specs("nsa"):
        op = nsagen.build(name)
        assert op.module.URI == nsagen.load_spec(name).uri


@pytest.mark.parametrize("target", ["h200", "a100", "l40s"])
@pytest.mark.parametrize("name", sorted(shipped_specs("nsa")))
def test_default_tiles_fit_shared_memory(name, target):
    """Dk=192 (padded to 256) must shrink the compressed-attention tile, not fail to compile;
    a GPU with less shared memory gets smaller tiles, never ones that do not fit. The dk/dv
    steps' two fp32 accumulators stay inside the registers (wide heads: 64 keys, not 128)."""
    import triton

    from nsagen.kernels import dkdv_smem_bytes, smem_bytes
    from nsagen.kernels.base import dkdv_regs
    from nsagen.target import Target

    spec = nsagen.load_spec(name)
    t = Target.preset(target)
    plan = lower(spec, t)
    cfg = plan.kernel("cmp_attention").config
    bdk, bdv = triton.next_power_of_2(spec.dim_qk), triton.next_power_of_2(spec.dim_v)
    assert smem_bytes(cfg["BT"] * cfg["GP"], cfg["BC"], bdk, bdv, cfg["num_stages"]) <= t.smem_budget
    for k in plan.backward:
        if "BT_KV" in k.config:
            keys = k.config.get("BC_KV") or k.config.get("BK_KV")
            rows = k.config["BT_KV"] * k.config["GP"]
            assert dkdv_smem_bytes(spec, rows, keys, k.config["STAGES_KV"]) <= t.smem_per_block
            assert dkdv_regs(spec, keys, k.config["WARPS_KV"]) <= 128
            assert keys == (128 if bdk + bdv <= 256 else 64) or t.smem_per_block < 160 * 1024


def test_shipped_modules_load_without_a_writable_cache(tmp_path, monkeypatch):
    """generated/ is a prebuilt cache: a shipped spec's module is imported from there and
    nothing is written, so the op works where the user cache cannot be written."""
    from nsagen import ops

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(blocker / "cache"))   # cannot be created
    monkeypatch.setattr(ops, "_BUILT", {})
    op = nsagen.build("nsa-g8")
    assert op.path == data_dir("generated") / "nsa_g8.py"
    assert op.module.URI == nsagen.load_spec("nsa-g8").uri
    other = nsagen.load_spec("nsa-g8").replace(name="not-shipped", window=96)
    with pytest.raises(OSError):
        nsagen.build(other)                      # anything else needs the cache


def test_backward_is_read_off_the_graph_and_decisions_name_their_pass():
    """The backward differentiates the attention nodes whose output reaches combine, and mean
    compression after the compressed branch that reads it: with only the selected branch, the
    compressed attention (which only scores blocks) and the pooling have no backward kernel;
    learned compression has none either. Every decision names the pass that made it."""
    spec = nsagen.load_spec("nsa-d128")
    full = lower(spec)
    assert [k.name for k in full.backward] == ["gate_delta", "cmp_attention_bwd",
                                               "mean_compress_bwd", "slc_attention_bwd",
                                               "win_attention_bwd"]
    assert full.graph.nodes["slc_attn"]["backward_kernel"] == "slc_attention_bwd"
    assert full.graph.nodes["compress"]["backward_kernel"] == "mean_compress_bwd"
    only_slc = lower(spec.replace(branches=("slc",), window=None))
    assert "cmp_attn" in only_slc.graph
    assert [k.name for k in only_slc.backward] == ["gate_delta", "slc_attention_bwd"]
    assert "backward_kernel" not in only_slc.graph.nodes["cmp_attn"]
    assert "backward_kernel" not in only_slc.graph.nodes["compress"]
    learned = lower(nsagen.load_spec("nsa-paper"))
    assert "mean_compress_bwd" not in [k.name for k in learned.backward]
    passes = {d.pass_name for d in full.decisions}
    assert {"target", "partition", "importance", "tiles", "backward"} <= passes
    assert "  - [tiles] cmp_attention tile" in codegen.explain(spec)


@pytest.mark.parametrize("name", sorted(shipped_specs("nsa")))
@pytest.mark.parametrize("variant", [
    {}, {"branches": ("cmp", "slc", "win"), "window": 32}, {"branches": ("slc", "win"), "window": 64},
    {"branches": ("cmp",), "window": 0}, {"heads_q": 8, "heads_kv": 8}])
def test_partition_is_a_rewrite_of_the_graph(name, variant):
    """The kernels are the node groups left after the fusions contract the op graph: every
    computing node is in exactly one kernel, that kernel's definition implements all of its
    group, and a kernel reads only what kernels launched before it wrote."""
    spec = nsagen.load_spec(name).replace(**variant)
    plan = lower(spec)
    g = plan.graph
    compute = {n for n, a in g.nodes(data=True) if a["op"] not in ("input", "output", "combine")}
    assert sorted(n for k in plan.kernels for n in k.nodes) == sorted(compute)
    done: set = set()
    for k in plan.kernels:
        assert set(k.nodes) <= set(KERNELS[k.name].implements), k.name
        for n in k.nodes:
            assert g.nodes[n]["kernel"] == k.name
            assert {p for p in g.predecessors(n) if p in compute} <= done | set(k.nodes), n
        done |= set(k.nodes)


def _jit_functions(src: str) -> dict[str, list[str]]:
    """Parameter names of every Triton kernel function in a rendered module."""
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and any(
                ast.unparse(d) == "triton.jit" for d in node.decorator_list):
            out[node.name] = [a.arg for a in node.args.args]
    return out


def _launches(src: str) -> dict[str, list[ast.Call]]:
    """Every launch `<f>[grid](...)` in a rendered module, by kernel function (a launcher may
    bind `_launch(f)` to a local name first)."""
    tree = ast.parse(src)
    out: dict[str, list[ast.Call]] = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        alias = {n.targets[0].id: n.value.args[0].id for n in ast.walk(fn)
                 if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                 and ast.unparse(n.value.func) == "_launch" and isinstance(n.targets[0], ast.Name)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                head = node.func.value
                if isinstance(head, ast.Call) and ast.unparse(head.func) == "_launch":
                    name = head.args[0].id
                elif isinstance(head, ast.Name) and head.id in alias:
                    name = alias[head.id]
                else:
                    continue
                out.setdefault(name, []).append(node)
    return out


@pytest.mark.parametrize("name", shipped_specs("nsa"))
def test_kernels_and_launches_follow_their_declared_signatures(name):
    """Each Triton function's parameters are its definition's signature, and every launch of
    it passes exactly those: the runtime ones by position, every constexpr by keyword."""
    spec = nsagen.load_spec(name)
    plan = lower(spec)
    src = codegen.render(spec)
    fns, calls = _jit_functions(src), _launches(src)
    declared = {}
    for k in plan.rendered + plan.decode.kernels + [plan.decode.append]:
        for key, sig in KERNELS[k.name].launch(spec, k.params).items():
            declared[k.name if key == "main" else f"{k.name}_{key}"] = sig
    if spec.has("slc"):     # the selected branch's inverse map, shared by two kernels
        declared.update((f"inverse_map_{key}", sig)
                        for key, sig in inverse_map_launch(spec).items())
    seen = set()
    for fn, sig in declared.items():
        seen.add(fn)
        runtime = [p.name for p in sig.params if not p.constexpr]
        constexpr = [p.name for p in sig.params if p.constexpr]
        assert fns[fn] == runtime + constexpr, fn
        assert calls.get(fn), f"{fn} is never launched"
        for call in calls[fn]:
            assert len(call.args) == len(runtime), fn
            kw = {a.arg for a in call.keywords}
            assert set(constexpr) <= kw, (fn, set(constexpr) - kw)
            assert kw - set(constexpr) <= {"num_warps", "num_stages", "launch_pdl"}, fn
    kernels = {f for f in fns if not f.startswith("_")}     # _name: device functions
    assert seen == kernels, kernels - seen     # no kernel function outside a definition


def test_signature_values_are_literals_only():
    from nsagen.kernels.signature import Param, signature, values
    with pytest.raises(TypeError, match="constexpr L"):
        values(L="__import__('os')")
    with pytest.raises(TypeError):
        values(N=1.5)
    assert values(N=16, FLAG=True)[0] == Param("N", "16", True)
    with pytest.raises(ValueError, match="twice"):
        signature(values(N=1), values(N=2))
