"""Every ``NLGRAPH_*`` environment variable the code reads is in the table of ``docs/cli.md``
("Environment variables"), and the table names no variable the code no longer reads."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bNLGRAPH_[A-Z][A-Z0-9_]*\b")


def _in_code() -> set[str]:
    files = [*ROOT.joinpath("nlgraph").rglob("*.py"), *ROOT.joinpath("compilers").rglob("*.py"),
             *ROOT.joinpath("scripts").glob("*.sh"), ROOT / "benchmarks" / "device.sh"]
    return {m for f in files for m in NAME.findall(f.read_text(encoding="utf-8"))}


def _in_table() -> set[str]:
    text = ROOT.joinpath("docs", "cli.md").read_text(encoding="utf-8")
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\| `(NLGRAPH_[A-Z0-9_]+)` \|", section, re.M)}


def test_every_environment_variable_is_documented_and_no_other():
    code, table = _in_code(), _in_table()
    assert code, "no NLGRAPH_* variable found in the code: the scan is broken"
    assert code - table == set(), f"read by the code but not in docs/cli.md: {sorted(code - table)}"
    assert table - code == set(), f"in docs/cli.md but read nowhere: {sorted(table - code)}"
