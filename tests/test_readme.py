"""The README states what the code does: its families table and its two set-up commands."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from families_table import families_table  # noqa: E402


def test_families_table_matches_the_code():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- families:start -->\n(.*?)\n<!-- families:end -->", readme, re.S).group(1)
    assert table == families_table()


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```")]
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
