"""Lowering backends, installed as ``nlgraph.compilers``.

A backend provides *execution forms* for level kinds: the per-token ``reference`` form (the
definition, float64-capable), ``chunked`` parallel forms, and later GPU kernels. Forms register
here under a family name; the compiler asks :func:`select_form` for the best form that supports a
level, so a new backend plugs in without touching the rest of the pipeline.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Form", "forms", "register_form", "select_form"]


@dataclass(frozen=True)
class Form:
    """One way to execute a family of levels.

    Attributes:
        family: the level family it implements (``delta_rule``, ``deep_memory``, ...).
        name: the form's name (``reference``, ``chunked``, ``triton``, ...).
        priority: higher wins when several forms support a level.
        supports: ``supports(level_spec, device) -> str | None``; ``None`` means supported, a
            string says why not (shown to the user when no form applies).
        run: the callable that executes the level.
        options: the keyword options ``run`` takes beyond the level (``chunk_size`` for chunked
            forms), read off its signature once at registration.
    """

    family: str
    name: str
    priority: int
    supports: Callable[[Any, str], str | None]
    run: Callable[..., Any]
    options: frozenset[str] = frozenset()


_REGISTRY: dict[str, dict[str, Form]] = {}


def register_form(
    family: str, name: str, *, priority: int = 0, supports: Callable[[Any, str], str | None] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as form ``name`` of ``family``. Registering the same
    (family, name) twice is an error, so two backends cannot silently shadow each other."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        table = _REGISTRY.setdefault(family, {})
        if name in table:
            raise ValueError(f"form '{name}' of family '{family}' is already registered")
        params = inspect.signature(fn).parameters
        table[name] = Form(family, name, priority, supports or (lambda level, device: None), fn,
                           frozenset(list(params)[1:]))
        return fn

    return deco


def forms(family: str) -> list[Form]:
    """The registered forms of a family, best first."""
    return sorted(_REGISTRY.get(family, {}).values(), key=lambda f: (-f.priority, f.name))


def select_form(family: str, level: Any, device: str = "cpu", *, want: str = "auto") -> Form:
    """The form to run ``level`` with: ``want`` by name, or the best supported one for ``auto``.

    Raises:
        LookupError: no form of that name / none supports the level; the message lists why each
            candidate refused.
    """
    candidates = forms(family)
    if not candidates:
        raise LookupError(f"no execution form is registered for level family '{family}'")
    if want != "auto":
        match = [f for f in candidates if f.name == want]
        if not match:
            names = ", ".join(f.name for f in candidates)
            raise LookupError(f"family '{family}' has no form '{want}' (available: {names})")
        why = match[0].supports(level, device)
        if why is not None:
            raise LookupError(f"form '{want}' cannot run this {family} level: {why}")
        return match[0]
    reasons = []
    for f in candidates:
        why = f.supports(level, device)
        if why is None:
            return f
        reasons.append(f"{f.name}: {why}")
    raise LookupError(f"no form of '{family}' can run this level ({'; '.join(reasons)})")
