"""Stage 1 of the pipeline: read a spec (file, library short name, dict or YAML text), compose its
includes, apply ``key=value`` overrides, resolve ``${...}`` interpolations and validate it.

Every failure is one :class:`~nlgraph.errors.SpecError` naming the file, the line, the dotted YAML
path and what to do.

A spec is data (docs/security.md): YAML is parsed with a safe loader only, so nothing in a spec
imports or executes code; ``${…}`` may only reference keys of the spec (OmegaConf's resolvers such as
``oc.env`` are refused, and interpolation is resolved here, never through OmegaConf's process-wide
resolver registry); includes stay inside the spec's folder and the library unless a folder is
trusted; file size, YAML nodes and nesting are bounded before anything is built; errors quote at
most a short escaped excerpt of what they read.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import stat
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from ..errors import SpecError, did_you_mean
from ..limits import MAX_INT, Limits, format_bytes
from .schema import LevelEntry, Spec

__all__ = [
    "LoadOptions",
    "SpecSource",
    "current_options",
    "dump_spec",
    "excerpt",
    "load_options",
    "library_specs",
    "load_level",
    "load_raw",
    "load_resolved_spec",
    "load_spec",
    "resolve_source",
    "spec_hash",
    "validate_raw",
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

    def locate_dotted(self, dotted: str) -> tuple[str | None, int | None, str | None]:
        """:meth:`locate` for a dotted path as errors write it (``levels.cms.levels[1].frequency``)."""
        parts = [p for p in re.split(r"[.\[\]]", dotted) if p]
        return self.locate([int(p) if p.isdigit() else p for p in parts])

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


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class LoadOptions:
    """What a load may read beyond the spec's own folder and the library, and its bounds."""

    allow_includes_from: tuple[Path, ...] = ()
    """Trusted folders: includes may name files inside them (absolute paths too)."""
    limits: Limits = field(default_factory=Limits)
    """Bounds on file size, YAML nodes and nesting, interpolated strings and model size."""


_OPTIONS: ContextVar[LoadOptions] = ContextVar("nlgraph_load_options", default=LoadOptions())


@contextmanager
def load_options(*, allow_includes_from: Iterable[str | os.PathLike] = (),
                 limits: Limits | None = None) -> Iterator[LoadOptions]:
    """Within the block, every load (also those made inside ``build_graph``, ``build``, ``plan``)
    trusts the given folders for includes and uses ``limits``; the CLI wraps each command in it."""
    opts = LoadOptions(tuple(Path(d) for d in allow_includes_from), limits or Limits())
    token = _OPTIONS.set(opts)
    try:
        yield opts
    finally:
        _OPTIONS.reset(token)


def current_options() -> LoadOptions:
    """The options of the innermost :func:`load_options` block (defaults outside any)."""
    return _OPTIONS.get()


def _options(allow_includes_from: Iterable[str | os.PathLike] | None, limits: Limits | None) -> LoadOptions:
    base = _OPTIONS.get()
    trusted = base.allow_includes_from
    if allow_includes_from is not None:
        if isinstance(allow_includes_from, (str, os.PathLike)):
            allow_includes_from = [allow_includes_from]
        trusted = (*trusted, *(Path(d) for d in allow_includes_from))
    return LoadOptions(trusted, limits or base.limits)


# --------------------------------------------------------------------------- sources


def _display(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def excerpt(value: Any, limit: int = 40) -> str:
    """A short, escaped rendering of something read from a spec, for error messages: control and
    non-ASCII characters escaped (a confusable shows as ``\\u0456``), cut to ``limit`` characters.
    Errors never quote more of a file than this."""
    text = value if isinstance(value, str) else repr(value)
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in out)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _library_root() -> Path:
    return Path(str(resources.files("nlgraph.specs")))


def library_specs() -> dict[str, Path]:
    """The spec library shipped with the package: short name (``hope``, ``equiv/la_gd``) → file."""
    root = _library_root()
    out = {}
    for p in sorted(root.rglob("*.yaml")):
        rel = p.relative_to(root).with_suffix("")
        if rel.parts[0].startswith(("_", ".")):
            continue
        out[rel.as_posix()] = p
    return out


def _library_fragments() -> dict[str, Path]:
    """Library fragments (``_fragments/swiglu_mlp.yaml``): includable, not specs of their own."""
    root = _library_root()
    return {p.relative_to(root).as_posix(): p for p in sorted(root.glob("_fragments/*.yaml"))}


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def _file_kind_error(text: str, what: str) -> SpecError:
    if what == "a directory":
        return SpecError(f"'{excerpt(text, 80)}' is a directory; name a .yaml spec file inside it")
    return SpecError(f"'{excerpt(text, 80)}' is {what}, not a spec file; a spec is a regular YAML file")


