"""The Target: hardware facts from presets (or the device), and what the compiler does with them."""
import dataclasses

import pytest
import torch

import nsagen
from nsagen import codegen
from nsagen.ir import lower
from nsagen.ir.passes import decode_splits
from nsagen.target import DEFAULT, PRESETS, Target, current


def test_presets_and_lookup():
    assert Target.preset("H200") is PRESETS["h200"] and Target.preset("nvidia-h100") is PRESETS["h100"]
    with pytest.raises(ValueError, match="unknown target 'tpu'.*h200"):
        Target.preset("tpu")
    assert Target.for_arch(90).arch == 90 and Target.for_arch(80) is PRESETS["a100"]
    sm_120 = Target.for_arch(120)                   # no preset: the newest one below, renamed
    assert sm_120.arch == 120 and sm_120.name == "sm_120"
    h200 = PRESETS["h200"]
    assert h200.smem_per_block == 232448 and h200.smem_budget < h200.smem_per_block
    assert h200.reg_limit < h200.max_regs_per_thread and h200.has_pdl and not PRESETS["a100"].has_pdl


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default applies without a GPU")
def test_without_a_gpu_the_default_preset_plans():
    assert current() is PRESETS[DEFAULT]


def test_the_target_changes_what_is_planned():
    """Less shared memory per program gives smaller tiles (and a module of its own); fewer SMs
    give fewer decode splits; the explanation names the target and quotes no measurement."""
    spec = nsagen.load_spec("nsa-d128")
    h200, a100 = PRESETS["h200"], PRESETS["a100"]
    big, small = lower(spec, h200), lower(spec, a100)
    assert big.kernel("cmp_attention").config != small.kernel("cmp_attention").config
    assert codegen.module_name(spec, target=h200) != codegen.module_name(spec, target=a100)
    few = dataclasses.replace(h200, sm_count=33)
    assert decode_splits(spec, 8, 65536, few)["cmp"] < decode_splits(spec, 8, 65536, h200)["cmp"]
    text = codegen.explain(spec, a100)
    assert "target a100 (sm_80): 108 SMs" in text
    assert "H200" not in text and " us " not in text and " ms " not in text
