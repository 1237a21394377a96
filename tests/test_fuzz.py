"""Property tests: any spec dictionary and any tensor shapes end either in a clear ValueError or
TypeError that names what is wrong, or in an output equal to the float64 reference.

Specs and inputs are small so that the kernels run under Triton's interpreter in CI; draws that
validate build their module (cached by content, so repeated layers are cheap)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsagen
from nsagen import reference

from kernel_checks import TOL, check_indices, rel_err

# kernels under the interpreter on CPU-only machines; the GPU suites cover CUDA (compiling every
# drawn layer there would take minutes)
RUN_KERNELS = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPEC_KEYS = ("name", "heads", "head_dim", "dtype", "compression", "selection", "window",
             "branches", "kv_per_branch", "scale")


def _maybe(strategy, junk=(None, -1, 0, "8", 2.5, True, [1])):
    """Mostly values of `strategy`, sometimes something a careless spec would hold."""
    return st.one_of(strategy, strategy, strategy, st.sampled_from(junk))


@st.composite
def spec_dicts(draw, small: bool = True):
    """A spec mapping: valid sizes most of the time, broken values and keys some of the time."""
    kv = draw(_maybe(st.sampled_from([1, 2])))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    q = kv * group if isinstance(kv, int) and not isinstance(kv, bool) else 4
    d = {
        "name": draw(_maybe(st.sampled_from(["fuzz", "f-1", "f.2"]),
                            junk=("", "a b", 'x"""', "x" * 300, 7))),
        "heads": {"q": draw(_maybe(st.just(q))), "kv": kv},
        "head_dim": {"qk": draw(_maybe(st.sampled_from([8, 16, 24]))),
                     "v": draw(_maybe(st.sampled_from([8, 16])))},
        "dtype": "float32",
        "compression": {"block": draw(_maybe(st.sampled_from([4, 8, 16]))),
                        "stride": draw(_maybe(st.sampled_from([2, 4, 8]))),
                        "kind": draw(_maybe(st.sampled_from(["mean", "linear", "mlp"]),
                                            junk=("median", 3)))},
        "selection": {"block": draw(_maybe(st.sampled_from([8, 16]))),
                      "count": draw(_maybe(st.sampled_from([1, 2, 4, 5]))),
                      "initial": draw(st.sampled_from([0, 1, 2])),
                      "local": draw(st.sampled_from([0, 1, 2, 3]))},
        "window": draw(_maybe(st.sampled_from([4, 16, 24]), junk=(0, -3, 2 ** 40, "w"))),
        "branches": draw(st.one_of(
            st.lists(st.sampled_from(["cmp", "slc", "win"]), min_size=1, max_size=3, unique=True),
            st.sampled_from([[], ["cmp", "cmp"], ["dense"], "cmp"]))),
        "kv_per_branch": draw(st.sampled_from(["shared", "shared", "separate", "split"])),
    }
    if draw(st.booleans()):
        d["scale"] = draw(st.sampled_from([0.25, "0.1", 1, float("inf"), float("nan"), -1.0,
                                           "1e-3", "abc"]))
    if draw(st.integers(0, 9)) == 0:
        d[draw(st.sampled_from(["heads_q", "windows", "extra"]))] = 1
    if draw(st.integers(0, 9)) == 0:
        d.pop(draw(st.sampled_from(SPEC_KEYS)), None)
    return d


def _inputs(spec, B, T, gen, shapes=None):
    """Inputs for `spec` ([B, T, ...]); `shapes` may override any tensor's shape."""
    H, HQ, Dk, Dv = spec.heads_kv, spec.heads_q, spec.dim_qk, spec.dim_v
    want = dict(q=(B, T, HQ, Dk), k=(B, T, H, Dk), v=(B, T, H, Dv), gates=(B, T, HQ, 3))
    nc = spec.num_cmp(T)
    if spec.learned_compression and (spec.has("cmp") or spec.has("slc")):
        want.update(k_cmp=(B, nc, H, Dk), v_cmp=(B, nc, H, Dv))
    if spec.kv_per_branch == "separate" and spec.has("win"):
        want.update(k_win=(B, T, H, Dk), v_win=(B, T, H, Dv))
    want.update(shapes or {})
    out = {}
    for name, shape in want.items():
        t = torch.randn(*shape, generator=gen)
        out[name] = (t.sigmoid() if name == "gates" else t).to(DEVICE)
    return out


def _check_call(spec, x):
    """Run the op; either it refuses with a message naming an argument, or it matches the
    reference (blocks compared by score, the output on the blocks the kernels chose)."""
    op = nsagen.build(spec)
    try:
        o, idx = op(**x, return_indices=True)
    except (ValueError, TypeError) as err:
        msg = str(err)
        named = msg.split(":", 1)[0].split(", ")
        assert len(msg) < 400 and set(named) & set(x), msg     # "k_cmp: expected shape ..."
        with pytest.raises((ValueError, TypeError)):     # the reference refuses it too
            reference.nsa(**{k_: t.double() for k_, t in x.items()}, spec=spec)
        return "refused"
    xd = {k_: t.double() for k_, t in x.items()}
    ref, ref_idx, ref_score = reference.nsa(**xd, spec=spec, return_indices=True,
                                            return_scores=True)
    assert torch.isfinite(o).all()
    if spec.has("slc"):
        T = x["q"].shape[1]
        check_indices(spec, idx.to(ref_idx.device), ref_idx, ref_score,
                      (T,) * x["q"].shape[0], torch.float32)
        if not torch.equal(idx.cpu(), ref_idx.cpu()):
            ref = reference.nsa(**xd, spec=spec, block_indices=idx)
    err = rel_err(o, ref)
    assert err < TOL[torch.float32], err
    # as a model calls it (no indices): the short-length plan wherever the sequences fit
    err = rel_err(op(**x), ref)
    assert err < TOL[torch.float32], ("without indices", err)
    return "ran"


