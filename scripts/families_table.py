"""Prints the README's table of supported model families and heads, from the family table itself.

    python scripts/families_table.py    # paste between the markers in README.md (a test compares)
"""

from __future__ import annotations

from meft_convert.templates.families import FAMILIES

NORMS = {"pre": "pre-norm", "post": "post-norm"}


def families_table() -> str:
    lines = ["| model type | layers | norm | heads (Auto classes) |", "|---|---|---|---|"]
    for family in FAMILIES.values():
        heads = ", ".join(
            f"{auto} ({head.library_class}" + (f"; when the checkpoint has `{head.requires_keys}*`)" if head.requires_keys else ")")
            for auto, head in family.heads.items()
        )
        layers = ", ".join(f"`{stack.layers}`" for stack in family.stacks)
        lines.append(f"| `{family.model_type}` | {layers} | {NORMS[family.norm]} | {heads} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(families_table())
