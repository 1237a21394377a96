#!/usr/bin/env python3
"""Compare what two source trees of nsagen compile to, kernel by kernel, without a GPU.

Each tree records the launches of one forward, backward and decode step of a spec (at 300
tokens, the module's default configs), compiles every variant for sm_90 with the installed
Triton and counts the PTX instructions by opcode, with the registers and local (spill) bytes
ptxas gives each kernel. A refactor of the templates that should not
change the code (shared device functions, reordered parameters) shows "same ops" for every
kernel; anything else is listed. Run from the repository root:

    python scripts/ptx-compare.py OLD_TREE [--spec nsa-d128] [--only cmp_attention_bwd,...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_DUMP = r'''
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import nsagen
from nsagen import crosscompile
spec, only = sys.argv[1], [o for o in sys.argv[2].split(",") if o]
op = nsagen.build(nsagen.load_spec(spec))
res = {}
for fn, args, kwargs in crosscompile.record_launches(op, 300, torch.bfloat16):
    if only and not any(fn.__name__.startswith(o) for o in only):
        continue
    sig, consts, options, attrs = crosscompile._signature(fn, args, kwargs)
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=options)
    ptx = k.asm["ptx"]
    body = ptx[ptx.index("{", ptx.index(".entry")):]
    hist = {}
    for line in body.splitlines():
        word = line.split()[0] if line.strip() else ""
        if word and not word.startswith(("//", ".", "$", "{", "}", ")")):
            hist[word] = hist.get(word, 0) + 1
    cfg = ",".join(f"{a}={b}" for a, b in sorted(kwargs.items()) if a.startswith(("B", "num_")))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    res[f"{fn.__name__} {cfg}"] = dict(hist=hist, shared=k.metadata.shared,
                                       regs=int(regs.group(1)) if regs else -1,
                                       local=int(local.group(1)) if local else -1)
print(json.dumps(res))
'''


def dump(tree: Path, spec: str, only: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PYTHONPATH=str(tree), NSAGEN_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", _DUMP, spec, only], cwd=tree, env=env,
                             check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path, help="the other tree (holds nsagen/, templates/, ...)")
    ap.add_argument("--spec", default="nsa-d128")
    ap.add_argument("--only", default="", help="comma-separated kernel name prefixes")
    args = ap.parse_args()
    a, b = dump(args.old.resolve(), args.spec, args.only), dump(Path.cwd(), args.spec, args.only)
    same = True
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            print(f"{key}: only in {'this tree' if x is None else 'the old tree'}")
            same = False
            continue
        ops = set(x["hist"]) | set(y["hist"])
        diff = {o: (x["hist"].get(o, 0), y["hist"].get(o, 0)) for o in sorted(ops)
                if x["hist"].get(o, 0) != y["hist"].get(o, 0)}
        n = sum(y["hist"].values())
        smem = "" if x["shared"] == y["shared"] else f", shared {x['shared']} -> {y['shared']}"
        res = (f", registers {x['regs']} -> {y['regs']}, local bytes {x['local']} -> {y['local']}"
               if (x["regs"], x["local"]) != (y["regs"], y["local"]) else "")
        print(f"{key}: {n} instructions, " + ("same ops" if not diff else f"differs {diff}")
              + smem + res)
        same &= not diff and not smem
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
