"""Draws benchmarks/results/<name>.json as a PNG: activation memory and step time per method.

    python benchmarks/plot.py benchmarks/results/h200.json   # writes benchmarks/results/h200.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: Path) -> None:
    results = json.loads(path.read_text())
    rows = [r for r in results["memory_speed"] if "error" not in r]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 7), squeeze=False)
    for col, shape in enumerate(shapes):
        data = [r for r in rows if r["shape"] == shape]
        names = [r["method"] for r in data]
        colors = ["tab:orange" if n.startswith("meft") and "-" not in n else "tab:gray" for n in names]
        for row, (key, label) in enumerate((("activation_gib", "activation memory (GiB)"), ("step_ms", "step time (ms)"))):
            ax = axes[row][col]
            ax.bar(names, [r[key] for r in data], color=colors)
            ax.set_ylabel(label)
            ax.tick_params(axis="x", rotation=45)
            if row == 0:
                ax.set_title(f"{shape}, batch {data[0]['batch']} x {data[0]['seq']}, bf16")
    env = results["environment"]
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, transformers {env['transformers']} ({env['date']})")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