def resolve_source(name: str | os.PathLike, *, relative_to: Path | None = None) -> Path:
    """A spec file from a path (absolute, relative to ``relative_to`` or the working directory) or
    a library short name. Raises :class:`SpecError` with a did-you-mean when nothing matches, and
    for a directory, FIFO, device or socket (never opened)."""
    text = str(name)
    if "\x00" in text:
        raise SpecError(f"'{excerpt(text, 80)}' is not a file name (it contains a NUL character)")
    candidates = [Path(text)]
    if relative_to is not None and not Path(text).is_absolute():
        candidates.insert(0, relative_to / text)
    for c in candidates:
        try:
            mode = os.stat(c).st_mode  # follows symlinks: judge what would be read
        except OSError:
            continue
        what = _not_regular(mode)
        if what is not None:
            raise _file_kind_error(text, what)
        return c
    lib = library_specs()
    short = text[:-5] if text.endswith(".yaml") else text
    short = short[6:] if short.startswith("specs/") else short
    if short in lib:
        return lib[short]
    hint = did_you_mean(short, lib)
    raise SpecError(
        f"no spec file '{excerpt(text, 80)}' and no library spec of that name{hint or ''}"
        f"{'' if hint else '; `nlgraph list` shows the library'}"
    )


def _read_spec_file(path: Path, display: str, limits: Limits) -> str:
    """The text of a spec file, refusing before reading anything that is not a regular file of at
    most ``limits.max_spec_bytes`` UTF-8 bytes (a FIFO would block, a device never end)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then judges the opened file,
        # so a file swapped after the check above is judged again
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise SpecError(f"cannot read the file: {e.strerror}", file=display) from None
    try:
        st = os.fstat(fd)
        what = _not_regular(st.st_mode)
        if what is not None:
            raise SpecError(f"the file is {what}, not a spec file; a spec is a regular YAML file",
                            file=display)
        cap = limits.max_spec_bytes
        if st.st_size > cap:
            raise SpecError(f"the file is {format_bytes(st.st_size)}, over the {format_bytes(cap)} "
                            f"limit for a spec; raise it with --max-spec-bytes if you trust the file",
                            file=display)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(cap + 1)
    except OSError as e:
        raise SpecError(f"cannot read the file: {e.strerror}", file=display) from None
    finally:
        os.close(fd)
    if len(data) > cap:  # it grew after fstat
        raise SpecError(f"the file is over the {format_bytes(cap)} limit for a spec; raise it with "
                        f"--max-spec-bytes if you trust the file", file=display)
    return _decode(data, display)


def _decode(data: bytes, display: str | None) -> str:
    nul = data.find(b"\x00")
    if nul >= 0:
        raise SpecError(f"binary data (a NUL byte at offset {nul}); a spec is YAML text", file=display)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"not a UTF-8 text file (byte {e.start}); a spec is YAML text",
                        file=display) from None


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _resolve_include(inc: str, parent: Path | None, root: Path | None, opts: LoadOptions) -> Path:
    """The file an ``include:`` entry names. Allowed: a relative path from the including file's
    folder that stays (symlinks followed) inside the top spec's folder or the library, a library
    spec or fragment, or any path inside a trusted folder (``allow_includes_from``)."""
    trusted = [_real(d) for d in opts.allow_includes_from]
    if "\x00" in inc or not inc.strip():
        raise SpecError(f"'{excerpt(inc)}' is not a file name")
    how = "; to include it anyway, trust its folder with --allow-outside-includes DIR " \
          "(load_spec(..., allow_includes_from=[DIR]))"
    p = Path(inc)
    if p.is_absolute():
        if any(_inside(_real(p), d) for d in trusted):
            return resolve_source(p)
        raise SpecError(f"absolute include path '{excerpt(inc, 80)}' refused: a spec includes files "
                        f"from its own folder or the library{how}")
    if parent is not None:
        candidate = parent / p
        if os.path.lexists(candidate):
            allowed = [d for d in (root, _real(_library_root())) if d is not None] + trusted
            real = _real(candidate)
            if not any(_inside(real, d) for d in allowed):
                if any(_inside(Path(os.path.abspath(candidate)), d) for d in allowed):
                    why = "is a symlink to a file outside the spec's folder"
                else:
                    why = "leaves the spec's folder"
                raise SpecError(f"include '{excerpt(inc, 80)}' {why}{how}")
            return resolve_source(candidate)
    for d in trusted:
        if os.path.lexists(d / p) and _inside(_real(d / p), d):
            return resolve_source(d / p)
    frag = _library_fragments().get(p.as_posix())
    if frag is not None:
        return frag
    if ".." in p.parts:
        # never resolved against the working directory: that would reach outside the spec
        raise SpecError(f"include '{excerpt(inc, 80)}' leaves the spec's folder{how}")
    lib = library_specs()
    short = inc[:-5] if inc.endswith(".yaml") else inc
    short = short[6:] if short.startswith("specs/") else short
    if short in lib:
        return lib[short]
    hint = did_you_mean(short, [*lib, *_library_fragments()])
    raise SpecError(
        f"no spec file '{excerpt(inc, 80)}' and no library spec of that name{hint or ''}"
        f"{'' if hint else '; `nlgraph list` shows the library'}"
    )


# --------------------------------------------------------------------------- YAML

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _scan_yaml(text: str, file: str | None, limits: Limits) -> None:
    """Bound a YAML text before anything is built from it: at most ``limits.max_yaml_nodes`` nodes
    with aliases expanded (an alias bomb is refused after reading its anchors, not after expanding
    them), nesting at most ``limits.max_yaml_depth``, and no merge keys (``<<``). Walks the event
    stream, which needs no recursion however deep the nesting."""
    nbytes = len(text.encode("utf-8", "surrogatepass"))
    if nbytes > limits.max_spec_bytes:
        raise SpecError(f"the spec is {format_bytes(nbytes)}, over the "
                        f"{format_bytes(limits.max_spec_bytes)} limit; raise it with --max-spec-bytes "
                        f"if you trust it", file=file)
    # per open collection: [is_mapping, children so far, expanded size, anchor]
    stack: list[list[Any]] = []
    anchors: dict[str, int] = {}
    total = 0

    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            _, _, size, anchor = stack.pop()
            if anchor is not None:
                anchors[anchor] = size
            if stack:
                stack[-1][2] += size
            continue
        if not isinstance(event, (yaml.NodeEvent)):
            continue  # stream and document markers
        line = event.start_mark.line + 1
        at_key = bool(stack) and stack[-1][0] and stack[-1][1] % 2 == 0
        if stack:
            stack[-1][1] += 1
        if isinstance(event, yaml.AliasEvent):
            size = anchors.get(event.anchor, 1)
        else:
            size = 1
        total += size
        if total > limits.max_yaml_nodes:
            raise SpecError(f"more than {limits.max_yaml_nodes} YAML nodes (aliases expanded); a spec "
                            f"is far smaller (an alias bomb?)", file=file, line=line)
        if isinstance(event, yaml.CollectionStartEvent):
            if at_key:
                raise SpecError("a mapping or list used as a key; keys are plain names", file=file,
                                line=line)
            stack.append([isinstance(event, yaml.MappingStartEvent), 0, 1, event.anchor])
            if len(stack) > limits.max_yaml_depth:
                raise SpecError(f"YAML nested more than {limits.max_yaml_depth} levels deep; a spec is "
                                f"far shallower", file=file, line=line)
            continue
        if isinstance(event, yaml.ScalarEvent):
            merge_tag = "tag:yaml.org,2002:merge"
            if at_key and (event.tag == merge_tag or (event.value == "<<" and event.implicit[0])):
                raise SpecError("YAML merge keys (<<) are not supported in specs; use include: or "
                                "${vars.…} to share values", file=file, line=line)
            if event.anchor is not None:
                anchors[event.anchor] = 1
        if stack:
            stack[-1][2] += size


class _SpecLoader(_YAML_LOADER):  # type: ignore[misc, valid-type]
    """A safe loader that builds plain data only (null, bool, int, float, str, list, mapping: every
    other tag is refused), reads ``1e-3`` as a float as OmegaConf did, keeps dates as text, refuses
    duplicate keys, and keeps every scalar key as it is spelt (``on:`` is the key ``'on'``, not
    ``True``)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if not isinstance(node, yaml.MappingNode):  # pragma: no cover - the composer guarantees it
            return super().construct_mapping(node, deep=deep)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "a mapping or list used as a key; keys are plain names", key_node.start_mark)
            key = key_node.value
            if key in out:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {excerpt(key)}", key_node.start_mark)
            out[key] = self.construct_object(value_node, deep=True)
        return out


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:
     [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)
