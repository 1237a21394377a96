"""Every kernel a spec generates compiles for the H200's architecture (sm_90) with the installed
Triton, on a machine without a GPU: `nsagen build SPEC --arch 90` records the launches of a
forward, a backward and a decode step (DSA: forward and backward) and compiles each variant
(ptxas included)."""
import json
import os
import subprocess
import sys

import pytest

import nsagen


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton without its NVIDIA backend")
@pytest.mark.parametrize("name", ["nsa-d128", "nsa-paper", "dsa-v32", "dsa-v32-fp8"])
def test_every_kernel_compiles_for_sm90(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "nsagen.cli", "build", name, "--arch", "90"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    op = nsagen.build(nsagen.load_spec(name))
    kernels = set(op.module.CONFIGS) | set(getattr(op.module, "DECODE_CONFIGS", {}))
    compiled = {line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ")}
    assert all("KB shared" in line for line in out.splitlines() if line.startswith("  "))
    # every forward, backward and decode kernel of the module compiled (the backward's dq and
    # dk/dv halves are separate kernels of one config entry)
    for k in kernels:
        assert any(c == k or c.startswith(k + "_") for c in compiled), (k, out)
    assert "compile for sm_90" in out


_TOO_BIG = """
import dataclasses
import nsagen
from nsagen import crosscompile
from nsagen.target import Target
tiny = dataclasses.replace(Target.for_arch(90), smem_per_block=1024)
crosscompile.Target = type("Tiny", (), {{"for_arch": staticmethod(lambda arch: tiny)}})
seen = []
try:
    crosscompile.compile_for(nsagen.build(nsagen.load_spec({name!r})), workers=1,
                             progress=seen.append)
except RuntimeError as err:
    print("REFUSED", len(seen), str(err)[:300])
"""


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton without its NVIDIA backend")
def test_a_kernel_over_the_targets_shared_memory_is_refused():
    """A variant that compiles but needs more shared memory than a program of the target may
    have would fail at launch: the offline build refuses it, naming the kernel and the bytes,
    and stops there (one variant compiled, not every one). Each compiled variant reports its
    shared memory and registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _TOO_BIG.format(name="dsa-gqa")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = run.stdout.strip().splitlines()[-1]
    assert line.startswith("REFUSED 1 dsa_indexer"), line
    assert "bytes of shared memory a program; sm_90 allows 1024" in line


def test_refuses_to_cross_compile_under_the_interpreter(monkeypatch):
    from nsagen.crosscompile import record_launches

    op = nsagen.build(nsagen.load_spec("nsa-d128"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        record_launches(op)


_WRITES = """
import json, nsagen
from nsagen.crosscompile import written_tensors
op = nsagen.build(nsagen.load_spec({name!r}))
print(json.dumps({{k: sorted(v) for k, v in written_tensors(op).items()}}))
"""


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton without its NVIDIA backend")
@pytest.mark.parametrize("name", ["dsa-v32", "dsa-v32-fp8"])
def test_dsa_kernels_write_only_their_outputs(name):
    """torch's analysis (what torch.library's triton ops functionalize by) finds each DSA
    kernel writing exactly its outputs: an input counted as written would look mutated, and
    opcheck and torch.compile(fullgraph=True) fail on the op."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _WRITES.format(name=name)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    writes = json.loads(run.stdout.strip().splitlines()[-1])
    assert writes == {
        "dsa_indexer": ["ext_ptr", "score_ptr"],
        "dsa_topk": ["cand_ptr", "idx_ptr"],    # cand: its scratch of candidate lists
        "dsa_topk_hist": ["hist_ptr"],
        "dsa_topk_select": ["cnt_ptr", "idx_ptr"],
        "dsa_attention": ["lse_ptr", "o_ptr", "plse_ptr", "po_ptr"],
        "dsa_attention_combine": ["lse_ptr", "o_ptr"],
        # the wide heads' form: dS and P stored, then dq, then dK and dV
        "dsa_attention_bwd_ds": ["ds_ptr", "pw_ptr"],
        "dsa_attention_bwd_dq": ["dq_ptr"],
        "dsa_attention_bwd_dkv": ["dk_ptr", "dv_ptr"],
        "dsa_indexer_loss_fwd": ["loss_ptr", "saved_ptr"],
        "dsa_indexer_loss_bwd": ["dki_ptr", "dqi_ptr", "dw_ptr"],
        "dsa_append": ["k_ptr", "ki_ptr"] + (["ks_ptr"] if "fp8" in name else [])
        + ["lens_ptr", "v_ptr"],
    }
