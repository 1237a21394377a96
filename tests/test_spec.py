"""The spec language: every validation rule of Spec.from_dict / load_spec, defaults, identity."""
from __future__ import annotations

import copy
import dataclasses
import re

import pytest

import nsagen
from nsagen import Spec, SpecError, load_spec
from nsagen.resources import shipped_specs

SHIPPED = sorted(shipped_specs())


def base(**top):
    """A small valid spec mapping; keyword arguments replace top-level keys (None deletes)."""
    d = {
        "name": "t",
        "heads": {"q": 8, "kv": 2},
        "head_dim": {"qk": 64, "v": 32},
        "dtype": "float16",
        "compression": {"block": 32, "stride": 16, "kind": "mean"},
        "selection": {"block": 64, "count": 16, "initial": 1, "local": 2},
        "window": 512,
        "branches": ["cmp", "slc", "win"],
    }
    for key, val in top.items():
        if val is None:
            d.pop(key, None)
        else:
            d[key] = val
    return d


def nested(path, value):
    """base() with one dotted key set, e.g. nested('selection.count', 4)."""
    d = base()
    top, _, sub = path.partition(".")
    if sub:
        d[top] = dict(d[top], **{sub: value})
    else:
        d[top] = value
    return d


def raises(d, key, value=None, rule=None, source="<dict>"):
    """from_dict(d) must fail naming the source, the key and (when given) the value and rule."""
    with pytest.raises(SpecError) as info:
        Spec.from_dict(d, source=source)
    err = info.value
    msg = str(err)
    assert err.key == key, msg
    assert msg.startswith(f"{source}: {key}: "), msg
    if value is not None:
        assert err.value == value, msg
        assert repr(value) in msg, msg
    if rule is not None:
        assert re.search(rule, msg), msg
    return msg


# --------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("typo,want", [("heds", "heads"), ("head_dims", "head_dim"),
                                       ("windw", "window"), ("branch", "branches"),
                                       ("selektion", "selection"), ("dtyp", "dtype")])
def test_unknown_top_level_key_suggests_the_closest(typo, want):
    d = base()
    d[typo] = d.pop(want, 1)
    msg = raises(d, typo, rule="unknown key")
    assert f"did you mean {want!r}" in msg


def test_unknown_top_level_key_without_a_close_match_lists_the_valid_ones():
    d = base(zzzzzz=1)
    msg = raises(d, "zzzzzz", value=1, rule="unknown key")
    assert "heads" in msg and "selection" in msg


@pytest.mark.parametrize("path,typo,want", [("heads", "qq", "q"), ("head_dim", "vv", "v"),
                                            ("compression", "blok", "block"),
                                            ("compression", "strde", "stride"),
                                            ("selection", "cont", "count"),
                                            ("selection", "locl", "local")])
def test_unknown_nested_key(path, typo, want):
    d = base()
    d[path] = dict(d[path], **{typo: 3})
    msg = raises(d, f"{path}.{typo}", value=3, rule="unknown key")
    assert f"did you mean {want!r}" in msg


@pytest.mark.parametrize("missing", ["name", "heads", "head_dim"])
def test_required_top_level_keys(missing):
    raises(base(**{missing: None}), missing, rule="required")


@pytest.mark.parametrize("path", ["heads.q", "heads.kv", "head_dim.qk", "head_dim.v"])
def test_required_nested_keys(path):
    d = base()
    top, sub = path.split(".")
    d[top] = {k: v for k, v in d[top].items() if k != sub}
    raises(d, path, rule="required")


def test_non_mapping_root_and_sections():
    with pytest.raises(SpecError, match="<root>"):
        Spec.from_dict([1, 2], source="x.yaml")
    raises(base(heads=4), "heads", value=4, rule="mapping")
    raises(base(compression="mean"), "compression", value="mean", rule="mapping")
    raises(base(selection=[64, 16]), "selection", value=[64, 16], rule="mapping")


