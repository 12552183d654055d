"""User-facing errors. Each renders as one line: ``FILE:LINE: YAML.PATH: what is wrong; what to do``."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = ["DataError", "GraphError", "NLGraphError", "SpecError", "did_you_mean"]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""`` when nothing is close."""
    match = difflib.get_close_matches(str(word), sorted(set(choices)), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


class NLGraphError(Exception):
    """Base of every error nlgraph reports to a user instead of a traceback.

    Attributes:
        message: what is wrong and what to do about it.
        file: the spec file (or ``None`` for in-memory specs).
        path: the dotted YAML path (``levels.mixer.memory.kind``), ``None`` for whole-file errors.
        line: 1-based line in ``file`` where ``path`` is written, when known.
        more: further problems found in the same pass (rendered as a count).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        path: str | None = None,
        line: int | None = None,
        more: Sequence[NLGraphError] = (),
    ) -> None:
        self.message = message
        self.file = file
        self.path = path
        self.line = line
        self.more = list(more)
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        path = f"{self.path}: " if self.path else ""
        tail = ""
        if self.more:
            n = len(self.more)
            tail = f" (and {n} more problem{'s' if n > 1 else ''}; `nlgraph validate --all` lists them)"
        return f"{where}{path}{self.message}{tail}"

    def all_lines(self) -> list[str]:
        """This error and every further one, each as one line."""
        first = type(self)(self.message, file=self.file, path=self.path, line=self.line)
        return [first.render()] + [e.render() for e in self.more]


class SpecError(NLGraphError):
    """A spec could not be read or does not match the schema (bad YAML, unknown key or kind,
    wrong type, bad override, failed interpolation, missing file)."""


class GraphError(NLGraphError):
    """A valid spec describes an impossible graph (unknown reference, illegal cycle, dimension
    mismatch, frequency rule). ``nodes`` names the graph nodes involved."""

    def __init__(self, message: str, *, nodes: Sequence[str] = (), **kwargs) -> None:
        self.nodes = list(nodes)
        super().__init__(message, **kwargs)


class DataError(NLGraphError):
    """A corpus, tokenizer file or data setting cannot be used (missing or unreadable corpus, vocab
    smaller than the tokenizer's, a task setting out of range). ``file`` names the data file or
    folder; ``path`` the argument or setting at fault."""
