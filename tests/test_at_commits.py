"""``benchmarks/at_commits.sh``: a command run at several commits on one machine imports each
commit's own package, with ``{}`` and ``$OUT`` filled in, and says what to do when a commit was not
prepared."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "at_commits.sh"

pytestmark = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the repository's history")


def _run(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TOOL), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_command_runs_at_each_prepared_commit(tmp_path):
    env = {**os.environ, "AT_COMMITS_DIR": str(tmp_path / "commits"), "OUT": str(tmp_path / "out"),
           "AT_COMMITS_INSTALL": "0"}
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    done = _run("prepare", head, env=env)
    assert done.returncode == 0, done.stderr
    pkg = tmp_path / "commits" / head / "nlgraph"
    assert (pkg / "compilers" / "chunked.py").exists() and (pkg / "specs").is_dir()

    code = "import nlgraph.compilers as m, sys; print(m.__file__, sys.argv[1], sys.argv[2])"
    done = _run("run", head, "--", sys.executable, "-P", "-c", code, "at-{}", "$OUT/x", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    printed = (out / f"{head}.log").read_text().split()
    assert printed[0] == str(pkg / "compilers" / "__init__.py")  # this commit's copy, not the checkout's
    assert printed[1:] == [f"at-{head}", f"{out}/x"]
    line = (out / "at_commits.txt").read_text()
    assert line.startswith(f"{head} rc=0 ") and str(pkg / "compilers") in line
    with tarfile.open(out / "results.tar.gz") as tar:
        assert {f"{head}.log", "at_commits.txt"} <= set(tar.getnames())


def test_an_unprepared_commit_is_one_clear_error(tmp_path):
    env = {**os.environ, "AT_COMMITS_DIR": str(tmp_path / "none"), "OUT": str(tmp_path / "out")}
    done = _run("run", "abc1234", "--", "true", env=env)
    assert done.returncode == 1
    assert "prepare abc1234" in done.stderr
    assert _run("prepare", "not-a-commit", env=env).returncode == 1
