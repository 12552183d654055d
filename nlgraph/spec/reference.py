"""Render the spec reference (docs/reference/spec.md) from the schema's own docstrings, so the
documentation cannot drift from the code. Regenerate with ``nlgraph schema --markdown --out
docs/reference/spec.md``; a test fails when the committed page is stale."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from . import schema as S

__all__ = ["render_reference"]

# (section title, models) in reading order
SECTIONS: list[tuple[str, list[type[BaseModel]]]] = [
    ("Top level", [S.Spec, S.ModelSpec]),
    ("Level entries (`levels.<name>`)", [S.LevelSpec, S.AttentionSpec, S.ChainSpec,
                                          S.LinearAttentionSpec, S.DeltaRuleSpec, S.ParallelSpec,
                                          S.MemoryContextSpec]),
    ("Memories (`memory`, `adaptive.<name>`)", [S.LinearMemorySpec, S.MlpMemorySpec, S.ResidualMlpMemorySpec]),
    ("Objectives (`objective`)", [S.DotObjectiveSpec, S.L2ObjectiveSpec, S.LpObjectiveSpec,
                                  S.HuberObjectiveSpec, S.OuterObjectiveSpec]),
    ("Inner optimizers (`optimizer`)", [S.GdSpec, S.MomentumSpec, S.DgdSpec, S.AdamSpec, S.MuonSpec,
                                        S.DeepMomentumSpec, S.OptimizerLevelSpec]),
    ("Retention, streams, gates, output", [S.RetentionSpec, S.StreamSpec, S.GateSpec, S.ChunkPointSpec,
                                           S.OutputSpec]),
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        base = args[0]
        if base == typing.Union[float, S.GateSpec] or (
            typing.get_origin(base) is typing.Union
            and any(typing.get_origin(a) is typing.Annotated and typing.get_args(a)[0] is S.GateSpec for a in typing.get_args(base))
        ):
            return "rate (number or gate)"
        return _type_name(base)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_type_name(a) for a in args if a is not type(None)]
        opt = type(None) in args
        names = []
        for p in parts:
            if p not in names:
                names.append(p)
        return " \\| ".join(names) + (" \\| null" if opt else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping name → {_type_name(args[1])}"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        kind = tp.model_fields.get("kind")
        if kind is not None and typing.get_origin(kind.annotation) is typing.Literal:
            return f"[{tp.__name__}](#{tp.__name__.lower()})"
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    if tp is int:
        return "integer"
    if tp is float:
        return "number"
    if tp is str:
        return "string"
    if tp is bool:
        return "boolean"
    if tp is typing.Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            data = value.model_dump(mode="json", by_alias=True, exclude_defaults=True)
            kind = getattr(value, "kind", None)
            return f"`{{kind: {kind}}}`" if kind else ("`{}`" if not data else f"`{data}`")
        return f"`{value!r}`" if value else "`{}`" if isinstance(value, dict) else "`[]`"
    value = field.default
    if value is PydanticUndefined:
        return ""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_reference() -> str:
    """The spec reference page as Markdown."""
    out = [
        "# Spec reference",
        "",
        "Generated from the schema (`nlgraph/spec/schema.py`) by "
        "`nlgraph schema --markdown --out docs/reference/spec.md`; do not edit by hand.",
        "",
        "Every mapping forbids unknown keys. Variants are chosen by `kind`. A *rate* is a number or "
        "a [gate](#gatespec). A *width* is an integer or a multiple of the input width such as `4x`. "
        "A *period* (`frequency`) is a number of tokens or `never`.",
        "",
    ]
    for title, models in SECTIONS:
        out += [f"## {title}", ""]
        for model in models:
            kind = model.model_fields.get("kind")
            kinds = typing.get_args(kind.annotation) if kind is not None else ()
            heading = model.__name__ + (f" (`kind: {kinds[0]}`)" if len(kinds) == 1 else "")
            out += [f"### {model.__name__}", "", f"**{heading}**. " + _cell(model.__doc__ or ""), ""]
            rows = [(n, f) for n, f in model.model_fields.items() if n != "kind" or len(kinds) > 1]
            if not rows:
                out += ["No further fields.", ""]
                continue
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
            for name, f in rows:
                key = f.alias or name
                out.append(f"| `{key}` | {_type_name(f.annotation)} | {_default(f)} | {_cell(f.description or '')} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"