# plain data only: !!binary, !!set, !!omap, !!pairs and !!timestamp make non-JSON values
_SpecLoader.yaml_constructors = {
    tag: ctor for tag, ctor in _YAML_LOADER.yaml_constructors.items()
    if tag is None or tag.rsplit(":", 1)[-1] in ("null", "bool", "int", "float", "str", "seq", "map")
}
_SpecLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in _SpecLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str, file: str | None, limits: Limits) -> Any:
    """Plain Python data (dicts, lists, str, int, float, bool, None) from YAML text, bounded
    first by :func:`_scan_yaml`."""
    try:
        _scan_yaml(text, file, limits)
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - _SpecLoader is a safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = excerpt(getattr(e, "problem", None) or str(e).splitlines()[0], 120)
        context = getattr(e, "context", None)
        msg = f"invalid YAML: {problem}" + (f" ({excerpt(context, 80)})" if context and "duplicate" not in problem else "")
        if "found duplicate key" in str(e):
            msg = f"invalid YAML: {problem}; each key may appear once per mapping"
        lines = text.splitlines() or [""]
        if mark is not None and "flow" in str(e) and "${" in lines[min(mark.line, len(lines) - 1)] + lines[max(min(mark.line, len(lines)) - 1, 0)]:
            msg += "; quote interpolations inside {...}, e.g. heads: '${vars.heads}'"
        if "could not determine a constructor" in str(e):
            msg = f"invalid YAML: {problem}; specs are plain data, tags like !!python are refused"
        if "maximum nesting depth" in str(e):  # libyaml's own bound, met while scanning ahead
            msg = f"YAML nested more than {limits.max_yaml_depth} levels deep; a spec is far shallower"
        raise SpecError(msg, file=file, line=mark.line + 1 if mark else None) from None
    except RecursionError:  # pragma: no cover - the depth bound of _scan_yaml comes first
        raise SpecError("YAML nested too deeply", file=file) from None


