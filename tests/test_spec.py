"""The spec language: every validation rule of Spec (constructor, from_dict, load_spec), the YAML
loader's limits, the bounds of every size, defaults, identity."""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import time

import pytest

import nsagen
from nsagen import Spec, SpecError, load_spec
from nsagen.resources import shipped_specs

SHIPPED = sorted(shipped_specs())
SHIPPED_NSA = sorted(shipped_specs("nsa"))


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
    ("scale", "fast", "number"),
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


@pytest.mark.parametrize("name", SHIPPED_NSA)
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


# --------------------------------------------------------------------------- the constructor
FIELDS = dict(name="direct", heads_q=4, heads_kv=2, dim_qk=16, dim_v=16)


def direct(**changes):
    """Spec(...) built by the dataclass constructor from FIELDS with some fields changed."""
    return Spec(**dict(FIELDS, **changes))


def test_constructor_builds_the_same_spec_as_from_dict():
    d = {"name": "direct", "heads": {"q": 4, "kv": 2}, "head_dim": 16}
    assert direct() == Spec.from_dict(d) and hash(direct()) == hash(Spec.from_dict(d))


CONSTRUCTOR_REFUSALS = [
    ("name", 'x"""; import os', "name", "letters, digits"),
    ("name", "", "name", "letters, digits"),
    ("name", "a" * 65, "name", "64 characters"),
    ("name", "caf\u00e9", "name", "letters, digits"),
    ("name", 5, "name", "str"),
    ("heads_q", "4", "heads.q", "integer"),
    ("heads_q", True, "heads.q", "integer"),
    ("heads_q", 4.0, "heads.q", "integer"),
    ("heads_kv", 3, "heads.q", r"HQ % H == 0"),
    ("dim_qk", 0, "head_dim.qk", "positive"),
    ("dim_v", None, "head_dim.v", "integer"),
    ("cmp_stride", 12, "compression.stride", r"d \| l\b"),
    ("slc_count", 100000, "selection.count", "at most 64"),
    ("window", 2 ** 40, "window", "at most 1048576"),
    ("window", 8.0, "window", "integer"),
    ("dtype", "fp16", "dtype", "unknown dtype"),
    ("cmp_kind", "max", "compression.kind", "unknown compression kind"),
    ("kv_per_branch", "split", "kv_per_branch", "shared, separate"),
    ("branches", ("cmp", "sel"), "branches", "unknown branch"),
    ("branches", (), "branches", "at least one"),
    ("branches", "cmp", "branches", "tuple"),
    ("branches", ("cmp", "cmp"), "branches", "twice"),
    ("scale", float("nan"), "scale", "positive finite"),
    ("scale", float("inf"), "scale", "positive finite"),
    ("scale", "0.1", "scale", "number"),
    ("scale", True, "scale", "number"),
]


@pytest.mark.parametrize("field,value,key,rule", CONSTRUCTOR_REFUSALS,
                         ids=[f"{f}={v!r:.20}" for f, v, _, _ in CONSTRUCTOR_REFUSALS])
def test_constructor_validates(field, value, key, rule):
    with pytest.raises(SpecError) as info:
        direct(**{field: value})
    assert info.value.key == key, str(info.value)
    assert re.search(rule, str(info.value)), str(info.value)


def test_constructor_normalises_like_from_dict():
    """Branch order, a window without the win branch and an integer scale come out canonical,
    so a spec compares, hashes and digests the same whichever way it was built."""
    a = direct(branches=["win", "cmp"], scale=1)
    b = Spec.from_dict({"name": "direct", "heads": {"q": 4, "kv": 2}, "head_dim": 16,
                        "branches": ["cmp", "win"], "scale": 1.0})
    assert a.branches == ("cmp", "win") and isinstance(a.scale, float)
    assert a == b and hash(a) == hash(b) and a.digest() == b.digest()
    assert direct(branches=("cmp", "slc")).window is None
    with pytest.raises(SpecError, match="'win' is a branch"):
        direct(window=None)


def test_dataclasses_replace_validates():
    s = direct()
    with pytest.raises(SpecError, match="heads.q"):
        dataclasses.replace(s, heads_q=7)
    with pytest.raises(SpecError, match="name"):
        s.replace(name="a b")


# -------------------------------------------------------------------------------- bounds
UPPER_BOUNDS = [
    ("heads.q", {"heads": {"q": 512, "kv": 4}}, "heads.q", r"at most 256"),
    ("group", {"heads": {"q": 256, "kv": 1}}, "heads.q", r"heads\.q / heads\.kv.*at most 128"),
    ("head_dim.qk", {"head_dim": {"qk": 512, "v": 32}}, "head_dim.qk", r"at most 256"),
    ("head_dim.v", {"head_dim": {"qk": 64, "v": 320}}, "head_dim.v", r"at most 256"),
    ("compression.block", {"compression": {"block": 512, "stride": 16, "kind": "mean"}},
     "compression.block", r"at most 256"),
    ("compression ratio", {"compression": {"block": 130, "stride": 2, "kind": "mean"}},
     "compression.block", r"compression\.block / compression\.stride.*at most 64"),
    ("selection.block", {"selection": {"block": 512, "count": 16, "initial": 1, "local": 2}},
     "selection.block", r"at most 256"),
    ("selection.count", {"selection": {"block": 64, "count": 65, "initial": 1, "local": 2}},
     "selection.count", r"at most 64"),
    ("window", {"window": 1048577}, "window", r"at most 1048576"),
    ("huge window", {"window": 10 ** 5000}, "window", r"at most 1048576"),
]


