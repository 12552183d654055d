"""Lowering backends, installed as ``nlgraph.compilers``.

A backend provides *execution forms* for level kinds: the per-token ``reference`` form (the
definition, float64-capable), ``chunked`` parallel forms, and later GPU kernels. Forms register
here under a family name; the compiler asks :func:`select_form` for the best form that supports a
level on a device and dtype, so a new backend plugs in without touching the rest of the pipeline:
the Triton kernels (``nlgraph.compilers.kernels.forms``) are registered here like any other form.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Form", "find_form", "forms", "register_form", "select_form"]


@dataclass(frozen=True)
class Form:
    """One way to execute a family of levels.

    Attributes:
        family: the level family it implements (``delta_rule``, ``deep_memory``, ...).
        name: the form's name (``reference``, ``chunked``, ``triton``, ...).
        priority: higher wins when several forms support a level.
        supports: ``supports(level_spec, device, dtype, head_dim=None) -> str | None``; ``None``
            means supported, a string says why not (shown to the user when no form applies).
            ``device`` is a device type (``"cpu"``, ``"cuda"``); ``dtype`` the parameters'
            ``torch.dtype``, or ``None`` when the caller does not know it (then any dtype the form
            could take); ``head_dim`` the width of the level's keys per head where the caller knows
            it (the plan, from the level graph; a run, from its tensors), for a form whose kernel
            takes only some widths.
        run: the callable that executes the level.
        options: the keyword options ``run`` takes beyond the level (``chunk_size`` for chunked
            forms), read off its signature once at registration.
        fallback: the form of the same family that runs instead when this one is asked for by name
            (a model's plan) on tensors it does not support, e.g. a model planned for CUDA given
            CPU tensors, or kernels switched off after it was built (``None``: such a call is an
            error). It must compute the same function.
        compiles: whether ``torch.compile`` traces the form. A form measured slower under inductor
            than eager registers ``False``: its ``run`` is then wrapped in
            ``torch.compiler.disable``, so a compiled block runs the level eagerly between the
            compiled graphs around it (the plan shows it, and :meth:`NLModel.compile_blocks`
            compiles such a block without ``fullgraph``): compiling never makes that level slower.
        describe: ``describe(level, device) -> str | None``, a note the plan adds to the form's
            label for a level on a device type (e.g. which part of it a kernel runs), or ``None``.
    """

    family: str
    name: str
    priority: int
    supports: Callable[..., str | None]
    run: Callable[..., Any]
    options: frozenset[str] = frozenset()
    fallback: str | None = None
    compiles: bool = True
    describe: Callable[[Any, str], str | None] | None = None


_REGISTRY: dict[str, dict[str, Form]] = {}


def register_form(
    family: str, name: str, *, priority: int = 0, supports: Callable[..., str | None] | None = None,
    fallback: str | None = None, compiles: bool = True, describe: Callable[[Any, str], str | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as form ``name`` of ``family``. Registering the same
    (family, name) twice is an error, so two backends cannot silently shadow each other.
    ``compiles=False``: ``torch.compile`` runs the form eagerly (:attr:`Form.compiles`); ``describe``:
    a note on a level for the plan's label (:attr:`Form.describe`).

    ``supports`` is ``(level, device, dtype, head_dim=None) -> str | None``, or ``(level, device,
    dtype)`` for a form that takes every head width, or ``(level, device)`` for one that also takes
    every dtype."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        table = _REGISTRY.setdefault(family, {})
        if name in table:
            raise ValueError(f"form '{name}' of family '{family}' is already registered")
        params = inspect.signature(fn).parameters
        run = fn
        if not compiles:
            import torch

            run = torch.compiler.disable(fn)
        table[name] = Form(family, name, priority, _adapt_supports(supports), run, frozenset(list(params)[1:]),
                           fallback, compiles, describe)
        return fn

    return deco


def _adapt_supports(supports: Callable[..., str | None] | None) -> Callable[..., str | None]:
    """``supports`` as ``(level, device, dtype=None, head_dim=None)``: ``dtype`` goes to a third
    positional parameter, ``head_dim`` to a parameter of that name (or ``**kwargs``), and a form
    that takes neither is asked without them."""
    if supports is None:
        return lambda level, device, dtype=None, head_dim=None: None
    params = inspect.signature(supports).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_dtype = len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
    dtype_by_name = not takes_dtype and any(p.name == "dtype" and p.kind == p.KEYWORD_ONLY for p in params)
    takes_head_dim = any((p.name == "head_dim" and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD
                         for p in params)

    def ask(level: Any, device: str, dtype: Any = None, head_dim: int | None = None) -> str | None:
        args = (level, device, dtype) if takes_dtype else (level, device)
        kwargs = {"dtype": dtype} if dtype_by_name else {}
        if takes_head_dim:
            kwargs["head_dim"] = head_dim
        return supports(*args, **kwargs)

    return ask


def find_form(family: str, name: str) -> Form | None:
    """The registered form ``name`` of ``family``, or ``None``."""
    return _REGISTRY.get(family, {}).get(name)


def forms(family: str) -> list[Form]:
    """The registered forms of a family, best first."""
    return sorted(_REGISTRY.get(family, {}).values(), key=lambda f: (-f.priority, f.name))


def select_form(family: str, level: Any, device: str = "cpu", dtype: Any = None, *, want: str = "auto",
                fall_back: bool = False, head_dim: int | None = None) -> Form:
    """The form to run ``level`` with on ``device`` (a device type) in ``dtype`` (a ``torch.dtype``,
    or ``None``: not known) at ``head_dim`` (the keys' width per head, ``None``: not known):
    ``want`` by name, or the best supported one for ``auto``. With
    ``fall_back``, a named form that refuses hands over to its :attr:`Form.fallback` (run time: the
    plan chose it for another target); a plan never falls back.

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
        why = match[0].supports(level, device, dtype, head_dim=head_dim)
        if why is not None and fall_back and match[0].fallback is not None:
            return select_form(family, level, device, dtype, want=match[0].fallback, fall_back=True,
                               head_dim=head_dim)
        if why is not None:
            raise LookupError(f"form '{want}' cannot run this {family} level: {why}")
        return match[0]
    reasons = []
    for f in candidates:
        why = f.supports(level, device, dtype, head_dim=head_dim)
        if why is None:
            return f
        reasons.append(f"{f.name}: {why}")
    raise LookupError(f"no form of '{family}' can run this level ({'; '.join(reasons)})")
