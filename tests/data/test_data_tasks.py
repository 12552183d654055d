"""Synthetic tasks against their definitions: MQAR (Zoology), S-NIAH-1 (RULER), formal languages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nlgraph.data import (FORMAL_LANGUAGES, TASKS, TaskBatcher, formal, get_task, get_tokenizer, mqar, niah,
                          sequence_accuracy, token_accuracy, tokenizer_dir)
from nlgraph.data.tasks import NIAH_HAYSTACK, NIAH_NEEDLE, NIAH_QUERY, _sample_without_replacement
from nlgraph.errors import DataError

# --------------------------------------------------------------------------- MQAR


def check_mqar(x, y, seq_len, k, vocab, random_non_queries):
    """Zoology's definition, row by row, in plain Python."""
    half = vocab // 2
    assert x.shape == y.shape == (x.shape[0], seq_len)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0:2 * k:2], row_x[1:2 * k:2]
        assert len(set(keys)) == k and all(1 <= key < half for key in keys)
        assert len(set(values)) == k and all(half <= v < vocab for v in values)
        pair = dict(zip(keys, values))
        assert all(t == -100 for t in row_y[:2 * k])
        scored = [t for t in range(seq_len) if row_y[t] != -100]
        assert len(scored) == k
        # each scored position holds a distinct key at an even offset of the query region, and its
        # target is that key's value
        assert sorted(row_x[t] for t in scored) == sorted(keys)
        for t in scored:
            assert (t - 2 * k) % 2 == 0 and row_y[t] == pair[row_x[t]]
        if not random_non_queries:
            query = row_x[2 * k:]
            assert sorted(q for q in query if q) == sorted(keys)  # every key once, zeros elsewhere
            assert all(row_x[t] == 0 for t in range(2 * k, seq_len) if t not in scored)
        assert all(0 <= v < vocab for v in row_x)


@pytest.mark.parametrize("seq_len,k,vocab", [(64, 4, 8192), (32, 8, 40), (128, 16, 256)])
@pytest.mark.parametrize("random_non_queries", [False, True])
def test_mqar_matches_its_definition(seq_len, k, vocab, random_non_queries):
    x, y = mqar(64, seq_len, k, vocab, seed=0, random_non_queries=random_non_queries)
    assert x.dtype == y.dtype == torch.long
    check_mqar(x, y, seq_len, k, vocab, random_non_queries)


@pytest.mark.parametrize("phases", [2, 3])
def test_mqar_phases_draw_disjoint_pairs(phases):
    """Class-incremental MQAR: each phase is MQAR by the definition, its keys and values lie in its
    own slices of the key and value ranges, and no two phases share a key or a value."""
    vocab, k = 200, 4
    half = vocab // 2
    seen = []
    for p in range(phases):
        x, y = mqar(64, 64, k, vocab, seed=p, phase=p, phases=phases, random_non_queries=False)
        check_mqar(x, y, 64, k, vocab, False)
        keys = set(x[:, 0:2 * k:2].flatten().tolist())
        values = set(x[:, 1:2 * k:2].flatten().tolist())
        kw, vw = (half - 1) // phases, (vocab - half) // phases
        assert min(keys) >= 1 + p * kw and max(keys) < 1 + (p + 1) * kw
        assert min(values) >= half + p * vw and max(values) < half + (p + 1) * vw
        assert len(keys) > kw // 2  # the slice is used, not a few tokens of it
        for other_keys, other_values in seen:
            assert not keys & other_keys and not values & other_values
        seen.append((keys, values))
    with pytest.raises(DataError, match="phase"):
        mqar(4, 64, k, vocab, seed=0, phase=phases, phases=phases)
    with pytest.raises(DataError, match="fewer than num_kv_pairs"):
        mqar(4, 64, k, vocab, seed=0, phase=0, phases=40)


def test_mqar_random_filler_only_replaces_the_zeros():
    x0, y0 = mqar(32, 64, 4, 256, seed=5, random_non_queries=False)
    x1, y1 = mqar(32, 64, 4, 256, seed=5, random_non_queries=True)
    assert torch.equal(y0, y1) and torch.equal(x1[x0 != 0], x0[x0 != 0])
    assert (x1[x0 == 0] != 0).float().mean() > 0.9


