"""Stage 1 of the pipeline: read a spec (file, library short name, dict or YAML text), compose its
includes, apply ``key=value`` overrides, resolve ``${...}`` interpolations and validate it.

Every failure is one :class:`~nlgraph.errors.SpecError` naming the file, the line, the dotted YAML
path and what to do. YAML is parsed with a safe loader only: nothing in a spec imports or executes
code.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, TypeAdapter, ValidationError

from ..errors import SpecError, did_you_mean
from .schema import LevelEntry, Spec

__all__ = [
    "SpecSource",
    "dump_spec",
    "library_specs",
    "load_level",
    "load_raw",
    "load_spec",
    "resolve_source",
    "spec_hash",
]

INCLUDE_KEY = "include"


@dataclass
class SpecSource:
    """Where a spec came from, for error messages: the main file, its YAML text, the texts of the
    files it included, and the overrides applied on top."""

    file: str | None = None
    text: str | None = None
    includes: list[tuple[str, str]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    def locate(self, path: Sequence[str | int]) -> tuple[str | None, int | None, str | None]:
        """``(file, line, override)`` for a YAML path: the override that set it, or the last file
        (main file first, then includes from the last) that writes it."""
        parts = [str(p) for p in path]
        for ov in reversed(self.overrides):
            key = ov.split("=", 1)[0].strip().split(".")
            n = min(len(key), len(parts))
            if n and key[:n] == parts[:n]:
                return self.file, None, ov
        for name, text in [(self.file, self.text), *reversed(self.includes)]:
            line = _line_of(text, path)
            if line is not None:
                return name, line, None
        # the key is missing: point at the deepest parent that exists
        for cut in range(len(path) - 1, 0, -1):
            line = _line_of(self.text, path[:cut])
            if line is not None:
                return self.file, line, None
        return self.file, None, None


# --------------------------------------------------------------------------- sources


def _display(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def library_specs() -> dict[str, Path]:
    """The spec library shipped with the package: short name (``hope``, ``equiv/la_gd``) → file."""
    root = Path(str(resources.files("nlgraph.specs")))
    out = {}
    for p in sorted(root.rglob("*.yaml")):
        rel = p.relative_to(root).with_suffix("")
        if rel.parts[0].startswith(("_", ".")):
            continue
        out[rel.as_posix()] = p
    return out


def resolve_source(name: str | os.PathLike, *, relative_to: Path | None = None) -> Path:
    """A spec file from a path (absolute, relative to ``relative_to`` or the working directory) or
    a library short name. Raises :class:`SpecError` with a did-you-mean when nothing matches."""
    text = str(name)
    candidates = [Path(text)]
    if relative_to is not None and not Path(text).is_absolute():
        candidates.insert(0, relative_to / text)
    for c in candidates:
        if c.is_file():
            return c
        if c.is_dir():
            raise SpecError(f"'{text}' is a directory; name a .yaml spec file inside it")
    lib = library_specs()
    short = text[:-5] if text.endswith(".yaml") else text
    short = short[6:] if short.startswith("specs/") else short
    if short in lib:
        return lib[short]
    hint = did_you_mean(short, lib)
    raise SpecError(
        f"no spec file '{text}' and no library spec of that name{hint or ''}"
        f"{'' if hint else '; `nlgraph list` shows the library'}"
    )


# --------------------------------------------------------------------------- YAML


def _parse_yaml(text: str, file: str | None) -> Any:
    try:
        cfg = OmegaConf.create(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        msg = f"invalid YAML: {problem}" + (f" ({context})" if context and "duplicate" not in problem else "")
        if "found duplicate key" in str(e):
            msg = f"invalid YAML: {problem}; each key may appear once per mapping"
        if mark is not None and "flow" in str(e) and "${" in text.splitlines()[min(mark.line, len(text.splitlines()) - 1)] + text.splitlines()[max(mark.line - 1, 0)]:
            msg += "; quote interpolations inside {...}, e.g. heads: '${vars.heads}'"
        if "could not determine a constructor" in str(e):
            msg = f"invalid YAML: {problem}; specs are plain data, tags like !!python are refused"
        raise SpecError(msg, file=file, line=mark.line + 1 if mark else None) from None
    except OmegaConfBaseException as e:
        raise SpecError(f"invalid spec: {str(e).splitlines()[0]}", file=file) from None
    return cfg


def _line_of(text: str | None, path: Sequence[str | int]) -> int | None:
    """1-based line where ``path`` is written in the YAML ``text`` (the key's line)."""
    if not text:
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return None
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return None
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return None
    return line


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _prune_switched_kinds(base: Any, top: Any, path: tuple = ()) -> Any:
    """Drop from ``base`` every mapping that ``top`` replaces with one of another ``kind``: a
    variant switch replaces the old variant instead of merging fields that do not belong to it.
    An entry of ``levels`` without a ``kind`` is a ``level``."""
    if isinstance(base, dict) and isinstance(top, dict):
        implicit = "level" if len(path) == 2 and path[0] == "levels" else None
        old_kind = base.get("kind", implicit)
        if old_kind is not None and "kind" in top and old_kind != top["kind"]:
            return None
        out = {}
        for k, v in base.items():
            if k in top:
                pruned = _prune_switched_kinds(v, top[k], (*path, k))
                if pruned is None and isinstance(v, dict):
                    continue
                out[k] = v if pruned is None else pruned
            else:
                out[k] = v
        return out
    return base


def merge_specs(base: DictConfig, top: DictConfig) -> DictConfig:
    """OmegaConf merge of ``top`` over ``base`` (mappings merge key by key, lists are replaced),
    except that a mapping whose ``kind`` changes is replaced whole."""
    b = OmegaConf.to_container(base, resolve=False)
    t = OmegaConf.to_container(top, resolve=False)
    return OmegaConf.merge(OmegaConf.create(_prune_switched_kinds(b, t)), OmegaConf.create(t))


def _read_composed(path: Path, source: SpecSource, stack: tuple[Path, ...]) -> DictConfig:
    """Load ``path`` with its ``include:`` list merged underneath it (includes first, in order)."""
    display = _display(path)
    if path.resolve() in stack:
        chain = " -> ".join(_display(p) for p in (*stack, path.resolve()))
        raise SpecError(f"include cycle: {chain}; remove one of these includes", file=display)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError("not a UTF-8 text file; a spec is YAML text", file=display) from None
    except OSError as e:
        raise SpecError(f"cannot read the file: {e.strerror}", file=display) from None
    if not stack:
        source.file, source.text = display, text
    else:
        source.includes.append((display, text))
    cfg = _parse_yaml(text, display)
    if not isinstance(cfg, DictConfig):
        raise SpecError(
            "the top level must be a mapping with 'levels' and 'model', not a list",
            file=display,
            line=1,
        )
    if len(cfg) == 0 and not stack:
        raise SpecError(
            "the file is empty; a spec needs 'levels' and 'model' (see `nlgraph show hope`)",
            file=display,
        )
    includes = cfg.pop(INCLUDE_KEY, None) if INCLUDE_KEY in cfg else None
    if includes is None:
        return cfg
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, ListConfig) and not isinstance(includes, list):
        raise SpecError(
            "expected a list of spec files or library names",
            file=display,
            path=INCLUDE_KEY,
            line=_line_of(text, [INCLUDE_KEY]),
        )
    merged = OmegaConf.create({})
    for i, inc in enumerate(includes):
        if not isinstance(inc, str):
            raise SpecError(
                f"expected a file or library name, got {inc!r}",
                file=display,
                path=f"{INCLUDE_KEY}[{i}]",
                line=_line_of(text, [INCLUDE_KEY]),
            )
        try:
            target = resolve_source(inc, relative_to=path.parent)
        except SpecError as e:
            raise SpecError(e.message, file=display, path=f"{INCLUDE_KEY}[{i}]",
                            line=_line_of(text, [INCLUDE_KEY])) from None
        merged = merge_specs(merged, _read_composed(target, source, (*stack, path.resolve())))
    return merge_specs(merged, cfg)