def _parse_yaml(text: str, file: str | None, limits: Limits | None = None) -> Any:
    """Load YAML text and refuse any ``${…}`` that is not a key path, located in ``text``."""
    data = _load_yaml(text, file, limits or _OPTIONS.get().limits)
    if data is None:
        data = {}
    _check_interpolations(data, file, text)
    return data


_KINDS = {str: "a string", int: "a number", float: "a number", bool: "true or false", list: "a list"}


def _top_mapping(data: Any, file: str | None) -> dict:
    if isinstance(data, dict):
        return data
    what = _KINDS.get(type(data), "a scalar")
    raise SpecError(f"the top level must be a mapping with 'levels' and 'model', not {what}",
                    file=file, line=1)


@functools.lru_cache(maxsize=8)
def _composed(text: str) -> Any:
    """The YAML node tree of ``text`` (cached: ``--all`` locates every error in the same texts)."""
    try:
        return yaml.compose(text, Loader=_YAML_LOADER)
    except (yaml.YAMLError, RecursionError):
        return None


def _line_of(text: str | None, path: Sequence[str | int]) -> int | None:
    """1-based line where ``path`` is written in the YAML ``text`` (the key's line)."""
    if not text:
        return None
    node = _composed(text)
    if node is None:
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
        p = p if isinstance(p, int) else excerpt(str(p))
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


def _merge(base: Any, top: Any) -> Any:
    """``top`` over ``base``: mappings merge key by key, anything else (lists too) is replaced."""
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for k, v in top.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(top)


def merge_specs(base: dict, top: dict) -> dict:
    """Merge of ``top`` over ``base`` (mappings merge key by key, lists are replaced), except that
    a mapping whose ``kind`` changes is replaced whole."""
    return _merge(_prune_switched_kinds(base, top), top)


def _read_composed(path: Path, source: SpecSource, stack: tuple[Path, ...], opts: LoadOptions,
                   root: Path | None) -> dict:
    """Load ``path`` with its ``include:`` list merged underneath it (includes first, in order)."""
    display = _display(path)
    if _real(path) in stack:
        chain = " -> ".join(_display(p) for p in (*stack, _real(path)))
        raise SpecError(f"include cycle: {chain}; remove one of these includes", file=display)
    text = _read_spec_file(path, display, opts.limits)
    if not stack:
        source.file, source.text = display, text
    else:
        source.includes.append((display, text))
    cfg = _top_mapping(_parse_yaml(text, display, opts.limits), display)
    if len(cfg) == 0 and not stack:
        raise SpecError(
            "the file is empty; a spec needs 'levels' and 'model' (see `nlgraph show hope`)",
            file=display,
        )
    return _compose_includes(cfg, text, display, path.parent, source, (*stack, _real(path)), opts, root)


def _compose_includes(cfg: dict, text: str | None, display: str | None, folder: Path | None,
                      source: SpecSource, stack: tuple[Path, ...], opts: LoadOptions,
                      root: Path | None) -> dict:
    """Merge the files named by ``cfg``'s ``include:`` underneath it; ``folder`` is where relative
    includes start (``None`` for YAML text and mappings: library and trusted folders only)."""
    if INCLUDE_KEY not in cfg:
        return cfg
    line = _line_of(text, [INCLUDE_KEY])
    cfg = dict(cfg)
    includes = cfg.pop(INCLUDE_KEY)
    if includes is None:
        return cfg
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        raise SpecError("expected a list of spec files or library names", file=display,
                        path=INCLUDE_KEY, line=line)
    merged: dict = {}
    for i, inc in enumerate(includes):
        if not isinstance(inc, str):
            raise SpecError(f"expected a file or library name, got {excerpt(inc)}", file=display,
                            path=f"{INCLUDE_KEY}[{i}]", line=line)
        if "${" in inc:
            raise SpecError("an include names a file directly; interpolation is not allowed here",
                            file=display, path=f"{INCLUDE_KEY}[{i}]", line=line)
        try:
            target = _resolve_include(inc, folder, root, opts)
        except SpecError as e:
            raise SpecError(e.message, file=display, path=f"{INCLUDE_KEY}[{i}]", line=line) from None
        merged = merge_specs(merged, _read_composed(target, source, stack, opts, root))
    return merge_specs(merged, cfg)


# --------------------------------------------------------------------------- interpolation

# `${path}`: an absolute key path (`vars.width`, `levels.mixer.memory.heads`, `model.blocks[0]`) or
# a relative one (`.sibling`, `..uncle`). Nothing else: no resolvers (`${oc.env:X}`), no nesting.
_KEY = r"[A-Za-z0-9_\-]+"
_PATH_RE = re.compile(rf"^\.*{_KEY}(?:\.{_KEY}|\[[0-9]+\])*$")
_ALLOWED = "only ${vars.…} and references to other keys of the spec are allowed"
_RESOLVER_RE = re.compile(r"([^:{}$]*):")


