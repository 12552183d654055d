"""Stage 2 of the pipeline: the level graph (networkx) and its checks.

Nodes are levels and modules of one copy of ``model.blocks`` (``model.repeat`` stacks it):

* ``embed`` and ``head`` (modules trained by the outer loop),
* ``b<i>.<level>`` for every entry of block ``i`` (``level``, ``attention`` or ``chain``),
* ``b<i>.<chain>[<j>]`` for the links of a chain,
* ``b<i>.<level>.adaptive.<name>`` for adaptive projections (memories updated in context),
* ``b<i>.<level>.optimizer`` (and deeper ``.optimizer``) for optimizers that are levels.

Edges carry a ``role``: ``stream`` (the residual stream order), ``reads`` (a stream or gate takes
another node's output; ``via`` names which), ``part_of`` (a chain link or adaptive projection of
its level) and ``optimizes`` (a nested optimizer level → the level it updates).

Checks, each failing with one :class:`~nlgraph.errors.GraphError` that names the nodes and YAML
path: unknown references, reads from the future (cycles), dimension mismatches, frequency rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import networkx as nx

from .errors import GraphError, did_you_mean
from .spec.loader import SpecSource, load_raw, load_spec, spec_hash
from .spec.schema import (
    AttentionSpec,
    ChainSpec,
    DeltaRuleSpec,
    LinearAttentionSpec,
    MemoryContextSpec,
    ParallelSpec,
    DeepMomentumSpec,
    GateSpec,
    LevelSpec,
    LinearMemorySpec,
    MlpMemorySpec,
    OptimizerLevelSpec,
    ResidualMlpMemorySpec,
    Spec,
    StreamSpec,
    in_context_outer_problem,
)

__all__ = ["GROUP_KINDS", "build_graph", "format_period", "group_size", "level_order", "period"]

GROUP_KINDS = ("chain", "parallel", "memory_context")
"""Node kinds that only group other level nodes (drawn as frames, not run on their own)."""

NEVER = math.inf


def group_size(node: dict) -> int:
    """How many member nodes (``<id>[j]``) a group node (chain, parallel, memory_context) has."""
    spec = node["spec"]
    if isinstance(spec, ChainSpec):
        return len(spec.levels)
    return len(spec.branches) if isinstance(spec, ParallelSpec) else 2


def period(frequency: int | str) -> float:
    """Update period in tokens as a number (``never`` → ``inf``)."""
    return NEVER if frequency == "never" else float(frequency)


def format_period(frequency: int | str | None) -> str:
    """Human text for a frequency field."""
    if frequency is None:
        return "in context"
    if frequency == "never":
        return "outer loop"
    return "every token" if frequency == 1 else f"every {frequency} tokens"


# --------------------------------------------------------------------------- widths


def _memory_io(memory: Any, width_in: int, where: str, path: str) -> tuple[int, int, int]:
    """(heads, input width per head, output width per head) of a memory fed ``width_in``."""
    heads = memory.heads
    if isinstance(memory, LinearMemorySpec):
        d_in, d_out = memory.d_key, memory.d_value
    elif isinstance(memory, MlpMemorySpec):
        d_in, d_out = memory.d_in, memory.d_out
    else:
        d_in = d_out = None
    if d_in is None or (d_out is None and not isinstance(memory, MlpMemorySpec)):
        if width_in % heads:
            raise GraphError(
                f"dimension mismatch: the input width {width_in} is not divisible by "
                f"heads={heads}; change heads or set the per-head width explicitly",
                nodes=[where],
                path=f"{path}.memory.heads",
            )
    d_in = d_in if d_in is not None else width_in // heads
    if d_out is None:
        d_out = d_in if isinstance(memory, MlpMemorySpec) else width_in // heads
    if isinstance(memory, ResidualMlpMemorySpec):
        d_out = d_in
    return heads, d_in, d_out


# --------------------------------------------------------------------------- builder


class _Builder:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.d = spec.model.d_model
        self.g = nx.DiGraph(
            name=spec.name or "spec",
            hash=spec_hash(spec),
            repeat=spec.model.repeat,
            d_model=self.d,
            vocab=spec.model.vocab,
        )

    # -- helpers
    def node(self, nid: str, **attrs: Any) -> None:
        self.g.add_node(nid, **attrs)

    def edge(self, a: str, b: str, role: str, **attrs: Any) -> None:
        self.g.add_edge(a, b, role=role, **attrs)

    def build(self) -> nx.DiGraph:
        spec, g = self.spec, self.g
        self.node("embed", kind="embed", label="embed", frequency="never", path="model.vocab",
                  block=None, order=-1)
        prev = "embed"
        order = 0
        used = self.used = set()
        for b, block in enumerate(spec.model.blocks):
            names = {}
            for j, name in enumerate(block):
                bpath = f"model.blocks[{b}][{j}]"
                if name not in spec.levels:
                    raise GraphError(
                        f"unknown level '{name}' (defined: {', '.join(spec.levels)})"
                        f"{did_you_mean(name, spec.levels)}",
                        nodes=[f"b{b}.{name}"],
                        path=bpath,
                    )
                if name in names:
                    raise GraphError(
                        f"level '{name}' appears twice in block {b}; give the second copy its own "
                        f"name (levels are keyed by name inside a block)",
                        nodes=[f"b{b}.{name}"],
                        path=bpath,
                    )
                nid = f"b{b}.{name}"
                names[name] = nid
                used.add(name)
                self.add_entry(nid, name, spec.levels[name], b, order)
                self.edge(prev, nid, "stream")
                prev, order = nid, order + 1
            for name, nid in names.items():
                self.wire_reads(nid, name, spec.levels[name], names, b)
        self.node("head", kind="head", label="head", frequency="never", path="model",
                  block=None, order=order)
        self.edge(prev, "head", "stream")
        g.graph["unused"] = [n for n in spec.levels if n not in used]
        self.check_cycles()
        return g

    # -- nodes
    def add_entry(self, nid: str, name: str, entry: Any, b: int, order: int) -> None:
        path = f"levels.{name}"
        if isinstance(entry, AttentionSpec):
            heads = entry.heads
            d_head = entry.d_head or (self.d // heads)
            if entry.d_head is None and self.d % heads:
                raise GraphError(
                    f"dimension mismatch: d_model={self.d} is not divisible by heads={heads}; "
                    f"set d_head explicitly",
                    nodes=[nid],
                    path=f"{path}.heads",
                )
            kv = entry.kv_heads or heads
            for role in ("keys", "values", "queries"):
                self.check_stream(nid, path, role, getattr(entry, role),
                                  (kv if role != "queries" else heads) * d_head)
            self.node(nid, kind="attention", label=name, frequency=None, path=path, block=b,
                      order=order, spec=entry, heads=heads, d_head=d_head,
                      family="sliding-window attention" if entry.window else "softmax attention")
            return
        if isinstance(entry, (LinearAttentionSpec, DeltaRuleSpec)):
            heads = entry.heads
            if (entry.d_key is None or entry.d_value is None) and self.d % heads:
                raise GraphError(
                    f"dimension mismatch: d_model={self.d} is not divisible by heads={heads}; "
                    f"set d_key and d_value explicitly",
                    nodes=[nid],
                    path=f"{path}.heads",
                )
            d_in, d_out = entry.d_key or self.d // heads, entry.d_value or self.d // heads
            widths = {"keys": heads * d_in, "values": heads * d_out, "queries": heads * d_in}
            for role in ("keys", "values", "queries"):
                self.check_stream(nid, path, role, getattr(entry, role), widths[role])
            self.node(nid, kind=entry.kind, label=name, frequency=1, path=path, block=b,
                      order=order, spec=entry, heads=heads, d_in=d_in, d_out=d_out, widths=widths)
            return
        if isinstance(entry, (ParallelSpec, MemoryContextSpec)):
            self.add_group(nid, name, entry, b, order, path)
            return
        if isinstance(entry, ChainSpec):
            self.node(nid, kind="chain", label=name, frequency=None, path=path, block=b,
                      order=order, spec=entry)
            last = None
            for j, link in enumerate(entry.levels):
                lid = f"{nid}[{j}]"
                lpath = f"{path}.levels[{j}]"
                self.add_level(lid, f"{name}[{j}]", link, b, order, lpath)
                self.edge(lid, nid, "part_of")
                if last is not None:
                    self.edge(last, lid, "stream")
                    if entry.order == "increasing" and period(link.frequency) < period(
                        entry.levels[j - 1].frequency
                    ):
                        raise GraphError(
                            f"frequency rule: chain periods must not decrease "
                            f"({format_period(entry.levels[j - 1].frequency)} then "
                            f"{format_period(link.frequency)}); reorder the links fastest first, "
                            f"or set order: any",
                            nodes=[last, lid],
                            path=f"{lpath}.frequency",
                        )
                last = lid
            self.g.nodes[nid]["periods"] = [lv.frequency for lv in entry.levels]
            return
        self.add_level(nid, name, entry, b, order, path)

    def group_members(self, entry: Any) -> list[tuple[str, str]]:
        """``(role path below the group, level name)`` of the levels a group runs."""
        if isinstance(entry, ParallelSpec):
            return [(f"branches[{j}]", n) for j, n in enumerate(entry.branches)]
        return [("memory", entry.memory), ("attention", entry.attention)]

    def add_group(self, nid: str, name: str, entry: Any, b: int, order: int, path: str) -> None:
        self.node(nid, kind=entry.kind, label=name, frequency=None, path=path, block=b, order=order,
                  spec=entry)
        levels = self.spec.levels
        for j, (role, member) in enumerate(self.group_members(entry)):
            where = f"{path}.{role}"
            if member not in levels:
                raise GraphError(
                    f"unknown level '{member}' (defined: {', '.join(levels)}){did_you_mean(member, levels)}",
                    nodes=[nid],
                    path=where,
                )
            if member == name:
                raise GraphError(f"'{name}' lists itself; name the levels it groups", nodes=[nid], path=where)
            sub = levels[member]
            allowed = self.group_rule(entry, role, sub)
            if allowed is not None:
                noun = "branch" if isinstance(entry, ParallelSpec) else role
                raise GraphError(f"'{member}' cannot be the {noun} of a "
                                 f"{entry.kind}: {allowed}", nodes=[nid, f"{nid}[{j}]"], path=where)
            self.used.add(member)
            self.add_entry(f"{nid}[{j}]", member, sub, b, order)
            self.g.nodes[f"{nid}[{j}]"]["label"] = f"{name}.{member}"
            self.edge(f"{nid}[{j}]", nid, "part_of")

    @staticmethod
    def group_rule(entry: Any, role: str, sub: Any) -> str | None:
        """Why ``sub`` cannot fill ``role`` of the group ``entry`` (``None``: it can)."""
        if isinstance(sub, (ChainSpec, ParallelSpec, MemoryContextSpec)):
            return f"it is a {sub.kind}; groups hold single levels"
        if isinstance(entry, ParallelSpec):
            return None
        if role == "attention":
            if not isinstance(sub, AttentionSpec):
                return "it must be a kind: attention level"
            if sub.window is not None:
                return "attention stays inside a segment; remove its window"
            if any(getattr(sub, r).from_ != "input" for r in ("keys", "values", "queries")):
                return "its keys, values and queries must come from input (the segment and h)"
            return None
        if not isinstance(sub, LevelSpec) or sub.objective.kind == "outer":
            return "it must be a parametric level (memory, objective, optimizer)"
        if sub.adaptive or any(getattr(sub, r).from_ != "input" for r in ("keys", "values", "queries")):
            return "its keys, values and queries must come from input (the attention output)"
        return None

    def add_level(self, nid: str, label: str, lv: LevelSpec, b: int, order: int, path: str) -> None:
        d = self.d
        heads, d_in, d_out = _memory_io(lv.memory, d, nid, path)
        if lv.objective.kind == "outer":
            if heads * d_in != d or heads * d_out != d:
                raise GraphError(
                    f"dimension mismatch: an 'outer' level maps the {d}-wide stream to itself, but "
                    f"its memory is {heads}x{d_in} -> {heads}x{d_out}; drop d_in/d_out or match "
                    f"d_model",
                    nodes=[nid],
                    path=f"{path}.memory",
                )
        if lv.objective.kind == "outer" and lv.frequency != "never" and lv.objective.updates == "in_context":
            problem = in_context_outer_problem(lv)
            if problem is not None:
                raise GraphError(problem[0], nodes=[nid], path=f"{path}.{problem[1]}")
        widths = {"keys": heads * d_in, "values": heads * d_out, "queries": heads * d_in}
        self.node(nid, kind="level", label=label, frequency=lv.frequency, path=path, block=b,
                  order=order, spec=lv, heads=heads, d_in=d_in, d_out=d_out, widths=widths)
        for aname, amem in lv.adaptive.items():
            aid = f"{nid}.adaptive.{aname}"
            apath = f"{path}.adaptive.{aname}"
            ah, ai, ao = _memory_io(amem, d, aid, apath.rsplit(".memory", 1)[0])
            if ah * ai != d:
                raise GraphError(
                    f"dimension mismatch: adaptive projection '{aname}' reads the {d}-wide level "
                    f"input but takes {ah}x{ai}; drop its explicit width or use {d}",
                    nodes=[aid, nid],
                    path=apath,
                )
            self.node(aid, kind="adaptive", label=f"{label}.{aname}", frequency=lv.frequency,
                      path=apath, block=b, order=order, spec=amem, out_width=ah * ao)
            self.edge(aid, nid, "part_of")
        if lv.objective.kind != "outer":
            for role in ("keys", "values", "queries"):
                self.check_stream(nid, path, role, getattr(lv, role), widths[role])
        self.add_optimizer(nid, label, lv, lv.optimizer, b, order, f"{path}.optimizer", d_in)

    def add_optimizer(self, nid: str, label: str, owner: Any, opt: Any, b: int, order: int,
                      path: str, key_width: int) -> None:
        if not isinstance(opt, DeepMomentumSpec):
            return
        inner: OptimizerLevelSpec = opt.level
        oid = f"{nid}.optimizer"
        mem = inner.memory
        explicit = getattr(mem, "d_in", None) or getattr(mem, "d_key", None)
        if explicit is not None and explicit != key_width:
            raise GraphError(
                f"dimension mismatch: the momentum memory reads gradient rows of width "
                f"{key_width} but declares {explicit}; drop the explicit width",
                nodes=[oid, nid],
                path=f"{path}.level.memory",
            )
        if period(inner.frequency) > period(owner.frequency):
            raise GraphError(
                f"frequency rule: an optimizer level must update at least as often as the level "
                f"it optimizes ({format_period(inner.frequency)} vs "
                f"{format_period(owner.frequency)}); lower its frequency",
                nodes=[oid, nid],
                path=f"{path}.level.frequency",
            )
        self.node(oid, kind="optimizer", label=f"{label}.optimizer", frequency=inner.frequency,
                  path=f"{path}.level", block=b, order=order, spec=inner)
        self.edge(oid, nid, "optimizes")
        self.add_optimizer(oid, f"{label}.optimizer", inner, inner.optimizer, b, order,
                           f"{path}.level.optimizer", key_width)

    def check_stream(self, nid: str, path: str, role: str, s: StreamSpec, need: int) -> None:
        if s.project:
            return
        src = s.from_
        if src.startswith("adaptive."):
            aid = f"{nid}.adaptive.{src.split('.', 1)[1]}"
            have = self.g.nodes[aid]["out_width"] if aid in self.g else None
        else:
            have = self.d  # the level input, its own output and other levels' outputs are d_model
        if have is not None and have != need:
            raise GraphError(
                f"dimension mismatch: {role} from '{src}' are {have} wide but the memory needs "
                f"{need}; set project: true or match the widths",
                nodes=[nid],
                path=f"{path}.{role}",
            )

    # -- reads
    def wire_reads(self, nid: str, name: str, entry: Any, block: dict[str, str], b: int) -> None:
        if isinstance(entry, ChainSpec):
            for j, link in enumerate(entry.levels):
                self.wire_level_reads(f"{nid}[{j}]", f"levels.{name}.levels[{j}]", link, block, b)
        elif isinstance(entry, (ParallelSpec, MemoryContextSpec)):
            for j, (_, member) in enumerate(self.group_members(entry)):
                self.wire_reads(f"{nid}[{j}]", member, self.spec.levels[member], block, b)
        elif isinstance(entry, (AttentionSpec, LinearAttentionSpec, DeltaRuleSpec)):
            for role, src in _sources(entry):
                self.wire_source(nid, f"levels.{name}.{role}", src, role, block, b, adaptive=())
        else:
            self.wire_level_reads(nid, f"levels.{name}", entry, block, b)

    def wire_level_reads(self, nid: str, path: str, lv: LevelSpec, block: dict[str, str],
                         b: int) -> None:
        adaptive = tuple(lv.adaptive)
        for role, src in _sources(lv):
            self.wire_source(nid, f"{path}.{role}", src, role, block, b, adaptive)

    def wire_source(self, nid: str, path: str, src: str, role: str, block: dict[str, str], b: int,
                    adaptive: Iterable[str]) -> None:
        if src == "input":
            return
        if src == "self":
            self.edge(nid, nid, "reads", via=role, previous=True)
            return
        if src.startswith("adaptive."):
            aname = src.split(".", 1)[1]
            if aname not in adaptive:
                declared = ", ".join(adaptive) or "none"
                raise GraphError(
                    f"unknown adaptive projection '{aname}' (declared: {declared}); add it under "
                    f"'adaptive' or read from input{did_you_mean(aname, adaptive)}",
                    nodes=[nid],
                    path=f"{path}.from",
                )
            self.edge(f"{nid}.adaptive.{aname}", nid, "reads", via=role)
            return
        if src not in self.spec.levels:
            raise GraphError(
                f"unknown reference '{src}' (a source is input, self, adaptive.<name> or a level "
                f"of the same block){did_you_mean(src, self.spec.levels)}",
                nodes=[nid],
                path=f"{path}.from",
            )
        if src not in block:
            raise GraphError(
                f"'{src}' is not in block {b} ({', '.join(block)}); a level can read only levels "
                f"of its own block",
                nodes=[nid, f"b{b}.{src}"],
                path=f"{path}.from",
            )
        if block[src] == nid.split("[")[0]:
            raise GraphError(
                f"cycle: '{src}' reads its own output at the same token; use from: self for its "
                f"previous output",
                nodes=[nid],
                path=f"{path}.from",
            )
        self.edge(block[src], nid, "reads", via=role)

    def check_cycles(self) -> None:
        flow = nx.DiGraph()
        for a, c, data in self.g.edges(data=True):
            if data["role"] in ("stream", "reads", "part_of") and a != c:
                flow.add_edge(a, c)
        try:
            cycle = nx.find_cycle(flow)
        except nx.NetworkXNoCycle:
            return
        nodes = [a for a, _ in cycle]
        chain = " -> ".join(nodes + [nodes[0]])
        reader = next(
            (c for a, c in cycle if self.g.edges[a, c]["role"] == "reads"), nodes[0]
        )
        via = next(
            (self.g.edges[a, c].get("via") for a, c in cycle if self.g.edges[a, c]["role"] == "reads"),
            None,
        )
        raise GraphError(
            f"cycle: {chain}; a level would read a value from its own future (a later level of "
            f"its block); read from input or an earlier level, or use 'self' for the previous "
            f"output",
            nodes=nodes,
            path=f"{self.g.nodes[reader]['path']}.{via}" if via else self.g.nodes[reader]["path"],
        )


def _sources(lv: Any) -> list[tuple[str, str]]:
    """``(YAML path below the entry, source)`` of every stream and gate of an entry."""
    out = [(role, getattr(lv, role).from_) for role in ("keys", "values", "queries")]
    if not isinstance(lv, LevelSpec):
        rates = {name: getattr(lv, name, None) for name in ("beta", "decay")}
        return out + [(n, g.from_) for n, g in rates.items() if isinstance(g, GateSpec)]
    gates = {
        "optimizer.lr": getattr(lv.optimizer, "lr", None),
        "optimizer.momentum": getattr(lv.optimizer, "momentum", None),
        "retention.gate": lv.retention.gate if lv.retention else None,
        "objective.delta": getattr(lv.objective, "delta", None),
    }
    out += [(role, g.from_) for role, g in gates.items() if isinstance(g, GateSpec)]
    return out


def level_order(graph: nx.DiGraph) -> list[str]:
    """Node ids in a deterministic data-flow order (ties broken by name)."""
    flow = nx.DiGraph()
    flow.add_nodes_from(graph.nodes)
    flow.add_edges_from((a, c) for a, c, r in graph.edges(data="role") if a != c)
    return list(nx.lexicographical_topological_sort(flow, key=lambda n: (graph.nodes[n]["order"], n)))


def build_graph(spec: Any, overrides: Iterable[str] = ()) -> nx.DiGraph:
    """Build and check the level graph of a spec.

    Args:
        spec: a validated :class:`~nlgraph.spec.schema.Spec`, or anything
            :func:`~nlgraph.load_spec` accepts (path, library name, YAML text, mapping).
        overrides: ``key=value`` strings, when ``spec`` is not already validated.

    Returns:
        A ``networkx.DiGraph``; ``graph.graph`` holds ``name``, ``hash``, ``repeat``,
        ``d_model``, ``vocab`` and ``unused`` (levels defined but not in any block).

    Raises:
        SpecError: the spec does not load or validate.
        GraphError: an unknown reference, a cycle, a dimension mismatch or a frequency rule.
    """
    source = None
    if not isinstance(spec, Spec):
        raw, source = load_raw(spec, overrides)
        spec = load_spec(raw) if not source.file else _validate_with(raw, source)
    elif overrides:
        spec = load_spec(spec, overrides)
    try:
        return _Builder(spec).build()
    except GraphError as e:
        if source is not None and e.path and e.file is None:
            parts = _split_path(e.path)
            file, line, override = source.locate(parts)
            msg = e.message + (f" (set by override '{override}')" if override else "")
            raise GraphError(msg, nodes=e.nodes, path=e.path, file=file, line=line) from None
        raise


def _validate_with(raw: dict, source: SpecSource) -> Spec:
    from pydantic import ValidationError

    from .spec.loader import validation_error

    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        raise validation_error(e, raw, source) from None


def _split_path(path: str) -> list[str | int]:
    out: list[str | int] = []
    for part in path.replace("]", "").replace("[", ".").split("."):
        if part:
            out.append(int(part) if part.isdigit() else part)
    return out