# --------------------------------------------------------------------------- overrides


def _apply_override(cfg: DictConfig, override: str, source: SpecSource) -> None:
    if "=" not in override:
        raise SpecError(
            f"bad override '{override}': expected KEY=VALUE, e.g. model.d_model=256",
            file=source.file,
        )
    key, raw_value = (s.strip() for s in override.split("=", 1))
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise SpecError(f"bad override '{override}': empty key segment in '{key}'", file=source.file)
    try:
        # from_dotlist is OmegaConf's public YAML value parser (1e-3 is a float, [a, b] a list)
        parsed = OmegaConf.from_dotlist([f"v={raw_value}"])
        value = OmegaConf.to_container(parsed)["v"] if raw_value else ""
    except (yaml.YAMLError, OmegaConfBaseException):
        raise SpecError(
            f"bad override '{override}': the value is not valid YAML", file=source.file
        ) from None
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, DictConfig):
            if part not in node:
                break  # a new subtree: the schema will judge it
            node = OmegaConf.to_container(node, resolve=False)[part] if not isinstance(
                node.get(part, None), (DictConfig, ListConfig)) else node[part]
        elif isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(
                    f"bad override '{override}': '{'.'.join(parts[: depth + 1])}' is not an index "
                    f"of a list of length {len(node)}",
                    file=source.file,
                )
            node = node[int(part)]
        else:
            raise SpecError(
                f"bad override '{override}': '{'.'.join(parts[: depth])}' is a value "
                f"({node!r}), not a mapping",
                file=source.file,
            )
    else:
        if isinstance(node, ListConfig) and (not parts[-1].isdigit() or int(parts[-1]) >= len(node)):
            raise SpecError(
                f"bad override '{override}': '{'.'.join(parts[:-1])}' is a list of length "
                f"{len(node)}; '{parts[-1]}' is not one of its indices",
                file=source.file,
            )
        if not isinstance(node, (DictConfig, ListConfig)):
            raise SpecError(
                f"bad override '{override}': '{'.'.join(parts[:-1])}' is a value ({node!r}), not "
                f"a mapping",
                file=source.file,
            )
    existing = OmegaConf.select(cfg, key, throw_on_resolution_failure=False) if node is not None else None
    switch = (isinstance(value, dict) and isinstance(existing, DictConfig)
              and "kind" in value and existing.get("kind") != value["kind"])
    try:
        # a mapping with another `kind` replaces the old variant; otherwise mappings merge
        OmegaConf.update(cfg, key, value, merge=not switch, force_add=True)
    except OmegaConfBaseException as e:
        raise SpecError(f"bad override '{override}': {str(e).splitlines()[0]}", file=source.file) from None


