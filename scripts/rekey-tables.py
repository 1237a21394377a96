#!/usr/bin/env python3
"""Carry the shipped tuned tables over to new module names after a kernel-source change.

A module's name hashes its rendered source, so any template change renames every module and
orphans the tables tuned for the old names. For each table under autotune/<gpu>/ this renders
the shipped spec of the same URI (planned for that GPU's preset, hashed for the table's Triton),
keeps the entries of kernels that are still valid for the new module, drops the entries of the
kernels named with --retune (their source changed, so their tuned configs say nothing), and
writes the table under the new name. Run from the repository root:

    python scripts/rekey-tables.py --retune select_blocks
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import nsagen
from nsagen import codegen, configspace, tables
from nsagen.ir import lower
from nsagen.resources import shipped_specs
from nsagen.target import Target

PRESET_OF = {"nvidia-h200": "h200", "nvidia-h100-80gb-hbm3": "h100"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--retune", nargs="*", default=[], help="kernels whose entries to drop")
    ap.add_argument("--root", default="autotune")
    args = ap.parse_args()
    specs = {nsagen.load_spec(n).uri: nsagen.load_spec(n) for n in shipped_specs("nsa")}
    for path in sorted(Path(args.root).glob("*/*.json")):
        doc = json.loads(path.read_text())
        meta = doc["meta"]
        uri = meta["module"].rsplit("_", 1)[0]
        spec = specs.get(uri)
        if spec is None:
            print(f"{path}: no shipped spec has URI {uri}; left as is")
            continue
        target = Target.preset(PRESET_OF[path.parent.name])
        plan = lower(spec.replace(name="layer"), target)
        name = f"{spec.uri}_{codegen.source_hash(codegen.render(spec, target=target), meta['triton'])}"
        defaults = {k.name: (k.config, False) for k in plan.rendered}
        defaults.update({k.name: (k.config, True) for k in plan.decode.kernels})
        buckets = {}
        for bucket, entries in doc["buckets"].items():
            kept = {}
            for kernel, cfg in entries.items():
                if kernel in args.retune or kernel not in defaults and kernel != tables.DECODE_SPLITS:
                    continue
                if kernel in defaults:   # parameters added since the table was tuned: defaults
                    cfg = {**{p: v for p, v in defaults[kernel][0].items() if p not in cfg}, **cfg}
                if kernel in defaults and configspace.table_entry_error(
                        spec, kernel, cfg, *defaults[kernel]):
                    print(f"{path.name}: {bucket} {kernel}: entry no longer valid, dropped")
                    continue
                kept[kernel] = cfg
            buckets[bucket] = kept
        new = path.with_name(f"{name}.json")
        doc["meta"]["module"] = name
        doc["buckets"] = buckets
        new.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        if new != path:
            path.unlink()
        print(f"{path.name} -> {new.name}")


if __name__ == "__main__":
    main()
