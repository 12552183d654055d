"""The GPU steps of ``benchmarks/gpu_session.sh`` name scripts that exist and options those scripts
take: a step's typo would otherwise surface only on the device machine, after its install, at the
cost of scarce device minutes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SESSION = ROOT / "benchmarks" / "gpu_session.sh"


def _steps() -> dict[str, str]:
    out = subprocess.run(["bash", str(SESSION), "--list"], capture_output=True, text=True, check=True).stdout
    steps = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+)\s+(\d+)s\s+(.*)$", line)
        if m:
            steps[m.group(1)] = m.group(3)
    return steps


def _invocations(cmd: str) -> list[tuple[str, list[str] | None]]:
    """``(program, options)`` of every ``python`` command of a step (joined by ``&&`` or ``;``, in a
    ``for`` loop's body, after environment assignments);
    ``None`` for a script that takes no options; ``("pytest", test files)`` for ``python -m pytest``."""
    calls = []
    for part in re.split(r"\s*(?:&&|;|\bdo\b|\bdone\b)\s*", cmd):
        words = shlex.split(part.replace("$J", "out.json").replace("$OUT", "out"))
        while words and re.match(r"^[A-Z_]+=", words[0]):
            words.pop(0)
        if not words or words[0] != "python":
            continue
        words = [w for w in words[1:] if w != "-P"]
        if words[:2] == ["-m", "pytest"]:  # pytest's own options; the test files must exist
            calls.append(("pytest", [w.split("::")[0] for w in words[2:] if w.startswith("tests/")]))
            continue
        if words[:2] == ["-m", "nlgraph"]:
            program, rest = "nlgraph " + words[2], words[3:]
        else:
            program, rest = words[0], words[1:]
            if program.endswith("with_mlp_warps.py"):  # with_mlp_warps.py W B <nlgraph command ...>
                calls.append((program, None))  # positional arguments only: it must exist
                program, rest = "nlgraph " + rest[2], rest[3:]
        calls.append((program, [w.split("=")[0] for w in rest if w.startswith("--")]))
    return calls


def test_the_steps_are_listed():
    steps = _steps()
    assert len(steps) > 20 and "value_beta_check" in steps and "ddp_2gpu" in steps


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {}


def _help(program: str, cache: dict[str, str]) -> str:
    if program not in cache:
        if program.startswith("nlgraph "):
            argv = [sys.executable, "-m", "nlgraph", program.split()[1], "--help"]
        else:
            path = ROOT / program
            assert path.is_file(), f"gpu_session.sh names {program}, which does not exist"
            argv = [sys.executable, str(path), "--help"]
        res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert res.returncode == 0, f"{' '.join(argv)} failed: {res.stderr[-2000:]}"
        cache[program] = res.stdout
    return cache[program]


def test_every_step_names_a_script_and_options_it_takes(helps):
    bad = []
    for name, cmd in _steps().items():
        for program, options in _invocations(cmd):
            if program == "pytest":
                assert options, f"{name}: pytest runs no test file"
                bad += [f"{name}: pytest {f} does not exist" for f in options if not (ROOT / f).is_file()]
                continue
            if options is None:
                assert (ROOT / program).is_file(), f"{name}: {program} does not exist"
                continue
            text = _help(program, helps)
            # the whole option: argparse refuses a prefix that more than one option shares
            bad += [f"{name}: {program} {o}" for o in options
                    if not re.search(r"(?<![\w-])" + re.escape(o) + r"(?![\w-])", text)]
    assert not bad, "options the scripts do not take:\n" + "\n".join(bad)