@settings(max_examples=150, **SETTINGS)
@given(d=spec_dicts())
def test_any_spec_dict_validates_or_names_the_key(d):
    """Validation alone: fast, so many draws. A refusal is a SpecError (a ValueError) whose
    message is short and names a key; an accepted spec round-trips and renders."""
    try:
        spec = nsagen.Spec.from_dict(d, source="fuzz.yaml")
    except nsagen.SpecError as err:
        msg = str(err)
        assert msg.startswith("fuzz.yaml: ") and len(msg) < 400, msg
        assert err.key and err.key != "<root>"
        return
    assert nsagen.Spec.from_dict(spec.to_dict()) == spec
    assert nsagen.Spec(**{f: getattr(spec, f) for f in spec.__dataclass_fields__}) == spec


@st.composite
def valid_spec_dicts(draw):
    """Specs that validate by construction: every branch mix, group sizes 1-4 (3 is not a
    power of two), Dk != Dv, mean and learned compression, separate window k/v."""
    stride = draw(st.sampled_from([2, 4]))
    count = draw(st.integers(1, 5))
    initial = draw(st.integers(0, min(1, count)))
    kv = draw(st.sampled_from([1, 2]))
    d = {
        "name": "fuzz-run", "heads": {"q": kv * draw(st.sampled_from([1, 2, 3, 4])), "kv": kv},
        "head_dim": {"qk": draw(st.sampled_from([8, 16, 24])), "v": draw(st.sampled_from([8, 16]))},
        "dtype": "float32",
        "compression": {"block": stride * draw(st.sampled_from([1, 2, 4])), "stride": stride,
                        "kind": draw(st.sampled_from(["mean", "linear"]))},
        "selection": {"block": draw(st.sampled_from([8, 16])), "count": count,
                      "initial": initial, "local": draw(st.integers(0, count - initial))},
        "window": draw(st.sampled_from([4, 16, 24])),
        "branches": draw(st.lists(st.sampled_from(["cmp", "slc", "win"]), min_size=1,
                                  max_size=3, unique=True)),
        "kv_per_branch": draw(st.sampled_from(["shared", "separate"])),
    }
    if draw(st.booleans()):
        d["scale"] = draw(st.sampled_from([0.25, "0.1", 1]))
    return d


@pytest.mark.skipif(not RUN_KERNELS, reason="interpreter tests run on CPU-only machines")
@settings(max_examples=10, **SETTINGS)
@given(d=valid_spec_dicts(), B=st.integers(1, 2), T=st.integers(1, 40),
       seed=st.integers(0, 2 ** 16))
def test_any_valid_spec_runs_equal_to_the_reference(d, B, T, seed):
    spec = nsagen.Spec.from_dict(d)
    gen = torch.Generator().manual_seed(seed)
    assert _check_call(spec, _inputs(spec, B, T, gen)) == "ran"


BASE = dict(name="fuzz-shapes", heads={"q": 4, "kv": 2}, head_dim={"qk": 16, "v": 8},
            dtype="float32", compression={"block": 8, "stride": 4, "kind": "mean"},
            selection={"block": 8, "count": 2, "initial": 1, "local": 1}, window=8)


@pytest.mark.skipif(not RUN_KERNELS, reason="interpreter tests run on CPU-only machines")
@settings(max_examples=12, **SETTINGS)
@given(kind=st.sampled_from(["mean", "linear"]), B=st.integers(1, 2), T=st.integers(1, 30),
       bad=st.sampled_from([None, "q", "k", "v", "gates", "k_cmp"]),
       axis=st.integers(0, 4), delta=st.sampled_from([-1, 1, 2]),
       seed=st.integers(0, 2 ** 16))
def test_any_tensor_shapes_are_refused_or_right(kind, B, T, bad, axis, delta, seed):
    """One tensor's shape is off by a little (or has an axis too many or too few): the op
    refuses it naming the argument; untouched shapes give the reference's output."""
    spec = nsagen.Spec.from_dict(dict(BASE, compression=dict(BASE["compression"], kind=kind)))
    gen = torch.Generator().manual_seed(seed)
    x = _inputs(spec, B, T, gen)
    shapes = {}
    if bad in x:
        shape = list(x[bad].shape)
        if axis == 4:
            shape = shape[:-1] if delta < 0 else shape + [1]
        else:
            shape[axis] = max(0, shape[axis] + delta)
        shapes[bad] = tuple(shape)
    x = _inputs(spec, B, T, torch.Generator().manual_seed(seed), shapes)
    outcome = _check_call(spec, x)
    if not shapes:
        assert outcome == "ran"
