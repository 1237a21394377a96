#!/usr/bin/env python3
"""Plot the retrieval experiment's arms (scripts/retrieval-arms.sh): for every JSON in a folder,
the NSA model's training accuracy and the best layer's needle-selected rate against steps (beside
the random-coverage baseline), and a table of the final recall per length of both models.

    python scripts/plot-retrieval.py results/retrieval      # writes results/retrieval/arms.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def table(runs: dict[str, dict]) -> str:
    """Markdown: final recall per length of each model in each run."""
    lines = []
    for name, doc in runs.items():
        for model, res in doc["models"].items():
            ev = res.get("eval", {})
            accs = ", ".join(f"{T}: {v['accuracy']:.3f}" for T, v in ev.items())
            lines.append(f"| {name} | {model} | {accs} |")
    return "| run | model | recall by length |\n|---|---|---|\n" + "\n".join(lines)


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    runs = load(folder)
    if not runs:
        print(f"no results in {folder}")
        return 1
    print(table(runs))
    try:
        import matplotlib                  # optional: only the plot needs it
    except ImportError:
        print("matplotlib is not installed: no plot")
        return 0
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_sel) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = plt.get_cmap("tab10").colors
    arms = sorted({name.rsplit("-seed", 1)[0] for name in runs})    # one colour per arm
    for name, doc in runs.items():
        nsa = doc["models"].get("nsagen")
        if nsa is None:
            continue
        arm, _, seed = name.rpartition("-seed")
        color = colors[arms.index(arm or name) % len(colors)]
        style = "-" if seed in ("", "0") else "--"                   # seed 0 solid, others dashed
        curve = nsa["curve"]
        ax_acc.plot([c["step"] for c in curve], [c["acc"] for c in curve], style, label=name,
                    lw=0.8, color=color)
        probes = nsa.get("probe") or []
        if probes:      # the layer that selects the needle best at each probe
            ax_sel.plot([p["step"] for p in probes],
                        [max(layer["needle_selected"] for layer in p["layers"]) for p in probes],
                        style, label=name, lw=0.8, color=color)
            ax_sel.plot([p["step"] for p in probes],
                        [p["layers"][0]["random_coverage"] for p in probes], "k:", lw=0.6)
    ax_acc.set(xlabel="step", ylabel="training answer accuracy (NSA)")
    ax_sel.set(xlabel="step", ylabel="needle block selected, best layer (dotted: random)",
               ylim=(0, 1.02))
    for ax in (ax_acc, ax_sel):
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = folder / "arms.png"
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