# -------------------------------------------------------------------------------------- types
WRONG_TYPES = [
    ("heads.q", "8", "integer"),
    ("heads.q", True, "integer"),
    ("heads.kv", 2.0, "integer"),
    ("head_dim.qk", "64", "integer"),
    ("head_dim.v", False, "integer"),
    ("compression.block", "32", "integer"),
    ("compression.stride", True, "integer"),
    ("compression.kind", 3, "str"),
    ("selection.block", 64.5, "integer"),
    ("selection.count", "16", "integer"),
    ("selection.initial", True, "integer"),
    ("selection.local", "2", "integer"),
    ("window", "512", "integer"),
    ("window", True, "integer"),
    ("window", 512.0, "integer"),
    ("name", 5, "str"),
    ("dtype", 16, "str"),
    ("branches", "cmp", "list"),
    ("kv_per_branch", 1, "str"),
    ("scale", "0.1", "number"),
    ("scale", True, "number"),
]


@pytest.mark.parametrize("path,value,rule", WRONG_TYPES, ids=[f"{p}={v!r}" for p, v, _ in WRONG_TYPES])
def test_wrong_types(path, value, rule):
    raises(nested(path, value), path, value=value, rule=rule)


def test_head_dim_shorthand_but_not_bool():
    s = Spec.from_dict(base(head_dim=48))
    assert (s.dim_qk, s.dim_v) == (48, 48)
    raises(base(head_dim=True), "head_dim", value=True, rule="mapping")


# ------------------------------------------------------------------------------------- values
SIZE_KEYS = ["heads.q", "heads.kv", "head_dim.qk", "head_dim.v", "compression.block",
             "compression.stride", "selection.block", "selection.count", "window"]


@pytest.mark.parametrize("path", SIZE_KEYS)
@pytest.mark.parametrize("value", [0, -1, -64])
def test_non_positive_sizes(path, value):
    raises(nested(path, value), path, value=value, rule="positive")


@pytest.mark.parametrize("path", ["selection.initial", "selection.local"])
def test_negative_forced_counts(path):
    raises(nested(path, -1), path, value=-1, rule="non-negative")
    Spec.from_dict(nested(path, 0))  # zero forced blocks is fine


@pytest.mark.parametrize("q,kv", [(8, 3), (6, 4), (1, 2)])
def test_heads_q_multiple_of_kv(q, kv):
    raises(base(heads={"q": q, "kv": kv}), "heads.q", value=q, rule=r"HQ % H == 0")


def test_stride_divides_compression_block():
    d = base(compression={"block": 32, "stride": 12, "kind": "mean"},
             selection={"block": 48, "count": 16, "initial": 1, "local": 2})
    raises(d, "compression.stride", value=12, rule=r"d \| l\b")


def test_stride_divides_selection_block():
    d = base(compression={"block": 32, "stride": 16, "kind": "mean"},
             selection={"block": 40, "count": 16, "initial": 1, "local": 2})
    raises(d, "compression.stride", value=16, rule=r"d \| l'")


def test_forced_blocks_fit_in_count():
    d = base(selection={"block": 64, "count": 3, "initial": 2, "local": 2})
    raises(d, "selection.count", value=3, rule=r"n_init \+ n_local <= n")
    # equality is allowed
    s = Spec.from_dict(base(selection={"block": 64, "count": 4, "initial": 2, "local": 2}))
    assert s.slc_count == 4
    # the default initial=1, local=2 apply to the rule too
    raises(base(selection={"count": 2}), "selection.count", value=2)


@pytest.mark.parametrize("branches,bad", [(["cmp", "sel"], "sel"), (["window"], "window"),
                                          (["CMP"], "CMP")])
def test_unknown_branch(branches, bad):
    raises(base(branches=branches), "branches", value=bad, rule="unknown branch")


def test_empty_and_duplicate_branches():
    raises(base(branches=[]), "branches", value=[], rule="at least one")
    raises(base(branches=["cmp", "cmp"]), "branches", rule="twice")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "float64", "int8", ""])
def test_unknown_dtype(dtype):
    raises(base(dtype=dtype), "dtype", value=dtype, rule="unknown dtype")


@pytest.mark.parametrize("kind", ["max", "MLP", "attention", ""])
def test_unknown_compression_kind(kind):
    raises(nested("compression.kind", kind), "compression.kind", value=kind,
           rule="unknown compression kind")


