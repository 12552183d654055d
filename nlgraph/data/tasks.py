"""Synthetic tasks generated in code: MQAR (Zoology), S-NIAH-1 (RULER) and formal languages.

Every generator returns ``(inputs, targets)``, both ``LongTensor[B, T]``, where ``targets[b, t]`` is
the token the model must output at position ``t`` (after reading ``inputs[b, :t + 1]``) and
``-100`` where nothing is scored, so ``F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
ignore_index=-100)`` is the training loss. ``seed`` is an int, a ``numpy.random.Generator`` or a
``torch.Generator``; the same int gives the same batch on every platform.

:data:`TASKS` names each task with its documented default settings; :class:`TaskBatcher` draws
per-step batches from a task with the same resume / rank-sharding contract as
:class:`nlgraph.data.TokenBatcher`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DataError, did_you_mean
from .batching import step_seed

__all__ = [
    "FORMAL_LANGUAGES",
    "TASKS",
    "Task",
    "TaskBatcher",
    "formal",
    "get_task",
    "mqar",
    "niah",
    "sequence_accuracy",
    "token_accuracy",
]

IGNORE = -100


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=seed).item()))
    return np.random.default_rng(int(seed))


def _bad(task: str, arg: str, message: str) -> DataError:
    return DataError(f"{task}: {arg} {message}", path=arg)


def _sample_without_replacement(rng: np.random.Generator, logw: np.ndarray, k: int) -> np.ndarray:
    """Per row, ``k`` distinct indices drawn one after another with probability proportional to
    ``exp(logw)`` among those not yet drawn — what ``np.random.choice(n, k, replace=False, p=w)``
    does — vectorised with the Gumbel-top-k trick: ``int64[B, k]`` in draw order."""
    scores = logw + rng.gumbel(size=logw.shape)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


# --------------------------------------------------------------------------- MQAR

_MQAR_CHUNK = 1024


def mqar(batch: int, seq_len: int, num_kv_pairs: int, vocab_size: int, *, seed, power_a: float = 0.01,
         random_non_queries: bool = True, phase: int = 0, phases: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall, as ``zoology/data/multiquery_ar.py`` (Arora et al., 2024).

    Each row starts with ``num_kv_pairs`` pairs ``k1 v1 k2 v2 ...``: keys distinct, from
    ``[1, vocab_size // 2)``; values distinct, from ``[vocab_size // 2, vocab_size)``. In the rest of
    the row (the query region, starting at ``2 * num_kv_pairs``) every key appears once more, at
    even offsets ``2 g`` with the gaps ``g`` drawn without replacement from ``p(g) ∝ (g + 1) **
    (power_a - 1)`` over ``[0, (seq_len - 2 num_kv_pairs) // 2)`` (most gaps short, a long tail). The
    target at a repeated key's position is its paired value; every other target is -100. The other
    positions of the query region are 0, or uniform random tokens of ``[0, vocab_size)`` with
    ``random_non_queries`` (Zoology's default; random tokens may then repeat a key).

    Class-incremental phases (evaluation.md §1.4): with ``phases = P``, phase ``p`` (``0 <= p < P``)
    draws its keys from the ``p``-th of ``P`` equal, disjoint slices of the key range and its values
    from the ``p``-th slice of the value range, so every phase has a vocabulary of pairs of its own;
    the filler stays uniform over the whole vocabulary.

    Returns ``(inputs, targets)``: ``LongTensor[batch, seq_len]`` each.
    Requires ``seq_len`` even, ``vocab_size > seq_len`` and ``4 num_kv_pairs <= seq_len``.
    """
    if seq_len % 2:
        raise _bad("mqar", "seq_len", f"must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise _bad("mqar", "vocab_size", f"must exceed seq_len ({seq_len}), got {vocab_size}")
    if num_kv_pairs < 1 or 4 * num_kv_pairs > seq_len:
        raise _bad("mqar", "num_kv_pairs", f"must be in [1, seq_len / 4 = {seq_len // 4}], got {num_kv_pairs}")
    half = vocab_size // 2
    if phases < 1 or not 0 <= phase < phases:
        raise _bad("mqar", "phase", f"must be in [0, phases = {phases}), got {phase}")
    key_w, value_w = (half - 1) // phases, (vocab_size - half) // phases
    if num_kv_pairs > min(key_w, value_w):
        raise _bad("mqar", "phases", f"{phases} phases leave {min(key_w, value_w)} keys or values per phase, "
                                     f"fewer than num_kv_pairs = {num_kv_pairs}; use fewer phases or a larger "
                                     f"vocab_size")
    rng = _rng(seed)
    if batch > _MQAR_CHUNK:
        # rows in chunks, one generator: the key draws hold batch x vocab/2 floats at a time
        parts = [mqar(min(_MQAR_CHUNK, batch - i), seq_len, num_kv_pairs, vocab_size, seed=rng,
                      power_a=power_a, random_non_queries=random_non_queries, phase=phase, phases=phases)
                 for i in range(0, batch, _MQAR_CHUNK)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    k, ctx = num_kv_pairs, 2 * num_kv_pairs
    if phases == 1:  # the whole ranges, as Zoology draws them
        key_w, value_w = half - 1, vocab_size - half
    keys = 1 + phase * key_w + _sample_without_replacement(rng, np.zeros((batch, key_w)), k)
    values = half + phase * value_w + _sample_without_replacement(rng, np.zeros((batch, value_w)), k)
    space = (seq_len - ctx) // 2
    logp = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    gaps = _sample_without_replacement(rng, np.broadcast_to(logp, (batch, space)), k)

    tokens = np.zeros((batch, seq_len + 1), dtype=np.int64)
    tokens[:, 0:ctx:2] = keys
    tokens[:, 1:ctx:2] = values
    np.put_along_axis(tokens, ctx + 2 * gaps, keys, axis=1)
    labels = np.full((batch, seq_len + 1), IGNORE, dtype=np.int64)
    np.put_along_axis(labels, ctx + 2 * gaps + 1, values, axis=1)
    inputs, targets = tokens[:, :-1], labels[:, 1:].copy()
    if random_non_queries:
        # keys are >= 1 and values >= vocab_size // 2, so the zeros are exactly the filler
        filler = inputs == 0
        inputs = np.where(filler, rng.integers(0, vocab_size, size=inputs.shape), inputs)
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(targets)


# --------------------------------------------------------------------------- S-NIAH-1

# RULER's S-NIAH-1 ("pass-key") haystack, one sentence per unit so needles land between sentences
NIAH_HAYSTACK = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                 "There and back again.")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUERY = "\nWhat is the special magic number for {key}? The special magic number for {key} is: "
# RULER draws "adjective-noun" keys from the wonderwords lists; a fixed list keeps this offline
_ADJECTIVES = ("ancient", "bitter", "brave", "bright", "calm", "clever", "cold", "curious", "damp",
               "eager", "early", "faint", "fierce", "gentle", "golden", "hollow", "humble", "icy",
               "jolly", "kind", "late", "lazy", "loud", "lucky", "mellow", "narrow", "noble", "odd",
               "pale", "proud", "quick", "quiet", "rapid", "rough", "shy", "silent", "sleepy", "small",
               "steady", "swift", "tall", "tender", "vast", "warm", "wild", "wise", "young", "zealous")
_NOUNS = ("anchor", "apple", "badger", "basket", "beacon", "bridge", "candle", "canyon", "castle",
          "cedar", "comet", "copper", "desert", "dragon", "falcon", "feather", "forest", "garden",
          "glacier", "harbor", "helmet", "island", "jacket", "kettle", "lantern", "meadow", "mirror",
          "needle", "oyster", "pebble", "pepper", "planet", "quartz", "rabbit", "river", "saddle",
          "shadow", "spider", "summit", "thunder", "tiger", "tunnel", "valley", "violin", "walrus",
          "willow", "window", "zephyr")
NIAH_DEPTHS = np.linspace(0.0, 1.0, 40)
"""RULER's 40 needle depths (fractions of the haystack)."""


def niah(batch: int, seq_len: int, *, seed, depth: float | None = None, tokenizer="byte",
         digits: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Single needle in a haystack, RULER's S-NIAH-1 (noise haystack, word key, number value),
    trained as supervised retrieval on the template.

    Each row's text is ``haystack[:d] + needle + haystack[d:] + query + value``: the haystack repeats
    RULER's five noise sentences (starting at a random one), the needle is "One of the special
    magic numbers for {key} is: {value}." inserted at the sentence boundary nearest to depth ``d``
    (a fraction of the haystack; ``None`` draws one of RULER's 40 depths per row), and the query is
    "What is the special magic number for {key}? The special magic number for {key} is: ". ``key``
    is an adjective-noun pair, ``value`` a ``digits``-digit number. The haystack is cut from its
    start (which may leave it starting mid-sentence) so that the row holds exactly ``seq_len + 1``
    tokens; inputs are its first ``seq_len`` tokens.
    Targets are the value's tokens, at the positions that predict them; everything else is -100.

    ``tokenizer``: a :class:`nlgraph.data.Tokenizer` or its name (default byte-level). Pieces are
    tokenized separately and concatenated. Returns ``LongTensor[batch, seq_len]`` twice.
    """
    from .tokenizers import Tokenizer, get_tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else get_tokenizer(tokenizer)
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise _bad("niah", "depth", f"must be in [0, 1], got {depth}")
    if digits < 1:
        raise _bad("niah", "digits", f"must be at least 1, got {digits}")
    rng = _rng(seed)
    enc = lambda s: tok.encode(s).tolist()  # noqa: E731
    units = [enc(" " + s) for s in NIAH_HAYSTACK]
    inputs = np.zeros((batch, seq_len), dtype=np.int64)
    targets = np.full((batch, seq_len), IGNORE, dtype=np.int64)
    for b in range(batch):
        key = f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"
        value = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        needle = enc(" " + NIAH_NEEDLE.format(key=key, value=value))
        query = enc(NIAH_QUERY.format(key=key))
        answer = enc(value)
        fill = seq_len + 1 - len(needle) - len(query) - len(answer)
        if fill < 0:
            raise _bad("niah", "seq_len", f"{seq_len} is too short for the needle, query and answer "
                       f"({seq_len + 1 - fill} tokens with the {tok.name} tokenizer); use seq_len >= "
                       f"{seq_len - fill + 16}")
        # haystack: whole sentences from a random start, then cut from the front to `fill` tokens
        hay: list[int] = []
        bounds = [0]
        u = int(rng.integers(len(units)))
        while len(hay) < fill:
            hay += units[u % len(units)]
            bounds.append(len(hay))
            u += 1
        cut = len(hay) - fill
        hay = hay[cut:]
        # the front is mid-sentence after a cut, so it is no place for the needle
        bounds = ([0] if cut == 0 else []) + [x - cut for x in bounds if x - cut > 0]
        d = float(NIAH_DEPTHS[rng.integers(len(NIAH_DEPTHS))]) if depth is None else depth
        at = min(bounds, key=lambda x: (abs(x - d * fill), x))
        row = hay[:at] + needle + hay[at:] + query + answer
        inputs[b] = row[:-1]
        start = len(row) - len(answer)  # first answer token; predicted at the position before it
        targets[b, start - 1:] = answer
    return torch.from_numpy(inputs), torch.from_numpy(targets)


# --------------------------------------------------------------------------- formal languages

PAD = ord("_")


@dataclass(frozen=True)
class _Language:
    name: str
    alphabet: str
    labels: dict[str, str]  # label token -> the set of symbols that may follow ("$" = end)
    doc: str
    period: int = 1  # string lengths are multiples of this


FORMAL_LANGUAGES: dict[str, _Language] = {
    "parity": _Language("parity", "01", {"E": "{0,1,$}", "O": "{0,1}"},
                        "bit strings with an even number of 1s; input: uniform random bits; label "
                        "'E' when the prefix has an even number of 1s (the string may end), else 'O'"),
    "aa_star": _Language("aa_star", "a", {"E": "{a,$}", "O": "{a}"},
                         "(aa)*; input: a^n; label 'E' when the prefix has even length, else 'O'", 2),
    "abab_star": _Language("abab_star", "ab", {"A": "{a}", "B": "{b}", "E": "{a,$}"},
                           "(abab)*; input: (abab)^k; label 'E' after each whole abab (may end), "
                           "else the forced next symbol 'A' or 'B'", 4),
    "anbn": _Language("anbn", "ab", {"A": "{a,b}", "B": "{b}", "E": "{$}"},
                      "a^n b^n (n >= 1); input: one string of the language; label 'A' while reading "
                      "a's, 'B' while more b's are owed, 'E' when the counts match (must end)", 2),
    "anbncn": _Language("anbncn", "abc", {"A": "{a,b}", "B": "{b}", "C": "{c}", "E": "{$}"},
                        "a^n b^n c^n (n >= 1); input: one string of the language; label 'A' while "
                        "reading a's, 'B' while b's are owed, 'C' while c's are owed, 'E' at the end", 3),
    "dyck1": _Language("dyck1", "()", {"B": "{(,$}", "U": "{(,)}"},
                       "balanced parentheses (Dyck-1); input: one word of the language (a random "
                       "walk kept >= 0 that returns to 0); label 'B' when the prefix is balanced, "
                       "else 'U'", 2),
}
"""The formal languages of :func:`formal`: each label names the set of symbols that may follow."""


def formal(language: str, batch: int, length: int, *, seed, min_length: int | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Formal-language recognition as character prediction (Bhattamishra et al., 2020; the setting
    Irie et al. 2023 and the Nested Learning paper report), one label per position.

    Each row holds one string of the language of length ``n`` drawn uniformly from the lengths the
    language has in ``[min_length, length]`` (``min_length`` defaults to 1; multiples of 2 for
    ``aa_star``, ``anbn``, ``dyck1``, of 4 for ``abab_star``, of 3 for ``anbncn``), then ``'_'``
    padding. The target at position ``t < n`` is a label token naming the
    set of symbols that may follow the prefix ``x[:t + 1]`` in a string of the language (``$`` =
    the string may end) — always determined by the prefix; targets on padding are -100. Score a
    string as correct only when all its labels are (:func:`sequence_accuracy`); train on short
    strings and test on longer ones (``min_length``) for length generalisation.

    ========== =============== =================================================
    language   symbols          labels
    ========== =============== =================================================
    parity     ``0 1``          ``E`` even number of 1s so far, ``O`` odd
    aa_star    ``a``            ``E`` even length so far, ``O`` odd
    abab_star  ``a b``          ``E`` after a whole ``abab``, else ``A``/``B`` (forced)
    anbn       ``a b``          ``A`` in the a's, ``B`` b's still owed, ``E`` done
    anbncn     ``a b c``        ``A`` in the a's, ``B``/``C`` b's/c's owed, ``E`` done
    dyck1      ``( )``          ``B`` balanced so far, ``U`` open brackets remain
    ========== =============== =================================================

    Tokens are ASCII codes (the byte tokenizer's ids), so the model needs ``vocab >= 128``.
    Returns ``LongTensor[batch, length]`` twice.
    """
    if language not in FORMAL_LANGUAGES:
        raise _bad("formal", "language", f"'{language}' is unknown{did_you_mean(language, FORMAL_LANGUAGES)}; "
                   f"use one of {', '.join(FORMAL_LANGUAGES)}")
    m = FORMAL_LANGUAGES[language].period
    lo = 1 if min_length is None else min_length
    lo_n, hi_n = -(-max(lo, 1) // m), length // m  # string lengths m * [lo_n, hi_n]
    if lo < 1 or lo_n > hi_n:
        raise _bad("formal", "min_length", f"must be in [1, length={length}] with a length of the form "
                   f"{m}k inside [min_length, length], got min_length={min_length}")
    rng = _rng(seed)
    n = m * rng.integers(lo_n, hi_n + 1, size=batch)
    pos = np.arange(length)[None, :]
    live = pos < n[:, None]
    x = np.full((batch, length), PAD, dtype=np.int64)
    y = np.full((batch, length), IGNORE, dtype=np.int64)
    if language == "parity":
        bits = rng.integers(0, 2, size=(batch, length))
        x = np.where(live, ord("0") + bits, PAD)
        lab = np.where(np.cumsum(bits, axis=1) % 2 == 0, ord("E"), ord("O"))
    elif language == "aa_star":
        x = np.where(live, ord("a"), PAD)
        lab = np.where((pos + 1) % 2 == 0, ord("E"), ord("O")).repeat(batch, axis=0)
    elif language == "abab_star":
        x = np.where(live, np.where(pos % 2 == 0, ord("a"), ord("b")), PAD)
        lab = np.where((pos + 1) % 4 == 0, ord("E"), np.where((pos + 1) % 2 == 0, ord("A"), ord("B")))
        lab = lab.repeat(batch, axis=0)
    elif language == "anbn":
        half = (n // 2)[:, None]
        x = np.where(pos < half, ord("a"), np.where(live, ord("b"), PAD))
        lab = np.where(pos < half, ord("A"), np.where(pos < 2 * half - 1, ord("B"), ord("E")))
    elif language == "anbncn":
        k = (n // 3)[:, None]
        x = np.where(pos < k, ord("a"), np.where(pos < 2 * k, ord("b"), np.where(live, ord("c"), PAD)))
        lab = np.where(pos < k, ord("A"), np.where(pos < 2 * k - 1, ord("B"),
                                                   np.where(pos < 3 * k - 1, ord("C"), ord("E"))))
    else:  # dyck1: a uniform step while both moves keep a completable word, forced otherwise
        depth = np.zeros(batch, dtype=np.int64)
        steps = np.zeros((batch, length), dtype=np.int64)
        coin = rng.integers(0, 2, size=(batch, length)) * 2 - 1
        for t in range(length):
            remaining = n - t
            step = np.where(depth == 0, 1, np.where(depth >= remaining, -1, coin[:, t]))
            steps[:, t] = step
            depth = depth + np.where(t < n, step, 0)
        x = np.where(live, np.where(steps > 0, ord("("), ord(")")), PAD)
        lab = np.where(np.cumsum(np.where(live, steps, 0), axis=1) == 0, ord("B"), ord("U"))
    y = np.where(live, lab, IGNORE)
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))


# --------------------------------------------------------------------------- metrics


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row accuracy over the scored positions (Zoology's MQAR metric before the mean):
    ``logits [B, T, V]``, ``targets [B, T]`` -> ``float[B]`` (rows with nothing scored give NaN)."""
    mask = targets != IGNORE
    hit = (logits.argmax(-1) == targets) & mask
    return hit.sum(1).float() / mask.sum(1).float()


def sequence_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row exact match: 1 when every scored position is right, else 0. ``logits [B, T, V]``,
    ``targets [B, T]`` -> ``float[B]``."""
    mask = targets != IGNORE
    wrong = (logits.argmax(-1) != targets) & mask
    return (~wrong.any(1)).float()


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Task:
    """A named synthetic task with its default settings.

    ``generate(batch, seed=..., **overrides)`` returns ``(inputs, targets)`` (``LongTensor[B, T]``
    each, ``T = length``); any default can be overridden by name. ``vocab_needed(**overrides)`` is
    the smallest model vocab that holds every token the task produces. ``metric`` names the
    per-row accuracy that the papers report (``"token"``: mean over scored positions; ``"sequence"``:
    every scored position right).
    """

    name: str
    description: str
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    defaults: dict = field(default_factory=dict)
    metric: str = "token"

    def settings(self, **overrides) -> dict:
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise _bad(self.name, unknown[0], f"is not a setting of this task"
                       f"{did_you_mean(unknown[0], self.defaults)}; its settings are "
                       f"{', '.join(self.defaults)}")
        return {**self.defaults, **overrides}

    def generate(self, batch: int, *, seed, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(batch, seed=seed, **self.settings(**overrides))

    def vocab_needed(self, **overrides) -> int:
        s = self.settings(**overrides)
        if self.name == "mqar":
            return int(s["vocab_size"])
        if self.name == "niah":
            from .tokenizers import Tokenizer, get_tokenizer

            tok = s["tokenizer"]
            return (tok if isinstance(tok, Tokenizer) else get_tokenizer(tok)).vocab_size
        return 128


def _mqar(batch, *, seed, length, num_kv_pairs, vocab_size, power_a, random_non_queries, phase, phases):
    return mqar(batch, length, num_kv_pairs, vocab_size, seed=seed, power_a=power_a,
                random_non_queries=random_non_queries, phase=phase, phases=phases)


def _niah(batch, *, seed, length, depth, tokenizer, digits):
    return niah(batch, length, seed=seed, depth=depth, tokenizer=tokenizer, digits=digits)


def _formal(language):
    def gen(batch, *, seed, length, min_length):
        return formal(language, batch, length, seed=seed, min_length=min_length)

    return gen


TASKS: dict[str, Task] = {
    "mqar": Task("mqar", "multi-query associative recall (Zoology); accuracy at the query positions",
                 _mqar, {"length": 64, "num_kv_pairs": 4, "vocab_size": 8192, "power_a": 0.01,
                         "random_non_queries": True, "phase": 0, "phases": 1}),
    "niah": Task("niah", "single needle in a haystack, RULER S-NIAH-1 (noise haystack, 7-digit value)",
                 _niah, {"length": 512, "depth": None, "tokenizer": "byte", "digits": 7}, "sequence"),
    **{name: Task(name, f"formal language {name}: {lang.doc}", _formal(name),
                  {"length": 50, "min_length": 1}, "sequence")
       for name, lang in FORMAL_LANGUAGES.items()},
}
"""Task name -> :class:`Task`. Defaults: MQAR at Zoology's smallest Figure-2 setting (seq 64, 4
pairs, vocab 8192); S-NIAH-1 at 512 byte tokens; formal languages at Bhattamishra et al.'s training
lengths 1-50 (test length generalisation with ``length=100, min_length=51``)."""


def get_task(name: str) -> Task:
    """The task called ``name``; :class:`DataError` naming the choices otherwise."""
    if name not in TASKS:
        raise DataError(f"unknown task '{name}'{did_you_mean(name, TASKS)}; use one of "
                        f"{', '.join(TASKS)} (or no --task for the corpus)", path="task")
    return TASKS[name]


class TaskBatcher:
    """Per-step batches of a synthetic task: step ``s`` generates the global batch (``batch *
    world`` rows) from ``step_seed(seed, s)`` and rank ``r`` keeps rows ``[r * batch, (r + 1) *
    batch)`` — the :class:`nlgraph.data.TokenBatcher` contract (exact resume from
    :meth:`state_dict`; ranks concatenate to the ``world = 1`` batch).

    ``next()`` returns ``(inputs, targets)``, ``LongTensor[batch, length]`` each.
    """

    def __init__(self, task: Task | str, batch: int, *, seed: int, rank: int = 0, world: int = 1,
                 **settings) -> None:
        self.task = get_task(task) if isinstance(task, str) else task
        if batch < 1:
            raise DataError(f"batch must be at least 1, got {batch}", path="batch")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is outside [0, world={world})", path="rank")
        self.settings = self.task.settings(**settings)
        self.batch, self.seed, self.rank, self.world = batch, int(seed), rank, world
        self.step = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.task.generate(self.batch * self.world, seed=step_seed(self.seed, self.step),
                                  **self.settings)
        self.step += 1
        rows = slice(self.rank * self.batch, (self.rank + 1) * self.batch)
        return x[rows].contiguous(), y[rows].contiguous()

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        settings = {k: v for k, v in self.settings.items() if isinstance(v, (int, float, str, bool, type(None)))}
        return {"step": self.step, "seed": self.seed, "global_batch": self.batch * self.world,
                "task": self.task.name, "settings": settings}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "global_batch", "task", "settings"):
            if key in state and state[key] != mine[key]:
                raise DataError(f"the saved data position was drawn with {key}={state[key]}, this run "
                                f"has {key}={mine[key]}; resume with the same settings", path=key)
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise DataError(f"the saved data position has no valid step ({step!r})", path="step")
        self.step = step