@pytest.mark.parametrize("what,changes,key,rule", UPPER_BOUNDS, ids=[u[0] for u in UPPER_BOUNDS])
def test_sizes_are_bounded(what, changes, key, rule):
    msg = raises(base(**changes), key, rule=rule)
    assert len(msg) < 300, msg


def test_largest_sizes_are_valid():
    s = Spec.from_dict(base(heads={"q": 256, "kv": 2}, head_dim={"qk": 256, "v": 256},
                            compression={"block": 256, "stride": 4, "kind": "mlp"},
                            selection={"block": 256, "count": 64, "initial": 1, "local": 2},
                            window=1048576))
    assert (s.group, s.cmp_block // s.cmp_stride, s.slc_count) == (128, 64, 64)
    s.check_kernels()


@pytest.mark.parametrize("block,stride", [(48, 16), (12, 4), (12, 3), (24, 8)])
def test_kernels_need_a_power_of_two_selection_block(block, stride):
    """The reference takes any l' that d divides; the kernels tile a selected block with one
    tl.arange and need a power of two."""
    s = Spec.from_dict(base(compression={"block": 2 * stride, "stride": stride, "kind": "mean"},
                            selection={"block": block, "count": 4, "initial": 1, "local": 1}))
    with pytest.raises(SpecError) as info:
        s.check_kernels()
    assert info.value.key == "selection.block" and info.value.value == block
    assert "power of two" in str(info.value)


@pytest.mark.parametrize("name", SHIPPED_NSA)
def test_shipped_specs_suit_the_kernels(name):
    load_spec(name).check_kernels()


# --------------------------------------------------------------------------------- scale
@pytest.mark.parametrize("text", [".inf", "-.inf", "1.0e+400", ".nan", "0", "0.0", "-1.0", "-1",
                                  '"1e400"'])
def test_scale_must_be_positive_and_finite(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(f"name: s\nheads: {{q: 4, kv: 2}}\nhead_dim: 8\nscale: {text}\n")
    with pytest.raises(SpecError, match=r"scale: .*must be a positive finite number"):
        load_spec(p)


@pytest.mark.parametrize("text,want", [("1e-3", 0.001), ("2E-2", 0.02), ("0.125", 0.125),
                                       ("3", 3.0), ('"0.5"', 0.5), ("+1.5e-1", 0.15)])
def test_scale_accepts_numbers_yaml_reads_as_strings(tmp_path, text, want):
    """YAML 1.1 reads 1e-3 (no dot) as a string: a float literal in a string is its number."""
    p = tmp_path / "s.yaml"
    p.write_text(f"name: s\nheads: {{q: 4, kv: 2}}\nhead_dim: 8\nscale: {text}\n")
    s = load_spec(p)
    assert isinstance(s.scale, float) and math.isclose(s.scale, want)


@pytest.mark.parametrize("value", ["fast", "nan", "inf", "1e-3x", "0x10", "1_000", " ", ""])
def test_scale_strings_that_are_not_numbers(value):
    msg = raises(base(scale=value), "scale", value=value, rule="write a number such as 0.001")
    assert len(msg) < 300


# --------------------------------------------------------------------------- short messages
@pytest.mark.parametrize("d", [base(name="x" * 10000), base(**{"k" * 10000: 1}),
                               base(branches=["cmp", "z" * 10000]), base(dtype="f" * 10000),
                               base(branches=["cmp"] * 10000), "y" * 10000],
                         ids=["value", "key", "branch", "dtype", "long-list", "root"])
def test_errors_quote_a_short_prefix_of_long_input(d):
    with pytest.raises(SpecError) as info:
        Spec.from_dict(d, source="spec.yaml")
    msg = str(info.value)
    assert len(msg) < 300, msg
    assert "..." in msg and msg.count("\n") == 0
    with pytest.raises(SpecError) as info:           # a long path is cut too, keeping its end
        Spec.from_dict(d, source="/" + "d" * 10000 + "/spec.yaml")
    msg = str(info.value)
    assert len(msg) < 400 and msg.startswith("...ddd") and "d/spec.yaml: " in msg, msg


def test_a_text_file_is_not_echoed(tmp_path):
    """A file that parses as one long string (like /etc/passwd) is refused without printing it."""
    p = tmp_path / "passwd"
    p.write_text("".join(f"user{i}:x:{i}:{i}:User {i}:/home/user{i}:/bin/sh\n" for i in range(300)))
    with pytest.raises(SpecError, match="mapping") as info:
        load_spec(p)
    assert len(str(info.value)) < 300 and "user299" not in str(info.value)


def test_missing_file_message_is_short():
    with pytest.raises(FileNotFoundError) as info:
        load_spec("no-such-" + "x" * 10000)
    assert len(str(info.value)) < 300


# ------------------------------------------------------------------------ hostile YAML files
GOOD_TEXT = "name: ok\nheads: {q: 4, kv: 2}\nhead_dim: 8\ndtype: float32\nwindow: 64\n"
BILLION_LAUGHS = "\n".join(      # 9 ** 12 strings from 543 bytes
    ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]"
       for p, c in zip("abcdefghijk", "bcdefghijkl")]) + "\n"


