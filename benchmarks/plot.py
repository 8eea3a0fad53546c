"""Draws a benchmarks/results/<name>.json of memory_speed.py as a PNG: activation memory per
method for each shape, and activation memory against depth and against sequence length where
the run has those sweeps.

    python benchmarks/plot.py benchmarks/results/h200.json   # writes benchmarks/results/h200.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _is_meft_exact(method: str) -> bool:
    return method.startswith("meft") and not method.endswith(("float", "vanilla"))


def main(path: Path) -> None:
    results = json.loads(path.read_text())
    rows = [r for r in results["memory_speed"] if "error" not in r]
    main_rows = [r for r in rows if r.get("sweep") is None]
    shapes = list(dict.fromkeys(r["shape"] for r in main_rows))
    sweeps = [(name, key, label) for name, key, label in (
        ("depth", "layers", "layers (OPT-1.3b width, batch 8 x 512)"),
        ("seq", "seq", "sequence length (OPT-1.3b, batch 2)"),
    ) if any(r.get("sweep") == name for r in rows)]
    panels = len(shapes) + len(sweeps)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    for col, shape in enumerate(shapes):
        data = [r for r in main_rows if r["shape"] == shape]
        ax = axes[0][col]
        colors = ["tab:orange" if _is_meft_exact(r["method"]) else "tab:gray" for r in data]
        ax.bar([r["method"] for r in data], [r["activation_gib"] for r in data], color=colors)
        ax.set_ylabel("activation memory (GiB)")
        ax.tick_params(axis="x", rotation=60)
        ax.set_title(f"{shape}, batch {data[0]['batch']} x {data[0]['seq']}, bf16")
    for i, (name, key, label) in enumerate(sweeps):
        ax = axes[0][len(shapes) + i]
        data = [r for r in rows if r.get("sweep") == name]
        for method in dict.fromkeys(r["method"] for r in data):
            points = sorted((r[key], r["activation_gib"]) for r in data if r["method"] == method)
            ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xlabel(label)
        ax.set_ylabel("activation memory (GiB)")
        ax.set_ylim(bottom=0)
        ax.legend()
    env = results["environment"]
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, transformers {env['transformers']} ({env['date']})")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
