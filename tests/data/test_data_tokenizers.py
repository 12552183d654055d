"""Tokenizers: byte-level round trips, the pure-Python GPT-2 BPE (toy merges here; the real files
and tiktoken when present), the pre-tokenizer pattern, and the vocab check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nlgraph.data import ByteTokenizer, GPT2Tokenizer, check_vocab, get_tokenizer, tokenizer_dir
from nlgraph.data.tokenizers import _bytes_to_unicode, _gpt2_pattern
from nlgraph.errors import DataError

TEXTS = ["", "Hello world, the quick brown fox.", "naïve café — Ω ½ 日本語 🤖\n\ttabs  and   spaces ",
         "we'll they're I'M 2024-12-03 3.14159 <|endoftext|>", "\x00\x1c\x7f"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = get_tokenizer("byte")
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text and tok.decode(ids.tolist()) == text
    assert tok.decode(torch.from_numpy(ids)) == text
    assert tok.vocab_size == 256 and tok.name == "byte"


def test_byte_decode_never_raises():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, 0xFF]) == "hi\ufffd"  # invalid UTF-8
    assert tok.decode([104, 300, 105, -1]) == "h\ufffdi\ufffd"  # ids no byte stands for


def test_pretokenizer_splits_as_gpt2():
    pat = _gpt2_pattern()
    assert pat.findall("Hello world, it's 2024!\n\n  ok") == [
        "Hello", " world", ",", " it", "'s", " 2024", "!", "\n\n ", " ok"]
    assert pat.findall("naïve café — Ω ½ x\u00a0y\u2003z\x1cq  \t") == [
        "naïve", " café", " —", " Ω", " ½", " x", "\xa0", "y", "\u2003", "z", "\x1c", "q", "  \t"]
    assert pat.findall("we'll they're I'M") == ["we", "'ll", " they", "'re", " I", "'", "M"]


def test_pretokenizer_matches_the_regex_module():
    regex = pytest.importorskip("regex", reason="extra: compares with the `regex` module when installed")
    ref = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ019 \t\n'.,!-_") + ["é", "Ω", "½", "日", "🤖", "\u00a0", "\u2003", "\x1c", "١"]
    for _ in range(300):
        s = "".join(rng.choice(alphabet, size=int(rng.integers(0, 30))))
        assert _gpt2_pattern().findall(s) == ref.findall(s), repr(s)


@pytest.fixture
def toy_bpe(tmp_path):
    """BPE files in GPT-2's format with byte b -> id b and six merges."""
    byte_enc = _bytes_to_unicode()
    encoder = {byte_enc[b]: b for b in range(256)}
    merges = ["l l", "e l", "h e", "he ll", "hell o", "Ġ w", "Ġw o"]
    for i, m in enumerate(merges):
        encoder[m.replace(" ", "")] = 256 + i
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return tmp_path


def test_python_bpe_merges_lowest_rank_first(toy_bpe):
    tok = GPT2Tokenizer(toy_bpe, backend="python")
    assert tok.backend == "python"
    # h e l l o: "l l" (rank 0) first, then "h e", "he ll", "hell o"
    assert tok.encode("hello").tolist() == [256 + 4]
    # e l l: "l l" outranks "e l", so not [el, l]
    assert tok.encode("ell").tolist() == [ord("e"), 256]
    assert tok.encode(" world").tolist() == [256 + 6, ord("r"), ord("l"), ord("d")]
    assert tok.encode("hello world").tolist() == [256 + 4, 256 + 6, ord("r"), ord("l"), ord("d")]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_missing_bpe_files_say_how_to_fetch(tmp_path):
    with pytest.raises(DataError, match="nlgraph data fetch") as e:
        get_tokenizer("gpt2", cache=tmp_path)
    assert e.value.path == "tokenizer" and "\n" not in e.value.render()


def test_unknown_tokenizer_suggests_one():
    with pytest.raises(DataError, match="unknown tokenizer 'gtp2'; did you mean 'gpt2'"):
        get_tokenizer("gtp2")


def test_check_vocab():
    check_vocab(256, ByteTokenizer())
    check_vocab(512, ByteTokenizer())  # a larger model vocab is allowed
    with pytest.raises(DataError) as e:
        check_vocab(128, ByteTokenizer(), file="specs/x.yaml")
    line = e.value.render()
    assert line.startswith("specs/x.yaml: model.vocab: ") and "256" in line and "128" in line


# --------------------------------------------------------------------------- real GPT-2 files (extra)

_HAVE_GPT2 = (tokenizer_dir() / "vocab.bpe").is_file() and (tokenizer_dir() / "encoder.json").is_file()
needs_gpt2 = pytest.mark.skipif(not _HAVE_GPT2, reason="extra: needs the GPT-2 files in the cache (nlgraph data fetch)")


@needs_gpt2
@pytest.mark.parametrize("backend", ["python", "tiktoken"])
def test_gpt2_known_ids(backend):
    if backend == "tiktoken":
        pytest.importorskip("tiktoken", reason="extra: tiktoken not installed")
    tok = GPT2Tokenizer(tokenizer_dir(), backend=backend)
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world, the quick brown fox.").tolist() == [15496, 995, 11, 262, 2068, 7586, 21831, 13]
    assert 50256 not in tok.encode("<|endoftext|>").tolist()  # special tokens are plain text
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([15496, 50257 + 5]) == "Hello\ufffd"


@needs_gpt2
def test_python_bpe_equals_tiktoken():
    pytest.importorskip("tiktoken", reason="extra: tiktoken not installed")
    py = GPT2Tokenizer(tokenizer_dir(), backend="python")
    tt = GPT2Tokenizer(tokenizer_dir(), backend="tiktoken")
    rng = np.random.default_rng(1)
    words = ["the", " The", "  ", "\n", "'s", "'ll", "ing", "123", "4.5", "é", "日本", "🤖", "!!", " --", "\t"]
    for _ in range(200):
        s = "".join(rng.choice(words, size=int(rng.integers(1, 25))))
        assert py.encode(s).tolist() == tt.encode(s).tolist(), repr(s)