# --------------------------------------------------------------------------- validation errors


def _expand(tp: Any) -> list[Any]:
    """Model classes and containers reachable from a type annotation (unwrapping Annotated and
    unions)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _expand(typing.get_args(tp)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        out = []
        for a in typing.get_args(tp):
            out += _expand(a)
        return out
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    if origin in (list, dict, tuple):
        return [tp]
    return []


def _next_types(types: list[Any], elem: str | int) -> list[Any]:
    out = []
    for t in types:
        for e in _expand(t):
            if isinstance(e, type) and issubclass(e, BaseModel):
                for name, f in e.model_fields.items():
                    if elem in (name, f.alias):
                        out.append(f.annotation)
            else:
                origin, args = typing.get_origin(e), typing.get_args(e)
                if origin is dict and isinstance(elem, str):
                    out.append(args[1])
                elif origin is list and isinstance(elem, int):
                    out.append(args[0])
    return out


def _fields_at(root: Any, path: Sequence[str | int], data: Any) -> list[str]:
    """Names of the keys the schema allows in the mapping at ``path``."""
    types = [root]
    for elem in path:
        nxt = _next_types(types, elem)
        if nxt:
            types = nxt
    kind = data.get("kind") if isinstance(data, dict) else None
    names: list[str] = []
    for t in types:
        for e in _expand(t):
            if isinstance(e, type) and issubclass(e, BaseModel):
                kf = e.model_fields.get("kind")
                if kind is not None and kf is not None and kind not in typing.get_args(kf.annotation):
                    continue
                names += [f.alias or n for n, f in e.model_fields.items()]
    return names


def _clean_loc(loc: Sequence[str | int], data: Any, keep_last: bool) -> tuple[list[str | int], Any]:
    """Drop union-branch tags from a pydantic location by walking the input data alongside it."""
    path: list[str | int] = []
    cur, parent = data, None
    for i, elem in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(cur, dict):
            if cur.get("kind") == elem and elem not in cur:
                continue
            if "kind" not in cur and elem == "level" and elem not in cur:
                continue  # the implicit `kind: level` tag
            if elem in cur:
                path.append(elem)
                parent, cur = cur, cur[elem]
                continue
            if last and keep_last:
                path.append(elem)
                parent, cur = cur, None
            continue
        if isinstance(cur, list) and isinstance(elem, int) and elem < len(cur):
            path.append(elem)
            parent, cur = cur, cur[elem]
            continue
        # scalar or tag: a union branch name
    return path, parent


def _quote_list(expected: str) -> list[str]:
    return [s.strip().strip("'\"") for s in expected.replace(" or ", ",").split(",") if s.strip()]


def _describe(err: dict, data: Any, root: Any) -> tuple[list[str | int], str]:
    kind = err["type"]
    path, parent = _clean_loc(err["loc"], data, keep_last=kind in ("missing", "extra_forbidden"))
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        key = path[-1]
        allowed = _fields_at(root, path[:-1], parent)
        hint = did_you_mean(str(key), allowed)
        return path, f"unknown key '{key}'{hint or ''}" + (
            "" if hint else f" (allowed: {', '.join(sorted(allowed))})"
        )
    if kind == "missing":
        return path, f"missing required key '{path[-1]}'"
    if kind == "union_tag_invalid":
        expected = _quote_list(ctx.get("expected_tags", ""))
        tag = ctx.get("tag")
        hint = did_you_mean(str(tag), expected)
        path = path + ["kind"] if isinstance(value, dict) and "kind" in value else path
        return path, f"unknown kind '{tag}' (expected {', '.join(expected)}){hint}"
    if kind == "union_tag_not_found":
        return path, "missing 'kind'; say which variant this is"
    if kind == "literal_error":
        expected = _quote_list(ctx.get("expected", ""))
        hint = did_you_mean(str(value), expected)
        return path, f"expected one of {', '.join(expected)}, got {value!r}{hint}"
    if kind == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return path, msg
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path, f"expected a mapping, got {value!r}"
    if kind == "list_type":
        return path, f"expected a list, got {value!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return path, f"expected an integer, got {value!r}"
    if kind in ("float_parsing", "float_type"):
        return path, f"expected a number, got {value!r}"
    if kind in ("bool_parsing", "bool_type"):
        return path, f"expected true or false, got {value!r}"
    if kind in ("string_type",):
        return path, f"expected a string, got {value!r}"
    if kind.startswith(("greater", "less")):
        return path, f"{err['msg'][0].lower()}{err['msg'][1:]}, got {value!r}"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return path, f"needs at least {n} entr{'y' if n == 1 else 'ies'}, got {ctx.get('actual_length', 0)}"
    if kind == "too_long":
        return path, f"{err['msg'][0].lower()}{err['msg'][1:]}"
    return path, f"{err['msg']} (got {value!r})"


def validation_error(
    exc: ValidationError, data: Any, source: SpecSource, root: Any = Spec, prefix: Sequence[str | int] = ()
) -> SpecError:
    """Turn a pydantic error into one :class:`SpecError` (further problems in ``.more``)."""
    errors: list[SpecError] = []
    seen = set()
    for err in exc.errors(include_url=False):
        path, msg = _describe(err, data, root)
        full = [*prefix, *path]
        key = (tuple(full), msg)
        if key in seen:
            continue
        seen.add(key)
        file, line, override = source.locate(full)
        if override is not None:
            msg += f" (set by override '{override}')"
        errors.append(SpecError(msg, file=file, line=line, path=_dotted(full) or None))
    first = errors[0]
    return SpecError(first.message, file=first.file, path=first.path, line=first.line, more=errors[1:])


# --------------------------------------------------------------------------- public API


def load_raw(source: Any, overrides: Iterable[str] = ()) -> tuple[dict, SpecSource]:
    """Read, compose, override and interpolate a spec into a plain dict (no validation)."""
    overrides = [str(o) for o in overrides]
    info = SpecSource(overrides=overrides)
    if isinstance(source, Mapping):
        cfg = OmegaConf.create(dict(source))
    elif isinstance(source, str) and "\n" in source:
        info.text = source
        cfg = _parse_yaml(source, None)
        if not isinstance(cfg, DictConfig) or len(cfg) == 0:
            raise SpecError("a spec must be a non-empty mapping with 'levels' and 'model'")
    else:
        cfg = _read_composed(resolve_source(source), info, ())
    for ov in overrides:
        _apply_override(cfg, ov, info)
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        path = [int(p) if p.isdigit() else p for p in key.replace("[", ".").replace("]", "").split(".") if p]
        file, line, override = info.locate(path)
        first = str(e).splitlines()[0]
        if "Missing mandatory value" in first:
            msg = "value is '???' (mandatory); set it in the spec or with an override KEY=VALUE"
        elif "not found" in first:
            msg = f"interpolation failed: {first}; check the ${{...}} reference"
        else:
            msg = f"interpolation failed: {first}"
        if override:
            msg += f" (set by override '{override}')"
        raise SpecError(msg, file=file, line=line, path=key or None) from None
    if isinstance(raw, dict) and isinstance(raw.get("levels"), dict):
        # `levels.<name>: null` in an including file (or an override) removes an included level
        raw["levels"] = {k: v for k, v in raw["levels"].items() if v is not None}
    return raw, info


def load_spec(source: Any, overrides: Iterable[str] = ()) -> Spec:
    """Load and validate a spec.

    Args:
        source: a path to a YAML file, a library short name (``"hope"``), YAML text, a mapping,
            or an already validated :class:`Spec` (returned as is when there are no overrides).
        overrides: ``"dotted.key=value"`` strings applied after includes, before interpolation.

    Returns:
        The frozen, validated :class:`Spec`.

    Raises:
        SpecError: one line naming the file, line and YAML path of the first problem.
    """
    if isinstance(source, Spec):
        if not overrides:
            return source
        source = dump_spec(source, as_dict=True)
    raw, info = load_raw(source, overrides)
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        raise validation_error(e, raw, info) from None
    return spec


def load_level(source: Any) -> Any:
    """Validate one level entry (mapping, YAML text or spec object) on its own, e.g. for
    ``nlgraph.run_level``."""
    if isinstance(source, BaseModel):
        return source
    if isinstance(source, str):
        cfg = _parse_yaml(source, None)
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    else:
        raw = dict(source)
    try:
        return TypeAdapter(LevelEntry).validate_python(raw)
    except ValidationError as e:
        raise validation_error(e, raw, SpecSource(text=source if isinstance(source, str) else None),
                               root=LevelEntry) from None


def dump_spec(spec: Spec, *, as_dict: bool = False, exclude_defaults: bool = False) -> Any:
    """The spec as YAML text (or a plain dict): every default filled in unless
    ``exclude_defaults``; ``load_spec(dump_spec(s)) == s``."""
    data = spec.model_dump(mode="json", by_alias=True, exclude_defaults=exclude_defaults)
    if exclude_defaults:
        # `kind` tags carry the variant even when they equal a default
        data = _restore_kinds(spec, data)
    if as_dict:
        return data
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)


def _restore_kinds(model: Any, data: Any) -> Any:
    if isinstance(model, BaseModel) and isinstance(data, dict):
        if "kind" in type(model).model_fields:
            data = {"kind": model.kind, **data}
        if "from_" in type(model).model_fields and "from" not in data:
            data = {"from": model.from_, **data}  # a gate is recognised by its `from`
        for name, f in type(model).model_fields.items():
            key = f.alias or name
            if key in data:
                data[key] = _restore_kinds(getattr(model, name), data[key])
        return data
    if isinstance(model, dict) and isinstance(data, dict):
        return {k: _restore_kinds(model[k], v) for k, v in data.items()}
    if isinstance(model, (list, tuple)) and isinstance(data, list):
        return [_restore_kinds(m, d) for m, d in zip(model, data)]
    return data


def spec_hash(spec: Spec) -> str:
    """A stable 16-hex-digit hash of the validated spec: independent of key order, of how the spec
    was written (defaults spelt out or not, includes, interpolation) and of the Python session."""
    data = spec.model_dump(mode="json", by_alias=True)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
