"""Stages 3–5 of the pipeline: passes over the checked level graph, the execution plan, and lowering
to a (optionally ``torch.compile``d) :class:`~nlgraph.model.NLModel`.

    load_spec → build_graph → plan (infer shapes, recognise families, choose forms) → NLModel
    → torch.compile per block (fullgraph)

The plan is the one place a level's execution form is decided: :func:`plan` asks the form registry
(:func:`nlgraph.compilers.select_form`) once per level for the target device, records the answer in
:attr:`LevelPlan.execution`, and :class:`~nlgraph.model.NLModel` builds every runtime level with that
form. A backend that registers a form for a level family is therefore picked up by the plan, the
model and ``nlgraph compile`` alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import NLGraphError, did_you_mean
from .families import recognise
from .graph import GROUP_KINDS, _sources, build_graph, format_period, level_order
from .model import NLModel
from .limits import check_model_size
from .spec.loader import current_options, load_spec
from .spec.schema import Spec

__all__ = ["LevelPlan", "Plan", "PlanError", "build", "plan"]

# graph node kinds whose level the runtime runs (MemoryLevel / ClosedFormLevel); an `outer` level
# among them is an MLP of the outer loop instead and has no execution form
RUNTIME_KINDS = ("level", "linear_attention", "delta_rule")


class PlanError(NLGraphError):
    """A requested execution form (``forms=`` of :func:`plan` / :func:`build`) names no level the
    runtime runs, or the form registry refuses it for that level. ``path`` is ``forms.<level>``."""


@dataclass(frozen=True)
class LevelPlan:
    """How one graph node is executed: its family, execution form and shapes.

    Attributes:
        node: the graph node (``b0.memory``, ``b0.cms[1]``, ``b0.mac[0]``).
        family: the recognised family (``Titans (LMM)``, ``MLP``, ...).
        form: the display label of the form (``triton``, ``chunked``, ``static mlp``, ``sdpa``, ...).
        frequency, shapes: display strings.
        level: the level's key below ``levels`` in the spec: its name, or ``<chain>.levels[j]`` for
            a chain link (a level used by several blocks or groups has one key, and one form).
        execution: for a level the runtime runs (a parametric level updated in context, a
            ``linear_attention`` or ``delta_rule``), the registry form it is built with, a name
            :func:`~nlgraph.runtime.run_level` accepts (``"triton"``, ``"chunked"``, ``"reference"``); ``None``
            for attention, static and in-context MLPs, groups and parts of levels.
        compiles: whether ``torch.compile`` traces the execution form (:attr:`nlgraph.compilers.Form.compiles`):
            ``False`` for a form measured slower compiled than eager, which a compiled block runs
            eagerly (its label says so).
    """

    node: str
    family: str
    form: str
    frequency: str
    shapes: str
    level: str = ""
    execution: str | None = None
    compiles: bool = True


@dataclass(frozen=True)
class Plan:
    """The execution plan of a spec: one :class:`LevelPlan` per level node, in data-flow order.

    ``device`` (a device type) and ``dtype`` (the parameters' dtype; ``None``: not given) are the
    target the forms were chosen for; ``forced`` the ``forms=`` it was asked for, as
    ``((level key, form), ...)``, so the plan can be made again for another target."""

    spec: Spec
    levels: tuple[LevelPlan, ...]
    hash: str
    device: str = "cpu"
    dtype: torch.dtype | None = None
    forced: tuple[tuple[str, str], ...] = ()
    declined_forms: tuple[tuple[str, str, str], ...] = ()

    def executions(self) -> dict[str, str]:
        """``{level key: execution form}`` for every level the runtime runs (see
        :class:`LevelPlan`): what :class:`~nlgraph.model.NLModel` builds each level with."""
        return {lv.level: lv.execution for lv in self.levels if lv.execution is not None}

    def declined(self) -> list[tuple[str, str, str]]:
        """``(level key, form, why)`` for every registered form ranked above the one a level got
        that refused it on this plan's target (a kernel switched off, a shape it does not take), so
        a user sees what would run faster and why it does not. Levels forced by ``forms=`` are
        left out."""
        return list(self.declined_forms)

    def render(self, model: NLModel | None = None) -> str:
        """A table of the plan; with ``model``, parameter counts per node and in total."""
        params = _params_by_node(model) if model is not None else {}
        header = ["node", "family", "form", "frequency", "shapes"] + (["params"] if model else [])
        rows = []
        for lv in self.levels:
            row = [lv.node, lv.family, lv.form, lv.frequency, lv.shapes]
            if model is not None:
                row.append(f"{params.get(lv.node, 0):,}")
            rows.append(row)
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
        if model is not None:
            total = sum(p.numel() for p in model.parameters())
            out.append(f"parameters: {total:,} in all (per block instance above; embedding "
                       f"{model.embed.weight.numel():,}, x{self.spec.model.repeat} repeat)")
        return "\n".join(out)


def _params_by_node(model: NLModel) -> dict[str, int]:
    """Parameters of each entry of the first block instance, keyed like graph nodes."""
    out: dict[str, int] = {}
    for b, names in enumerate(model.spec.model.blocks):
        block = model.blocks[b]
        for name in names:
            mod = block.entries[name]
            out[f"b{b}.{name}"] = sum(p.numel() for p in mod.parameters())
            inner = getattr(mod, "inner", mod)
            members = getattr(inner, "links", None)
            if members is None and hasattr(inner, "branches"):
                members = list(inner.branches.values())
            if members is None and hasattr(inner, "segment"):
                members = [inner.memory, inner.attention]
            for j, member in enumerate(members or []):
                out[f"b{b}.{name}[{j}]"] = sum(p.numel() for p in member.parameters())
    return out


def _runs_in_runtime(node: dict) -> bool:
    """Whether the model runs this node's level with :func:`~nlgraph.runtime.run_level`."""
    return node["kind"] in RUNTIME_KINDS and not (
        node["kind"] == "level" and node["spec"].objective.kind == "outer")


def _declined(node: dict, execution: str, device: str, dtype: torch.dtype | None) -> list[tuple[str, str]]:
    """``(form, why)`` for each registered form ranked above ``execution`` that refuses the node's
    level on ``device`` in ``dtype``."""
    from .compilers import forms
    from .runtime import _family

    out = []
    for form in forms(_family(node["spec"])):
        if form.name == execution:
            break
        why = form.supports(node["spec"], device, dtype, head_dim=node.get("d_in"))
        if why is not None:
            out.append((form.name, why))
    return out


def _registered(spec: Any, execution: str):
    """The registry's :class:`~nlgraph.compilers.Form` named ``execution`` for the level ``spec``, or ``None``."""
    from .compilers import find_form
    from .runtime import _family

    return find_form(_family(spec), execution)


def _compiles(node: dict, execution: str) -> bool:
    """Whether ``torch.compile`` traces the node's execution form (its registration's ``compiles``)."""
    form = _registered(node["spec"], execution)
    return form is None or form.compiles


def _choose_execution(node: dict, key: str, device: str, dtype: torch.dtype | None, want: str) -> str:
    """The registry's form for the node's level on ``device`` in ``dtype``: the best supported one
    (``want == "auto"``) or ``want`` by name, refused with a :class:`PlanError` naming the level."""
    from .compilers import forms, select_form
    from .runtime import _family  # importing the runtime registers every built-in form

    spec = node["spec"]
    family = _family(spec)
    try:
        return select_form(family, spec, device, dtype, want=want, head_dim=node.get("d_in")).name
    except LookupError as e:
        names = ", ".join(f.name for f in forms(family))
        where = device + (f" in {str(dtype).removeprefix('torch.')}" if dtype is not None else "")
        raise PlanError(f"level '{key}' cannot run in form '{want}' on {where}: {e}; force another "
                        f"form of '{family}' ({names}) or drop forms['{key}'] to let the registry choose",
                        path=f"forms.{key}") from None


def _form_of(node: dict, execution: str | None, device: str) -> str:
    form = _entry_form(node, execution, device)
    if node["kind"] in RUNTIME_KINDS and any(src == "self" for _, src in _sources(node["spec"])):
        from .memory import self_read_chunk

        chunk = self_read_chunk(node["spec"])
        if chunk is not None:
            return f"{form}, {chunk} tokens at a time (reads its own previous output)"
        return f"{form}, token by token (reads its own previous output)"
    return form


def _entry_form(node: dict, execution: str | None, device: str) -> str:
    """The display label; for a runtime level, the plan's ``execution`` form (``triton (interpreted)``
    for the Triton form on the CPU, under ``NLGRAPH_KERNELS=interpret``)."""
    kind = node["kind"]
    if kind == "attention":
        return "sdpa (sliding window)" if node["spec"].window else "sdpa"
    if kind in GROUP_KINDS:
        return kind
    spec = node["spec"]
    if kind == "level" and spec.objective.kind == "outer":
        if spec.frequency == "never":
            return "static mlp"
        if spec.objective.updates == "outer_loop":
            return f"static mlp; the outer optimizer steps it every {spec.frequency} training tokens"
        order = ", second-order meta-gradient" if spec.objective.meta_gradient == "second_order" else ""
        life = ", persistent" if spec.lifetime == "persistent" else ""
        return (f"in context: commits every {spec.frequency} tokens "
                f"({spec.optimizer.kind}, {spec.objective.reduce}{order}{life})")
    if kind in ("adaptive", "optimizer"):
        return "with its level"
    assert execution is not None, f"runtime node {node} has no execution form"
    notes = ["interpreted"] if execution == "triton" and device == "cpu" else []
    form = _registered(spec, execution)
    note = form.describe(spec, device) if form is not None and form.describe is not None else None
    notes += [note] if note else []
    return f"{execution} ({'; '.join(notes)})" if notes else execution


def plan(spec: Any, overrides: tuple[str, ...] | list[str] = (), device: Any = None,
         forms: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> Plan:
    """Check the spec's graph and decide how every level node runs.

    Each level the runtime runs gets its execution form from the form registry
    (:func:`nlgraph.compilers.select_form`) for ``device`` (default: CPU) and ``dtype``, decided once
    per level key and recorded in :attr:`LevelPlan.execution`: on CUDA the (gated) delta rules get
    the ``triton`` form, elsewhere ``chunked`` where a parallel form exists, else ``reference``.

    Args:
        spec: a :class:`Spec`, a spec file, a library name, YAML text or a mapping.
        overrides: ``key=value`` strings applied to the spec first.
        device: the device the model will run on (``"cuda"``, ``torch.device``, ...).
        dtype: the parameters' dtype (``None``: any the forms take; the kernels refuse float64).
        forms: ``{level key: form name}`` forcing a registered form (``"reference"``, ``"chunked"``,
            ``"auto"``) for a level instead of the registry's best, e.g. ``{"memory": "reference"}``;
            a chain link's key is ``"<chain>.levels[j]"``.

    Raises:
        PlanError: a key of ``forms`` names no level the runtime runs, or the registry refuses the
            form for that level (one line naming ``forms.<level>`` and the reason).
    """
    spec = load_spec(spec, overrides)
    graph = build_graph(spec)
    forms = dict(forms or {})
    target = torch.device(device).type if device is not None else "cpu"
    chosen: dict[str, str] = {}  # level key -> execution: one decision per level
    declined: list[tuple[str, str, str]] = []
    levels = []
    for nid in level_order(graph):
        node = graph.nodes[nid]
        if node["kind"] in ("embed", "head"):
            continue
        entry = node.get("spec")
        entry_kinds = ("level", "attention", "linear_attention", "delta_rule", *GROUP_KINDS)
        family = recognise(entry) if node["kind"] in entry_kinds else node["kind"]
        if node["kind"] == "attention":
            shapes = f"{node['heads']} heads x {node['d_head']}"
            freq = "every token (in context)"
        elif node["kind"] in RUNTIME_KINDS:
            shapes = f"{node['heads']} heads, {node['d_in']} -> {node['d_out']}"
            freq = format_period(node["frequency"])
        else:
            shapes = ""
            freq = format_period(node.get("frequency")) if node["kind"] not in GROUP_KINDS else ""
        key = node["path"].removeprefix("levels.")
        execution = None
        if _runs_in_runtime(node):
            if key not in chosen:
                chosen[key] = _choose_execution(node, key, target, dtype, forms.get(key, "auto"))
                if key not in forms:
                    declined += [(key, *d) for d in _declined(node, chosen[key], target, dtype)]
            execution = chosen[key]
        compiles = execution is None or _compiles(node, execution)
        label = _form_of(node, execution, target) + ("" if compiles else ", eager in a compiled block")
        levels.append(LevelPlan(nid, family, label, freq, shapes, key, execution, compiles))
    unknown = [k for k in forms if k not in chosen]
    if unknown:
        known = ", ".join(sorted(chosen)) or "none"
        raise PlanError(f"no level '{unknown[0]}' is run with an execution form (levels that are: "
                        f"{known}){did_you_mean(unknown[0], chosen)}", path=f"forms.{unknown[0]}")
    return Plan(spec, tuple(levels), graph.graph["hash"], target, dtype, tuple(sorted(forms.items())),
                tuple(declined))


def build(
    spec: Any,
    *,
    compile: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    forms: Mapping[str, str] | None = None,
) -> NLModel:
    """Lower a spec, or a plan, to a model.

    Every level the runtime runs is built with its plan's execution form (:attr:`LevelPlan.execution`),
    chosen by the form registry for ``device``; ``forms`` forces one instead, e.g.
    ``build("titans", forms={"memory": "reference"})`` runs Titans' memory per token.

    Args:
        spec: a :class:`Spec`, a spec file, a library name, YAML text or a mapping; or a
            :class:`Plan` from :func:`plan`, built as it is (then without ``overrides`` or ``forms``).
        compile: compile every block with ``torch.compile(fullgraph=True)``; the uncompiled blocks
            stay in ``model.blocks`` (checkpoints and state dicts are unaffected).
        device, dtype: where and in which dtype to create the parameters; ``device`` is also the
            target the plan chooses forms for.
        overrides: ``key=value`` strings applied to the spec first.
        forms: ``{level key: form name}`` forcing execution forms (see :func:`plan`).

    Raises:
        PlanError: a forced form names no runtime level or cannot run its level.
        ResourceError: the model would exceed ``Limits.max_params`` or the memory of ``device``
            (raise them with :func:`nlgraph.spec.loader.load_options`).

    Returns:
        :class:`~nlgraph.model.NLModel` with ``model(tokens [B, T]) -> logits [B, T, vocab]`` and
        ``model.stream(tokens, state) -> (logits, state)``; ``model.plan`` is the plan it was built from.
    """
    if isinstance(spec, Plan):
        if overrides or forms:
            raise ValueError("build(plan) builds the plan as it is; pass overrides and forms to plan()")
        the_plan = spec
    else:
        # every graph check runs here, before any module is built
        the_plan = plan(spec, overrides, device=device, forms=forms, dtype=dtype or torch.get_default_dtype())
    # refuse a model too large for its device before allocating it (docs/security.md)
    check_model_size(the_plan.spec, device=device,
                     dtype_bytes=(dtype or torch.get_default_dtype()).itemsize,
                     limits=current_options().limits)
    model = NLModel(the_plan.spec, plan=the_plan)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    if compile:
        model.compile_blocks()
    return model