class _InterpolationRefused(Exception):
    pass


def _interpolations(value: str) -> list[tuple[int, int, str, bool]]:
    """``(start, end, key path, escaped)`` for every ``${…}`` in ``value``. Raises
    :class:`_InterpolationRefused` for anything that is not a plain key path — also when escaped
    (``\\${…}``), so no reading of the escapes can turn a refused form into a live one."""
    out = []
    i = 0
    while True:
        j = value.find("${", i)
        if j < 0:
            return out
        resolver = _RESOLVER_RE.match(value, j + 2)
        if resolver:
            raise _InterpolationRefused(
                f"resolver '${{{excerpt(resolver.group(1).strip(), 30)}:…}}' refused: a spec is data "
                f"and reads no environment, file or code; {_ALLOWED}")
        k = value.find("}", j + 2)
        inner = value[j + 2: k] if k >= 0 else value[j + 2:]
        nested = inner.find("${")
        if nested >= 0:
            raise _InterpolationRefused(
                f"nested interpolation '${{{excerpt(inner[:nested], 30)}${{…' refused; {_ALLOWED}")
        if "{" in inner:
            raise _InterpolationRefused(f"'${{{excerpt(inner, 30)}' is not a key path; {_ALLOWED}")
        if k < 0:
            raise _InterpolationRefused(f"unclosed interpolation '${{{excerpt(inner, 30)}'; write "
                                        f"${{vars.name}}")
        if ":" in inner:
            name = inner.split(":", 1)[0].strip()
            raise _InterpolationRefused(
                f"resolver '${{{excerpt(name, 30)}:…}}' refused: a spec is data and reads no "
                f"environment, file or code; {_ALLOWED}")
        if not _PATH_RE.match(inner.strip()):
            raise _InterpolationRefused(f"'${{{excerpt(inner, 30)}}}' is not a key path; {_ALLOWED}")
        backslashes = len(value[:j]) - len(value[:j].rstrip("\\"))
        out.append((j, k + 1, inner.strip(), backslashes % 2 == 1))
        i = k + 1