def test_unknown_kv_per_branch():
    raises(base(kv_per_branch="split"), "kv_per_branch", value="split")


def test_window_null():
    raises(base(window=None) | {"window": None}, "window", rule="'win' is a branch")
    # branches default to all three, so a null window is still an error
    d = base(branches=None)
    d["window"] = None
    raises(d, "window")
    # without the win branch a null window is fine, and any window is dropped
    d = base(branches=["cmp", "slc"])
    d["window"] = None
    assert Spec.from_dict(d).window is None
    assert Spec.from_dict(base(branches=["cmp", "slc"])).window is None


@pytest.mark.parametrize("scale", [0, -0.5, 0.0])
def test_non_positive_scale(scale):
    raises(base(scale=scale), "scale", rule="positive")


@pytest.mark.parametrize("name", ["", "a b", "x/y", "nsa:1"])
def test_bad_name(name):
    raises(base(name=name), "name", value=name)


def test_source_appears_in_every_error():
    msg = raises(nested("selection.count", 0), "selection.count", value=0, source="my/spec.yaml")
    assert msg.startswith("my/spec.yaml: selection.count: 0: ")


# ------------------------------------------------------------------------------------ defaults
def test_defaults():
    s = Spec.from_dict({"name": "m", "heads": {"q": 4, "kv": 1}, "head_dim": {"qk": 16, "v": 8}})
    assert (s.cmp_block, s.cmp_stride, s.slc_block, s.slc_count) == (32, 16, 64, 16)
    assert (s.slc_initial, s.slc_local, s.window) == (1, 2, 512)
    assert s.cmp_kind == "mlp" and s.dtype == "bfloat16"
    assert s.branches == ("cmp", "slc", "win") and s.kv_per_branch == "shared"
    assert s.scale is None and s.softmax_scale == 16 ** -0.5


def test_partial_sections_take_the_other_defaults():
    s = Spec.from_dict(base(compression={"kind": "linear"}, selection={"block": 128}))
    assert (s.cmp_block, s.cmp_stride, s.cmp_kind) == (32, 16, "linear")
    assert (s.slc_block, s.slc_count, s.slc_initial, s.slc_local) == (128, 16, 1, 2)
    s = Spec.from_dict(base(window=None))
    assert s.window == 512


def test_branches_are_canonically_ordered():
    s = Spec.from_dict(base(branches=["win", "cmp"]))
    assert s.branches == ("cmp", "win")
    assert s == Spec.from_dict(base(branches=["cmp", "win"]))