def hostile(tmp_path, name, data):
    p = tmp_path / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data)
    return p


def test_alias_bomb_is_refused_quickly(tmp_path):
    assert 500 < len(BILLION_LAUGHS) < 600
    p = hostile(tmp_path, "bomb.yaml", BILLION_LAUGHS)
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=r"bomb\.yaml: <yaml line 1, column \d+>: .*alias"):
        load_spec(p)
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("text,line", [("name: &n x\nheads: {q: 4, kv: 2}\nhead_dim: 8\n", 1),
                                       ("name: x\nheads: {q: 4, kv: 2}\nhead_dim: *d\n", 3)])
def test_anchors_and_aliases_are_refused(tmp_path, text, line):
    with pytest.raises(SpecError, match=rf"line {line}\b.*anchors and aliases"):
        load_spec(hostile(tmp_path, "a.yaml", text))


@pytest.mark.parametrize("depth", [17, 5000])
def test_deep_nesting_is_refused(tmp_path, depth):
    p = hostile(tmp_path, "deep.yaml", "name: x\nbranches: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(SpecError, match=r"line 2\b.*nested deeper than 16"):
        load_spec(p)


def test_nesting_up_to_the_bound_is_parsed(tmp_path):
    p = hostile(tmp_path, "deep.yaml", "name: x\nbranches: " + "[" * 15 + "]" * 15 + "\n")
    with pytest.raises(SpecError, match="required key is missing"):     # parsed, then validated
        load_spec(p)


@pytest.mark.parametrize("text,line,kind", [
    ("name: x\n[a, b]: 1\n", 2, "list"),
    ("name: x\n? {a: 1}\n: 2\n", 2, "mapping"),
    ("name: x\nheads: {q: 4, kv: 2}\n3: 1\n", 3, "3"),
    ("name: x\nheads:\n  q: 4\n  [kv]: 2\n", 4, "list"),
])
def test_keys_must_be_strings(tmp_path, text, line, kind):
    with pytest.raises(SpecError, match=rf"line {line}\b.*{kind}.* not a name") as info:
        load_spec(hostile(tmp_path, "k.yaml", text))
    assert len(str(info.value)) < 300


def test_large_files_are_refused_before_parsing(tmp_path):
    p = hostile(tmp_path, "big.yaml", GOOD_TEXT + "#" * (64 * 1024) + "\n")
    with pytest.raises(SpecError, match=r"larger than 64 KiB"):
        load_spec(p)
    load_spec(hostile(tmp_path, "fits.yaml", GOOD_TEXT + "#" * (60 * 1024) + "\n"))


@pytest.mark.parametrize("data,rule", [
    (b"name: caf\xe9\nheads: {q: 4, kv: 2}\nhead_dim: 8\n", r"not UTF-8.*0xe9.*line 1"),
    (GOOD_TEXT.encode("utf-16"), r"UTF-16"),
    (GOOD_TEXT.encode("utf-16-le"), r"NUL"),
    (GOOD_TEXT.encode("utf-32"), r"UTF-32"),
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), r"NUL"),
], ids=["latin-1", "utf-16", "utf-16-le-no-bom", "utf-32", "binary"])
def test_files_that_are_not_utf8_text(tmp_path, data, rule):
    with pytest.raises(SpecError, match=rule) as info:
        load_spec(hostile(tmp_path, "enc.yaml", data))
    assert len(str(info.value)) < 300


def test_utf8_with_a_byte_order_mark_is_fine(tmp_path):
    assert load_spec(hostile(tmp_path, "bom.yaml", ("\ufeff" + GOOD_TEXT).encode())).name == "ok"


def test_a_directory_is_not_a_spec(tmp_path):
    d = tmp_path / "specs.yaml"
    d.mkdir()
    with pytest.raises(SpecError, match=r"specs\.yaml: <file>: is a directory"):
        load_spec(d)


def test_an_integer_literal_too_long_to_read(tmp_path):
    p = hostile(tmp_path, "int.yaml", "name: x\nheads: {q: 4, kv: 2}\nhead_dim: 8\nwindow: "
                + "9" * 5000 + "\n")
    with pytest.raises(SpecError, match=r"line 4\b.*integer") as info:
        load_spec(p)
    assert len(str(info.value)) < 300