def _walk(data: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """``(path, value)`` of every key (as ``(path, key)`` with the key's own path) and value."""
    yield path, data
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _walk(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _walk(v, (*path, i))


def _check_interpolations(data: Any, file: str | None, text: str | None,
                          source: SpecSource | None = None, override: str | None = None) -> None:
    """Refuse, with the location of the first one, any ``${…}`` that is not a key path."""
    for path, value in _walk(data):
        if isinstance(value, str) and "${" in value:
            try:
                _interpolations(value)
            except _InterpolationRefused as e:
                if source is not None:
                    where, line, _ = source.locate(path)
                else:
                    where, line = file, _line_of(text, path)
                msg = str(e) + (f" (set by override '{excerpt(override, 60)}')" if override else "")
                raise SpecError(msg, file=where, line=line, path=_dotted(path) or None) from None


class _Resolver:
    """Resolves ``${key.path}`` references inside a plain container, privately: OmegaConf's global
    resolver registry (where any code in the process may have registered resolvers) is never
    consulted. Memoised per key, with cycle detection and bounds on the produced size."""

    def __init__(self, data: Any, source: SpecSource, limits: Limits) -> None:
        self.data, self.source, self.limits = data, source, limits
        self.done: dict[tuple, tuple[Any, int]] = {}
        self.active: list[tuple] = []
        self.nodes = 0

    def error(self, path: tuple, msg: str) -> SpecError:
        file, line, override = self.source.locate(path)
        if override:
            msg += f" (set by override '{excerpt(override, 60)}')"
        return SpecError(msg, file=file, line=line, path=_dotted(path) or None)

    def run(self) -> Any:
        return self.value(self.data, ())[0]

    def count(self, n: int, path: tuple) -> None:
        self.nodes += n
        if self.nodes > self.limits.max_yaml_nodes:
            raise self.error(path, f"the spec expands to more than {self.limits.max_yaml_nodes} values "
                                   f"(includes and interpolation); a spec is far smaller")

    def value(self, v: Any, path: tuple) -> tuple[Any, int]:
        """Resolved value at ``path`` and its size in nodes."""
        if isinstance(v, dict):
            out, size = {}, 1
            for k, x in v.items():
                out[k], n = self.value(x, (*path, k))
                size += n
            return out, size
        if isinstance(v, list):
            out, size = [], 1
            for i, x in enumerate(v):
                r, n = self.value(x, (*path, i))
                out.append(r)
                size += n
            return out, size
        self.count(1, path)
        if isinstance(v, str):
            if v == "???":
                raise self.error(path, "value is '???' (mandatory); set it in the spec or with an "
                                       "override KEY=VALUE")
            if "${" in v:
                return self.string(v, path)
        return v, 1

    def string(self, v: str, path: tuple) -> tuple[Any, int]:
        try:
            parts = _interpolations(v)
        except _InterpolationRefused as e:  # an override or a mapping source: checked here too
            raise self.error(path, str(e)) from None
        live = [p for p in parts if not p[3]]
        if len(live) == 1 and not any(p[3] for p in parts) and live[0][:2] == (0, len(v)):
            return self.reference(live[0][2], path)  # the whole value: keeps its type and size
        out, pos = [], 0
        for start, end, key, escaped in parts:
            if escaped:
                out.append(v[pos: start - 1] + v[start:end])
            else:
                out.append(v[pos:start])
                ref, _ = self.reference(key, path)
                if isinstance(ref, (dict, list)):
                    raise self.error(path, f"'${{{excerpt(key, 40)}}}' is a "
                                           f"{'mapping' if isinstance(ref, dict) else 'list'} and "
                                           f"cannot be part of a string")
                out.append(str(ref))
            pos = end
        out.append(v[pos:])
        result = "".join(out)
        if len(result) > self.limits.max_string:
            raise self.error(path, f"interpolation makes a string of more than "
                                   f"{self.limits.max_string} characters; a spec is far smaller")
        return result, 1

    def target(self, key: str, path: tuple) -> tuple:
        dots = len(key) - len(key.lstrip("."))
        base = path[: max(len(path) - dots, 0)] if dots else ()
        parts: list[Any] = []
        for seg in re.findall(r"[^.\[\]]+|\[[0-9]+\]", key[dots:]):
            parts.append(int(seg[1:-1]) if seg.startswith("[") else seg)
        return (*base, *parts)

    def reference(self, key: str, path: tuple) -> tuple[Any, int]:
        target = self.target(key, path)
        node: Any = self.data
        for depth, part in enumerate(target):
            if isinstance(node, dict) and str(part) in node:
                node = node[str(part)]
            elif isinstance(node, list) and str(part).isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                where = _dotted(target[: depth + 1])
                choices = [f"{_dotted(target[:depth])}.{k}" if depth else str(k)
                           for k in node] if isinstance(node, dict) else []
                hint = did_you_mean(where, choices)
                raise self.error(path, f"interpolation '${{{excerpt(key, 40)}}}' failed: no key "
                                       f"'{excerpt(where, 60)}' in the spec{hint}")
        if target in self.done:
            value, size = self.done[target]
            self.count(size, path)
            return value, size
        if target in self.active:
            chain = " -> ".join(_dotted(p) for p in (*self.active[self.active.index(target):], target))
            raise self.error(path, f"interpolation cycle: {excerpt(chain, 160)}; one of these keys "
                                   f"must hold a value")
        self.active.append(target)
        try:
            value, size = self.value(node, target)
        finally:
            self.active.pop()
        self.done[target] = (value, size)
        return value, size


def _check_plain(data: Any, source: SpecSource) -> None:
    """Refuse control characters (terminal escapes) in keys and strings and integers past
    :data:`~nlgraph.limits.MAX_INT`: nothing a spec says should rewrite a terminal or overflow."""
    for path, value in _walk(data):
        if isinstance(value, dict):
            for k in value:
                if isinstance(k, str) and _CONTROL_RE.search(k):
                    file, line, _ = source.locate((*path, k))
                    raise SpecError(f"key '{excerpt(k)}' contains a control character; keys are "
                                    f"plain names", file=file, line=line, path=_dotted(path) or None)
        elif isinstance(value, str) and _CONTROL_RE.search(value):
            file, line, _ = source.locate(path)
            c = _CONTROL_RE.search(value).group()
            raise SpecError(f"control character U+{ord(c):04X} in a string; spec text may hold "
                            f"line feeds and tabs but no other control characters", file=file,
                            line=line, path=_dotted(path) or None)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            file, line, _ = source.locate(path)
            raise SpecError(f"integer {excerpt(str(value), 24)} is out of range (at most 2**53 in "
                            f"magnitude)", file=file, line=line, path=_dotted(path) or None)


# C0 controls but tab and line feed (a carriage return rewrites a terminal line as well as an ANSI
# escape does), C1 controls, Unicode line separators and bidirectional overrides ("Trojan source")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


# --------------------------------------------------------------------------- overrides


def _apply_override(cfg: dict, override: str, source: SpecSource) -> None:
    """Apply ``KEY=VALUE`` to the composed, uninterpolated spec ``cfg`` in place."""
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
        # YAML value syntax, as in a spec file (1e-3 is a float, [a, b] a list)
        value = yaml.load(raw_value, Loader=_SpecLoader) if raw_value else ""  # noqa: S506
    except yaml.YAMLError:
        raise SpecError(
            f"bad override '{excerpt(override, 60)}': the value is not valid YAML", file=source.file
        ) from None
    for _, v in _walk(value):
        if isinstance(v, str) and "${" in v:
            try:
                _interpolations(v)
            except _InterpolationRefused as e:
                raise SpecError(f"bad override '{excerpt(override, 60)}': {e}", file=source.file) from None
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, dict):
            if part not in node:
                break  # a new subtree: the schema will judge it
            node = node[part]
        elif isinstance(node, list):
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
                f"({_got(node)}), not a mapping",
                file=source.file,
            )
    else:
        if isinstance(node, list) and (not parts[-1].isdigit() or int(parts[-1]) >= len(node)):
            raise SpecError(
                f"bad override '{override}': '{'.'.join(parts[:-1])}' is a list of length "
                f"{len(node)}; '{parts[-1]}' is not one of its indices",
                file=source.file,
            )
        if not isinstance(node, (dict, list)):
            raise SpecError(
                f"bad override '{override}': '{'.'.join(parts[:-1])}' is a value ({_got(node)}), not "
                f"a mapping",
                file=source.file,
            )
    # set it, creating the mappings of a new subtree; a mapping with another `kind` replaces the
    # old variant, otherwise mappings merge
    node = cfg
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    last: Any = int(parts[-1]) if isinstance(node, list) else parts[-1]
    existing = node[last] if isinstance(node, list) or last in node else None
    switch = (isinstance(value, dict) and isinstance(existing, dict)
              and "kind" in value and existing.get("kind") != value["kind"])
    node[last] = copy.deepcopy(value) if switch else _merge(existing, value)


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