# ------------------------------------------------------------------------------------ loading
def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\nheads: {q: 4, kv: 2\nhead_dim: 8\n")
    with pytest.raises(SpecError) as info:
        load_spec(p)
    msg = str(info.value)
    assert str(p) in msg and "malformed YAML" in msg
    assert re.search(r"line \d+", msg), msg

    p2 = tmp_path / "tabs.yaml"
    p2.write_text("name: x\nheads:\n  q: 4\n\tkv: 2\n")
    with pytest.raises(SpecError, match=r"line 4"):
        load_spec(p2)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    with pytest.raises(SpecError, match=re.escape(str(p)) + r".*empty"):
        load_spec(p)


def test_non_mapping_file(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match=re.escape(str(p)) + r": <root>"):
        load_spec(p)


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nheds: {q: 4, kv: 2}\nhead_dim: 8\n")
    with pytest.raises(SpecError) as info:
        load_spec(p)
    assert info.value.source == str(p)
    assert str(info.value).startswith(f"{p}: heds: ")
    assert "did you mean 'heads'" in str(info.value)
    p.write_text("name: x\nheads: {q: 4, kv: 2}\nhead_dim: 8\nwindow: -3\n")
    with pytest.raises(SpecError, match=re.escape(f"{p}: window: -3: ")):
        load_spec(str(p))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no-such-spec"):
        load_spec("no-such-spec")


def test_load_valid_file(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("name: ok\nheads: {q: 4, kv: 2}\nhead_dim: 8\ndtype: float32\nwindow: 64\n")
    s = load_spec(p)
    assert (s.heads_q, s.heads_kv, s.dim_qk, s.dim_v, s.window) == (4, 2, 8, 8, 64)
    assert s.source == str(p)


# ---------------------------------------------------------------------------------- shipped specs
def test_shipped_specs_exist():
    assert {"nsa-paper", "nsa-d128", "nsa-fla"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_loads_by_path_and_name(name):
    by_path = load_spec(shipped_specs()[name])
    by_name = load_spec(name)
    assert by_path == by_name and hash(by_path) == hash(by_name)
    assert load_spec(name + ".yaml") == by_name
    assert by_name.name == name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_round_trips(name):
    s = load_spec(name)
    d = s.to_dict()
    again = Spec.from_dict(copy.deepcopy(d))
    assert again == s and hash(again) == hash(s)
    assert again.to_dict() == d
    assert again.uri == s.uri and again.digest() == s.digest()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_is_frozen_and_hashable(name):
    s = load_spec(name)
    assert {s: 1}[load_spec(name)] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.window = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.heads_q = 1


def test_nsa_paper_values():
    s = load_spec("nsa-paper")
    assert (s.heads_q, s.heads_kv, s.group, s.dim_qk, s.dim_v) == (64, 4, 16, 192, 128)
    assert (s.cmp_block, s.cmp_stride, s.cmp_kind) == (32, 16, "mlp")
    assert (s.slc_block, s.slc_count, s.slc_initial, s.slc_local, s.window) == (64, 16, 1, 2, 512)
    assert s.learned_compression and s.branches == ("cmp", "slc", "win")


def test_round_trip_without_window_and_with_scale():
    s = Spec.from_dict(base(branches=["cmp", "slc"], scale=0.125))
    d = s.to_dict()
    assert d["window"] is None and d["scale"] == 0.125
    assert Spec.from_dict(d) == s


# ------------------------------------------------------------------------------------- identity
def test_equal_specs_hash_equal_whatever_the_source():
    a = Spec.from_dict(base(), source="a.yaml")
    b = Spec.from_dict(copy.deepcopy(base()), source="b.yaml")
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != Spec.from_dict(base(window=256))


def test_name_is_not_semantic():
    a = Spec.from_dict(base())
    b = Spec.from_dict(base(name="other"))
    assert a.uri == b.uri and a.digest() == b.digest()


SEMANTIC_CHANGES = {
    "dtype": dict(dtype="bfloat16"),
    "heads.q": dict(heads={"q": 16, "kv": 2}),
    "heads.kv": dict(heads={"q": 8, "kv": 4}),
    "head_dim.qk": dict(head_dim={"qk": 128, "v": 32}),
    "head_dim.v": dict(head_dim={"qk": 64, "v": 64}),
    "compression.block": dict(compression={"block": 64, "stride": 16, "kind": "mean"}),
    "compression.stride": dict(compression={"block": 32, "stride": 8, "kind": "mean"}),
    "compression.kind=linear": dict(compression={"block": 32, "stride": 16, "kind": "linear"}),
    "compression.kind=mlp": dict(compression={"block": 32, "stride": 16, "kind": "mlp"}),
    "selection.block": dict(selection={"block": 128, "count": 16, "initial": 1, "local": 2}),
    "selection.count": dict(selection={"block": 64, "count": 8, "initial": 1, "local": 2}),
    "selection.initial": dict(selection={"block": 64, "count": 16, "initial": 0, "local": 2}),
    "selection.local": dict(selection={"block": 64, "count": 16, "initial": 1, "local": 1}),
    "window": dict(window=256),
    "branches-cmp": dict(branches=["slc", "win"]),
    "branches-slc": dict(branches=["cmp", "win"]),
    "branches-win": dict(branches=["cmp", "slc"]),
    "kv_per_branch": dict(kv_per_branch="separate"),
    "scale": dict(scale=0.5),
}


@pytest.mark.parametrize("field", sorted(SEMANTIC_CHANGES))
def test_semantic_change_changes_digest(field):
    a, b = Spec.from_dict(base()), Spec.from_dict(base(**SEMANTIC_CHANGES[field]))
    assert a != b
    assert a.digest() != b.digest()


@pytest.mark.parametrize("field", sorted(SEMANTIC_CHANGES))
def test_semantic_change_changes_uri(field):
    a, b = Spec.from_dict(base()), Spec.from_dict(base(**SEMANTIC_CHANGES[field]))
    assert a.uri != b.uri, f"{field}: both specs have uri {a.uri}"


def test_uri_is_readable():
    s = load_spec("nsa-paper")
    assert re.fullmatch(r"[a-z0-9_]+", s.uri)
    for part in ("bf16", "qk192", "v128", "c32s16", "b64n16", "w512"):
        assert part in s.uri


def test_replace_validates():
    s = Spec.from_dict(base())
    small = s.replace(cmp_block=8, cmp_stride=4, slc_block=8, slc_count=3, slc_local=1)
    assert small.cmp_block == 8 and small.slc_count == 3 and s.cmp_block == 32
    with pytest.raises(SpecError, match="compression.stride"):
        s.replace(cmp_stride=12)
    with pytest.raises(SpecError, match="heads.q"):
        s.replace(heads_q=7)


def test_replace_validates_branches_and_window():
    s = Spec.from_dict(base())
    with pytest.raises(SpecError, match="branches"):
        s.replace(branches=("bogus",))
    with pytest.raises(SpecError, match="branches"):
        s.replace(branches=())
    with pytest.raises(SpecError, match="window"):
        s.replace(window=None)        # 'win' is still a branch


@pytest.mark.parametrize("changes", [dict(window=64), dict(branches=("win", "cmp")),
                                     dict(branches=("cmp", "slc"))],
                         ids=["window", "branch-order", "drop-win"])
def test_replace_gives_the_canonical_spec(changes):
    """A replaced spec equals (and hashes like) the same layer built by from_dict."""
    r = Spec.from_dict(base()).replace(**changes)
    again = Spec.from_dict(r.to_dict())
    assert r == again and hash(r) == hash(again) and r.digest() == again.digest()


# ------------------------------------------------------------------------------ derived values
@pytest.mark.parametrize("q,kv,g", [(8, 2, 4), (64, 4, 16), (32, 32, 1), (4, 2, 2)])
def test_group(q, kv, g):
    assert Spec.from_dict(base(heads={"q": q, "kv": kv})).group == g


def test_num_cmp_and_blocks():
    s = Spec.from_dict(base())     # l=32, d=16, l'=64
    assert [s.num_cmp(T) for T in (1, 31)] == [0, 0]     # T < l: none
    assert s.num_cmp(32) == 1                            # T = l: one
    assert [s.num_cmp(T) for T in (47, 48, 63, 64, 65, 1024)] == [1, 2, 2, 3, 3, 63]
    for T in range(1, 300):
        want = (T - 32) // 16 + 1 if T >= 32 else 0
        assert s.num_cmp(T) == want
        assert s.num_blocks(T) == -(-T // 64)
    assert [s.num_blocks(T) for T in (1, 64, 65, 128, 129)] == [1, 1, 2, 2, 3]
    t = Spec.from_dict(base(compression={"block": 8, "stride": 8, "kind": "mean"},
                            selection={"block": 8, "count": 4, "initial": 1, "local": 1}))
    assert [t.num_cmp(T) for T in (7, 8, 15, 16, 17)] == [0, 1, 1, 2, 2]


def test_learned_compression_flag():
    assert not Spec.from_dict(base()).learned_compression
    for kind in ("linear", "mlp"):
        assert Spec.from_dict(nested("compression.kind", kind)).learned_compression


def test_public_names():
    assert nsagen.Spec is Spec and nsagen.SpecError is SpecError and nsagen.load_spec is load_spec
    assert issubclass(SpecError, ValueError)


def test_duplicate_yaml_key_is_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("name: dup\nheads: {q: 4, kv: 2}\nhead_dim: 8\nwindow: 8\nwindow: 16\n")
    with pytest.raises(SpecError, match=r"dup\.yaml.*line 5.*'window' is given twice"):
        load_spec(p)