def test_mqar_seeds():
    a = mqar(8, 64, 4, 256, seed=1)
    assert torch.equal(a[0], mqar(8, 64, 4, 256, seed=1)[0])
    assert not torch.equal(a[0], mqar(8, 64, 4, 256, seed=2)[0])
    g = torch.Generator().manual_seed(3)
    check_mqar(*mqar(4, 64, 4, 256, seed=g), 64, 4, 256, True)
    check_mqar(*mqar(4, 64, 4, 256, seed=np.random.default_rng(3)), 64, 4, 256, True)


def test_mqar_large_batches_in_chunks():
    x, y = mqar(1100, 16, 2, 64, seed=0, random_non_queries=False)
    check_mqar(x, y, 16, 2, 64, False)
    assert len({tuple(r) for r in x.tolist()}) > 1000  # chunks are not copies of each other


def test_mqar_gaps_follow_zoologys_sampler():
    """The vectorised sampler against Zoology's own (np.random.choice without replacement with
    p(g) ∝ g^(a-1)): the first gap's law and every gap's inclusion probability."""
    space, k, n = 12, 4, 5000
    p = 0.01 * np.arange(1, space + 1) ** (0.01 - 1)
    p /= p.sum()
    mine = _sample_without_replacement(np.random.default_rng(0), np.broadcast_to(np.log(p), (n, space)), k)
    rs = np.random.RandomState(1)
    ref = np.stack([rs.choice(np.arange(space), size=k, replace=False, p=p) for _ in range(n)])
    assert (np.sort(mine, 1)[:, 1:] != np.sort(mine, 1)[:, :-1]).all()  # distinct gaps
    first = lambda g: np.bincount(g[:, 0], minlength=space) / n  # noqa: E731
    incl = lambda g: np.bincount(g.ravel(), minlength=space) / n  # noqa: E731
    np.testing.assert_allclose(first(mine), p, atol=0.03)
    np.testing.assert_allclose(first(mine), first(ref), atol=0.035)
    np.testing.assert_allclose(incl(mine), incl(ref), atol=0.035)


@pytest.mark.parametrize("args,arg", [((64, 63, 4, 256), "seq_len"), ((64, 64, 4, 64), "vocab_size"),
                                      ((64, 64, 17, 256), "num_kv_pairs")])
def test_mqar_constraints(args, arg):
    b, t, k, v = args
    with pytest.raises(DataError) as e:
        mqar(b, t, k, v, seed=0)
    assert e.value.path == arg


# --------------------------------------------------------------------------- S-NIAH-1


def test_niah_matches_its_definition():
    tok = get_tokenizer("byte")
    x, y = niah(16, 400, seed=0)
    assert x.shape == y.shape == (16, 400)
    for row_x, row_y in zip(x, y):
        text = tok.decode(row_x)
        answer = tok.decode(row_y[row_y != -100])
        assert len(answer) == 7 and answer.isdigit()
        key = text.split("What is the special magic number for ")[1].split("?")[0]
        assert text.count(NIAH_NEEDLE.format(key=key, value=answer)) == 1
        assert text.count("special magic numbers for") == 1
        # the row ends with the query and the answer's first digits; targets predict the answer
        tail = NIAH_QUERY.format(key=key) + answer
        assert (text + answer[-1]).endswith(tail)
        scored = (row_y != -100).nonzero().flatten().tolist()
        assert scored == list(range(400 - 7, 400))
        assert tok.decode(row_x[scored[0] + 1:]) == answer[:-1]