def _got(value: Any) -> str:
    """A value read from the spec, as an error quotes it: short and escaped."""
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return excerpt(repr(value) if isinstance(value, str) else value, 40)


def _describe(err: dict, data: Any, root: Any) -> tuple[list[str | int], str]:
    kind = err["type"]
    path, parent = _clean_loc(err["loc"], data, keep_last=kind in ("missing", "extra_forbidden"))
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        key = path[-1]
        allowed = _fields_at(root, path[:-1], parent)
        hint = did_you_mean(str(key), allowed)
        return path, f"unknown key '{excerpt(key)}'{hint or ''}" + (
            "" if hint else f" (allowed: {', '.join(sorted(allowed))})"
        )
    if kind == "missing":
        return path, f"missing required key '{excerpt(path[-1])}'"
    if kind == "union_tag_invalid":
        expected = _quote_list(ctx.get("expected_tags", ""))
        tag = ctx.get("tag")
        hint = did_you_mean(str(tag), expected)
        path = path + ["kind"] if isinstance(value, dict) and "kind" in value else path
        return path, f"unknown kind '{excerpt(tag)}' (expected {', '.join(expected)}){hint}"
    if kind == "union_tag_not_found":
        return path, "missing 'kind'; say which variant this is"
    if kind == "literal_error":
        expected = _quote_list(ctx.get("expected", ""))
        hint = did_you_mean(str(value), expected)
        return path, f"expected one of {', '.join(expected)}, got {_got(value)}{hint}"
    if kind == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return path, _CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], msg)[:400]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path, f"expected a mapping, got {_got(value)}"
    if kind == "list_type":
        return path, f"expected a list, got {_got(value)}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return path, f"expected an integer, got {_got(value)}"
    if kind in ("float_parsing", "float_type"):
        return path, f"expected a number, got {_got(value)}"
    if kind in ("bool_parsing", "bool_type"):
        return path, f"expected true or false, got {_got(value)}"
    if kind in ("string_type",):
        return path, f"expected a string, got {_got(value)}"
    if kind == "finite_number":
        return path, f"expected a finite number, got {_got(value)}; NaN and infinity are refused"
    if kind.startswith(("greater", "less")):
        return path, f"{err['msg'][0].lower()}{err['msg'][1:]}, got {_got(value)}"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return path, f"needs at least {n} entr{'y' if n == 1 else 'ies'}, got {ctx.get('actual_length', 0)}"
    if kind == "too_long":
        return path, f"{err['msg'][0].lower()}{err['msg'][1:]}"
    return path, f"{err['msg']} (got {_got(value)})"


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


def load_raw(
    source: Any,
    overrides: Iterable[str] = (),
    *,
    allow_includes_from: Iterable[str | os.PathLike] | None = None,
    limits: Limits | None = None,
) -> tuple[dict, SpecSource]:
    """Read, compose, override and interpolate a spec into a plain dict (no validation).

    ``allow_includes_from`` and ``limits`` add to / replace those of the enclosing
    :func:`load_options` block (see :func:`load_spec`)."""
    opts = _options(allow_includes_from, limits)
    overrides = [str(o) for o in overrides]
    info = SpecSource(overrides=overrides)
    if isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
        _check_interpolations(data, None, None)
        cfg = _compose_includes(data, None, None, None, info, (), opts, None)
    elif isinstance(source, str) and "\n" in source:
        info.text = source
        cfg = _parse_yaml(source, None, opts.limits)
        if not isinstance(cfg, dict) or len(cfg) == 0:
            raise SpecError("a spec must be a non-empty mapping with 'levels' and 'model'")
        cfg = _compose_includes(cfg, source, None, None, info, (), opts, None)
    else:
        path = resolve_source(source)
        cfg = _read_composed(path, info, (), opts, _real(path.parent))
    for ov in overrides:
        _apply_override(cfg, ov, info)
    raw = _Resolver(cfg, info, opts.limits).run()
    _check_plain(raw, info)
    if isinstance(raw, dict) and isinstance(raw.get("levels"), dict):
        # `levels.<name>: null` in an including file (or an override) removes an included level
        raw["levels"] = {k: v for k, v in raw["levels"].items() if v is not None}
    return raw, info


