"""Golden tests: every malformed spec in tests/golden/bad_specs gives its one-line error (file, line,
YAML path, what to do) and exit code 1 from the CLI, with no traceback.

A case file may start with ``# overrides: KEY=VALUE ...``. Regenerate the golden file after a
deliberate wording change with ``NLGRAPH_UPDATE_GOLDEN=1 pytest tests/test_spec_errors.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nlgraph.cli import main

HERE = Path(__file__).parent
CASES = HERE / "golden" / "bad_specs"
GOLDEN = HERE / "golden" / "spec_errors.txt"
ROOT = HERE.parent

# cases that are not a spec file of their own: (name, argv)
EXTRA = {
    "missing_file": ["validate", "tests/golden/bad_specs/no_such_file.yaml"],
    "library_typo": ["validate", "hopee"],
    "directory": ["validate", "tests/golden"],
    "override_bad_yaml": ["validate", "deltanet", "model.d_model=[1,"],
    "override_list_index": ["validate", "deltanet", "model.blocks.3=x"],
}


def _cases() -> dict[str, list[str]]:
    out = {}
    for f in sorted(CASES.glob("*.yaml")):
        first = f.read_text().splitlines()[:1]
        overrides = first[0].removeprefix("# overrides:").split() if first and first[0].startswith("# overrides:") else []
        out[f.stem] = ["validate", str(f.relative_to(ROOT)), *overrides]
    out.update(EXTRA)
    return out


def _run(argv, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("NLGRAPH_DEBUG", raising=False)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _golden() -> dict[str, str]:
    lines = GOLDEN.read_text(encoding="utf-8").splitlines() if GOLDEN.exists() else []
    return dict(line.split(" | ", 1) for line in lines if line.strip())


def test_at_least_twenty_cases():
    assert len(_cases()) >= 20


@pytest.mark.parametrize("name", sorted(_cases()))
def test_bad_spec_error(name, capsys, monkeypatch):
    code, out, err = _run(_cases()[name], capsys, monkeypatch)
    assert code == 1, f"{name}: exit code {code}, stderr {err!r}"
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"{name}: expected one line, got {lines}"
    if os.environ.get("NLGRAPH_UPDATE_GOLDEN"):
        golden = _golden()
        golden[name] = lines[0]
        GOLDEN.write_text("".join(f"{k} | {v}\n" for k, v in sorted(golden.items())), encoding="utf-8")
        return
    expected = _golden().get(name)
    assert expected is not None, f"no golden line for {name}; run with NLGRAPH_UPDATE_GOLDEN=1"
    assert lines[0] == expected


def test_golden_has_no_stale_entries():
    assert set(_golden()) == set(_cases())


def test_validate_all_lists_every_problem(capsys, monkeypatch, tmp_path):
    spec = tmp_path / "two.yaml"
    spec.write_text(
        "levels:\n  mixer:\n    memory: {kind: linear, heads: x}\n    frequncy: 2\n"
        "model: {vocab: 256, d_model: 64, blocks: [mixer]}\n"
    )
    code, _, err = _run(["validate", str(spec)], capsys, monkeypatch)
    assert code == 1 and "(and 1 more problem;" in err
    code, _, err = _run(["validate", str(spec), "--all"], capsys, monkeypatch)
    lines = err.splitlines()
    assert code == 1 and len(lines) == 2
    assert "levels.mixer.memory.heads: expected an integer" in lines[0]
    assert "levels.mixer.frequncy: unknown key 'frequncy'; did you mean 'frequency'?" in lines[1]


def test_errors_page_lists_every_golden_line():
    page = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    for name, line in _golden().items():
        assert f"| `{name}` | {line.removeprefix('error: ').replace('|', chr(92) + '|')} |" in page, name