def test_niah_depth_places_the_needle():
    tok = get_tokenizer("byte")
    longest = max(len(s) for s in NIAH_HAYSTACK) + 1
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        text = tok.decode(niah(1, 1000, seed=3, depth=depth)[0][0])
        at = text.index(" One of the special magic numbers")
        needle = text[at:].split(".", 1)[0] + "."
        query = text[text.index("\nWhat is"):]
        fill = 1001 - len(needle) - len(query) - 1  # the haystack's length (the last digit is not input)
        assert abs(at - depth * fill) <= longest  # the sentence boundary nearest the depth
        after = text[at + len(needle):]
        assert any(after.startswith(" " + s) for s in NIAH_HAYSTACK) or after.startswith("\nWhat is")
        if depth == 0.0:
            assert at <= longest  # the first sentence boundary (the haystack may start mid-sentence)
        if depth == 1.0:
            assert text[at + len(needle):].startswith("\nWhat is")


def test_niah_refuses_a_too_short_row():
    with pytest.raises(DataError, match="too short") as e:
        niah(1, 100, seed=0)
    assert e.value.path == "seq_len"


# --------------------------------------------------------------------------- formal languages


def allowed_next(language: str, prefix: str) -> frozenset:
    """The symbols ($ = end) that may follow ``prefix`` in a string of the language, from the
    language's membership and prefix tests written directly."""

    def in_lang(s):
        if language == "parity":
            return s.count("1") % 2 == 0
        if language == "aa_star":
            return set(s) <= {"a"} and len(s) % 2 == 0
        if language == "abab_star":
            return len(s) % 4 == 0 and s == "ab" * (len(s) // 2)
        if language == "anbn":
            n = len(s) // 2
            return n >= 1 and s == "a" * n + "b" * n
        if language == "anbncn":
            n = len(s) // 3
            return n >= 1 and s == "a" * n + "b" * n + "c" * n
        depth = 0
        for c in s:
            depth += 1 if c == "(" else -1
            if depth < 0:
                return False
        return depth == 0

    def is_prefix(s):
        if language in ("parity", "aa_star"):
            return set(s) <= set(FORMAL_LANGUAGES[language].alphabet)
        if language == "abab_star":
            return s == ("ab" * len(s))[:len(s)]
        if language == "anbn":
            i = len(s) - len(s.lstrip("a"))
            rest = s[i:]
            return set(rest) <= {"b"} and len(rest) <= i
        if language == "anbncn":
            i = len(s) - len(s.lstrip("a"))
            j = len(s[i:]) - len(s[i:].lstrip("b"))
            rest = s[i + j:]
            return set(rest) <= {"c"} and j <= i and (not rest or (j == i and len(rest) <= i))
        depth = 0
        for c in s:
            depth += 1 if c == "(" else -1
            if depth < 0:
                return False
        return True

    out = {c for c in FORMAL_LANGUAGES[language].alphabet if is_prefix(prefix + c)}
    if in_lang(prefix):
        out.add("$")
    return frozenset(out)


def label_sets(language):
    return {frozenset(s.strip("{}").split(",")): lab for lab, s in FORMAL_LANGUAGES[language].labels.items()}


@pytest.mark.parametrize("language", list(FORMAL_LANGUAGES))
def test_formal_labels_are_the_sets_of_allowed_next_symbols(language):
    x, y = formal(language, 64, 40, seed=0)
    assert x.shape == y.shape == (64, 40)
    sets = label_sets(language)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        s = "".join(chr(c) for c in row_x).rstrip("_")
        n = len(s)
        assert 1 <= n <= 40 and set(s) <= set(FORMAL_LANGUAGES[language].alphabet)
        assert all(c == ord("_") for c in row_x[n:]) and all(t == -100 for t in row_y[n:])
        if language != "parity":
            assert allowed_next(language, s) >= {"$"}, s  # whole rows are strings of the language
        for t in range(n):
            assert chr(row_y[t]) == sets[allowed_next(language, s[:t + 1])], (s, t)


def test_parity_label_is_the_parity_of_the_prefix():
    x, y = formal("parity", 32, 30, seed=4)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        ones = 0
        for c, lab in zip(row_x, row_y):
            if c == ord("_"):
                break
            ones += c == ord("1")
            assert lab == (ord("E") if ones % 2 == 0 else ord("O"))


def test_dyck1_rows_are_balanced_words():
    x, y = formal("dyck1", 64, 60, seed=2)
    depths = []
    for row in x.tolist():
        d, lo = 0, 0
        for c in row:
            if c == ord("_"):
                break
            d += 1 if c == ord("(") else -1
            lo = min(lo, d)
            depths.append(d)
        assert d == 0 and lo == 0
    assert max(depths) >= 4  # not just ()()()


def test_formal_lengths_follow_min_length():
    for language in FORMAL_LANGUAGES:
        x, _ = formal(language, 200, 100, seed=1, min_length=51)
        n = (x != ord("_")).sum(1)
        assert int(n.min()) >= 51 and int(n.max()) <= 100
        assert (n % FORMAL_LANGUAGES[language].period == 0).all()
    with pytest.raises(DataError) as e:
        formal("parity", 2, 10, seed=0, min_length=11)
    assert e.value.path == "min_length"
    with pytest.raises(DataError, match="did you mean 'dyck1'"):
        formal("dyck", 2, 10, seed=0)


# --------------------------------------------------------------------------- registry, batcher, metrics


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_generates_with_its_defaults(name):
    task = get_task(name)
    overrides = {"vocab_size": 256} if name == "mqar" else {}
    x, y = task.generate(3, seed=0, **overrides)
    length = task.settings(**overrides)["length"]
    vocab = task.vocab_needed(**overrides)
    assert x.shape == y.shape == (3, length) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < vocab
    scored = y[y != -100]
    assert scored.numel() > 0 and int(scored.min()) >= 0 and int(scored.max()) < vocab
    assert task.metric in ("token", "sequence")


def test_registry_errors():
    with pytest.raises(DataError, match="did you mean 'mqar'"):
        get_task("mqr")
    with pytest.raises(DataError, match="num_kv_pair is not a setting") as e:
        get_task("mqar").generate(1, seed=0, num_kv_pair=4)
    assert e.value.path == "num_kv_pair"


def test_task_batcher_resumes_and_shards():
    full = TaskBatcher("mqar", 4, seed=9, vocab_size=256)
    ref = [full.next() for _ in range(6)]
    half = TaskBatcher("mqar", 4, seed=9, vocab_size=256)
    for _ in range(2):
        half.next()
    resumed = TaskBatcher("mqar", 4, seed=9, vocab_size=256)
    resumed.load_state_dict(json.loads(json.dumps(half.state_dict())))
    for want in ref[2:]:
        got = resumed.next()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ranks = [TaskBatcher("mqar", 2, seed=9, rank=r, world=2, vocab_size=256) for r in range(2)]
    got = [r.next() for r in ranks]
    assert torch.equal(torch.cat([g[0] for g in got]), ref[0][0])
    assert torch.equal(torch.cat([g[1] for g in got]), ref[0][1])
    other = TaskBatcher("mqar", 4, seed=9, vocab_size=512)
    with pytest.raises(DataError, match="resume with the same settings"):
        other.load_state_dict(half.state_dict())


def test_accuracies():
    targets = torch.tensor([[-100, 2, -100, 1], [0, -100, -100, 3]])
    pred = torch.tensor([[0, 2, 0, 0], [0, 1, 1, 3]])
    logits = torch.nn.functional.one_hot(pred, 4).float()
    assert token_accuracy(logits, targets).tolist() == [0.5, 1.0]
    assert sequence_accuracy(logits, targets).tolist() == [0.0, 1.0]


@pytest.mark.skipif(not (tokenizer_dir() / "vocab.bpe").is_file(),
                    reason="extra: needs the GPT-2 files in the cache (nlgraph data fetch)")
def test_niah_with_gpt2_tokens():
    tok = get_tokenizer("gpt2")
    x, y = niah(4, 200, seed=0, tokenizer=tok)
    assert x.shape == (4, 200) and int(x.max()) < tok.vocab_size
    for row_x, row_y in zip(x, y):
        answer = tok.decode(row_y[row_y != -100])
        assert len(answer) == 7 and answer.isdigit()
        assert f"is: {answer}." in tok.decode(row_x)  # the needle holds the answer