def load_spec(
    source: Any,
    overrides: Iterable[str] = (),
    *,
    allow_includes_from: Iterable[str | os.PathLike] | None = None,
    limits: Limits | None = None,
) -> Spec:
    """Load and validate a spec.

    Args:
        source: a path to a YAML file, a library short name (``"hope"``), YAML text, a mapping,
            or an already validated :class:`Spec` (returned as is when there are no overrides).
        overrides: ``"dotted.key=value"`` strings applied after includes, before interpolation.
        allow_includes_from: trusted folders whose files includes may name (by absolute path
            too); by default an include stays inside the spec's folder or names a library spec or
            fragment. Adds to the folders of an enclosing :func:`load_options` block.
        limits: bounds on file size, YAML nodes and nesting (default: those of the enclosing
            :func:`load_options` block, else :class:`~nlgraph.limits.Limits()`).

    Returns:
        The frozen, validated :class:`Spec`.

    Raises:
        SpecError: one line naming the file, line and YAML path of the first problem.
    """
    if isinstance(source, Spec):
        if not overrides:
            return source
        source = dump_spec(source, as_dict=True)
    raw, info = load_raw(source, overrides, allow_includes_from=allow_includes_from, limits=limits)
    return validate_raw(raw, info)


def validate_raw(raw: dict, source: SpecSource) -> Spec:
    """Validate the plain dict of :func:`load_raw`; errors are located through ``source``
    (``load_spec(src) == validate_raw(*load_raw(src))``, reading the files once)."""
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        raise validation_error(e, raw, source) from None


def load_resolved_spec(text: str | bytes, *, file: str | None = None, limits: Limits | None = None) -> Spec:
    """Load a *resolved* spec — what :func:`dump_spec` writes and a checkpoint stores — from its
    YAML text.

    Unlike :func:`load_spec`, the input is always YAML text (never a path or a library name, even
    without a newline) and it may have no ``include`` and no live ``${…}``: a resolved spec has
    none, so either means the text was altered. Every other rule of a spec applies (size and node
    bounds, safe YAML, NaN refused ...). ``file`` names the text's origin in errors.

    Raises:
        SpecError: one line naming ``file``, the line and YAML path of the first problem.
    """
    opts = _options(None, limits)
    if isinstance(text, (bytes, bytearray)):
        if len(text) > opts.limits.max_spec_bytes:
            raise SpecError(f"the spec is {format_bytes(len(text))}, over the "
                            f"{format_bytes(opts.limits.max_spec_bytes)} limit", file=file)
        text = _decode(bytes(text), file)
    info = SpecSource(file=file, text=text)
    data = _top_mapping(_parse_yaml(text, file, opts.limits), file)
    if INCLUDE_KEY in data:
        raise SpecError("a resolved spec has no includes; the text was altered or is not a resolved "
                        "spec (nlgraph.dump_spec)", file=file, path=INCLUDE_KEY,
                        line=_line_of(text, [INCLUDE_KEY]))
    for path, v in _walk(data):
        if isinstance(v, str) and any(not escaped for *_, escaped in _interpolations(v)):
            raise SpecError("a resolved spec has no interpolations; the text was altered or is not a "
                            "resolved spec (nlgraph.dump_spec)", file=file,
                            path=_dotted(path) or None, line=_line_of(text, path))
    raw = _Resolver(data, info, opts.limits).run()  # only un-escapes literal \${
    _check_plain(raw, info)
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        raise validation_error(e, raw, info) from None


def load_level(source: Any) -> Any:
    """Validate one level entry (mapping, YAML text or spec object) on its own, e.g. for
    ``nlgraph.run_level``."""
    if isinstance(source, BaseModel):
        return source
    info = SpecSource(text=source if isinstance(source, str) else None)
    if isinstance(source, str):
        raw = _parse_yaml(source, None)
    else:
        raw = dict(source)
    raw = _Resolver(raw, info, _OPTIONS.get().limits).run()
    _check_plain(raw, info)
    try:
        return TypeAdapter(LevelEntry).validate_python(raw)
    except ValidationError as e:
        raise validation_error(e, raw, info, root=LevelEntry) from None


def dump_spec(spec: Spec, *, as_dict: bool = False, exclude_defaults: bool = False) -> Any:
    """The spec as YAML text (or a plain dict): every default filled in unless
    ``exclude_defaults``; ``load_spec(dump_spec(s)) == s``, from any folder: the dump has no
    includes and no interpolations (a literal ``${`` in a string is written escaped, ``\\${``)."""
    data = spec.model_dump(mode="json", by_alias=True, exclude_defaults=exclude_defaults)
    if exclude_defaults:
        # `kind` tags carry the variant even when they equal a default
        data = _restore_kinds(spec, data)
    data = _escape_interpolations(data)
    if as_dict:
        return data
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)


def _escape_interpolations(data: Any) -> Any:
    if isinstance(data, str):
        return data.replace("${", "\\${")
    if isinstance(data, dict):
        return {k: _escape_interpolations(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_escape_interpolations(v) for v in data]
    return data


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
