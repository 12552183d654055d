"""Pictures of the level graph: nodes left to right in data-flow order, one horizontal band per
update frequency (fastest at the top, the outer loop at the bottom), so nesting and frequencies
read at a glance. ``.dot`` needs nothing; ``.png`` / ``.svg`` / ``.pdf`` need matplotlib (the
``viz`` extra)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import networkx as nx

from .families import describe_level, recognise
from .graph import GROUP_KINDS, format_period, group_size, period
from .io import atomic_write

__all__ = ["draw_graph", "to_dot"]

_EDGE_STYLE = {
    "stream": dict(color="#555555", style="solid", label=""),
    "reads": dict(color="#1f6fb4", style="solid", label="reads"),
    "part_of": dict(color="#888888", style="dotted", label=""),
    "optimizes": dict(color="#c0392b", style="dashed", label="optimizes"),
}


def _band(data: dict) -> float:
    """Sort key of a node's frequency band: period in tokens; attention is updated every token."""
    if data["kind"] == "attention":
        return 1.0
    if data["kind"] in GROUP_KINDS:
        return -1.0  # drawn as a frame, not a band member
    return period(data["frequency"])


def _band_label(p: float) -> str:
    if math.isinf(p):
        return "outer loop only"
    return "every token" if p == 1 else f"every {int(p)} tokens"


def _node_text(nid: str, data: dict) -> str:
    kind = data["kind"]
    if kind in ("embed", "head"):
        return data["label"]
    spec = data.get("spec")
    if kind == "adaptive":
        return f"{data['label']}\n{spec.kind} (adaptive)"
    if kind == "optimizer":
        return f"{data['label']}\n{spec.memory.kind} · {spec.objective.kind}\n{format_period(spec.frequency)}"
    d = describe_level(spec)
    fam = recognise(spec)
    if kind == "attention":
        return f"{data['label']}\n{fam}\n{d['memory']}"
    if kind in ("linear_attention", "delta_rule"):
        return f"{data['label']}\n{fam}\n{kind} (closed form)\n{format_period(data['frequency'])}"
    lines = [data["label"], fam if fam != "custom" else d["memory"].split(" (")[0]]
    lines.append(f"{spec.objective.kind} · {d['optimizer']}" + (f" · {d['retention']}" if d["retention"] != "-" else ""))
    lines.append(format_period(spec.frequency))
    return "\n".join(lines)


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text of the level graph, with one ``rank=same`` cluster per frequency."""
    g = graph.graph
    out = [
        "digraph nlgraph {",
        f'  label="{g["name"]}  (x{g["repeat"]} repeat, hash {g["hash"]})"; labelloc=t;',
        "  rankdir=LR; node [shape=box, style=rounded, fontname=Helvetica];",
    ]
    bands: dict[float, list[str]] = {}
    for nid, data in graph.nodes(data=True):
        if data["kind"] in GROUP_KINDS:
            continue
        bands.setdefault(_band(data), []).append(nid)
        text = _node_text(nid, data).replace("\n", "\\n").replace('"', "'")
        out.append(f'  "{nid}" [label="{text}"];')
    for i, (p, nodes) in enumerate(sorted(bands.items())):
        out.append(f'  subgraph cluster_f{i} {{ label="{_band_label(p)}"; style=dashed; '
                   + " ".join(f'"{n}";' for n in nodes) + " }")
    for a, b, data in graph.edges(data=True):
        if graph.nodes[a]["kind"] in GROUP_KINDS or graph.nodes[b]["kind"] in GROUP_KINDS:
            # stream edges into / out of a chain attach to its first / last link
            if data["role"] == "part_of":
                continue
            a = _chain_end(graph, a, last=True)
            b = _chain_end(graph, b, last=False)
        st = _EDGE_STYLE[data["role"]]
        label = data.get("via") or st["label"]
        out.append(f'  "{a}" -> "{b}" [color="{st["color"]}", style={st["style"]}'
                   + (f', label="{label}", fontsize=9' if label else "") + "];")
    out.append("}")
    return "\n".join(out) + "\n"


def _chain_end(graph: nx.DiGraph, nid: str, *, last: bool) -> str:
    if graph.nodes[nid]["kind"] not in GROUP_KINDS:
        return nid
    n = group_size(graph.nodes[nid])
    return f"{nid}[{n - 1 if last else 0}]"


def _layout(graph: nx.DiGraph) -> tuple[dict[str, tuple[float, float]], dict[float, tuple[float, float]], dict]:
    """Node centres, band extents ``{period: (y_top, y_bottom)}`` and chain frames."""
    from .graph import level_order

    members = [d for _, d in graph.nodes(data=True) if d["kind"] not in GROUP_KINDS]
    bands = sorted({_band(d) for d in members})
    # a band grows one sub-row for adaptive projections / nested optimizers placed under a level
    extra = {p: 0 for p in bands}
    for nid, d in graph.nodes(data=True):
        if d["kind"] in ("adaptive", "optimizer"):
            extra[_band(d)] = 1
    band_box, y = {}, 0.0
    for p in bands:
        h = 1.6 + 0.9 * extra[p]
        band_box[p] = (y, y - h)
        y -= h
    row_y = {p: top - 0.8 for p, (top, _) in band_box.items()}
    pos: dict[str, tuple[float, float]] = {}
    frames = {}
    x = 0.0
    for nid in level_order(graph):
        data = graph.nodes[nid]
        if data["kind"] in ("adaptive", "optimizer") or "[" in nid:
            continue
        if data["kind"] in GROUP_KINDS:
            n = group_size(data)
            for j in range(n):
                lid = f"{nid}[{j}]"
                pos[lid] = (x + 1.7 * j, row_y[_band(graph.nodes[lid])])
            frames[nid] = (x, x + 1.7 * (n - 1))
            x += 1.7 * n + 0.3
            continue
        kids = [k for k in graph.predecessors(nid) if graph.nodes[k]["kind"] in ("adaptive", "optimizer")]
        width = max(1, len(kids))
        cx = x + 0.75 * (width - 1)
        pos[nid] = (cx, row_y[_band(data)])
        for i, k in enumerate(kids):
            pos[k] = (x + 1.5 * i, row_y[_band(graph.nodes[k])] - (1.0 if _band(graph.nodes[k]) == _band(data) else 0.0))
            deeper = [o for o in graph.predecessors(k) if graph.nodes[o]["kind"] == "optimizer"]
            for depth, o in enumerate(deeper, 1):
                pos[o] = (x + 1.5 * i, row_y[_band(graph.nodes[o])] - 1.0)
        x += 1.5 * width + 0.5
    return pos, band_box, frames


def draw_graph(graph: nx.DiGraph, path: str | os.PathLike) -> Path:
    """Draw the level graph to ``path`` (``.dot``, ``.png``, ``.svg`` or ``.pdf``), written
    atomically (temporary file, then rename).

    Raises:
        ValueError: unknown extension.
        ImportError: matplotlib is missing for an image format.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".dot", ".png", ".svg", ".pdf"):
        raise ValueError(f"cannot draw to '{path.name}': use a .png, .svg, .pdf or .dot file")
    if suffix == ".dot":
        return atomic_write(path, to_dot(graph).encode())
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "drawing PNG/SVG/PDF needs matplotlib: pip install 'nlgraph[viz]' (or write a .dot file)"
        ) from None

    pos, band_box, frames = _layout(graph)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    fig_w = max(8.0, 1.25 * (max(xs) - min(xs) + 3.5))
    fig_h = max(4.0, 1.0 * (-min(y1 for _, y1 in band_box.values()) + 1.0))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    cmap = matplotlib.colormaps["viridis"]
    finite = [p for p in band_box if not math.isinf(p)]
    top = max(finite) if finite else 1.0

    def colour(p: float):
        if math.isinf(p):
            return "#d9d9d9"
        frac = 0.0 if top <= 1 else math.log(p) / math.log(top)
        return cmap(0.85 - 0.6 * frac)

    # frequency bands
    for i, (p, (y0, y1)) in enumerate(band_box.items()):
        ax.axhspan(y1, y0, color="#f2f2f2" if i % 2 else "white", zorder=0)
        ax.text(min(xs) - 1.3, (y0 + y1) / 2, _band_label(p), ha="right", va="center", fontsize=9,
                color="#444444", style="italic")
    # chain frames
    for nid, (x0, x1) in frames.items():
        links = [f"{nid}[{j}]" for j in range(group_size(graph.nodes[nid]))]
        ly = [pos[k][1] for k in links]
        ax.add_patch(FancyBboxPatch((x0 - 0.8, min(ly) - 0.6), x1 - x0 + 1.6, max(ly) - min(ly) + 1.2,
                                    boxstyle="round,pad=0.05", fill=False, ls="--", ec="#7f7f7f", zorder=1))
        ax.text(x0 - 0.75, max(ly) + 0.62, f"{graph.nodes[nid]['label']} ({recognise(graph.nodes[nid]['spec'])})",
                fontsize=8, color="#555555", va="bottom")
    # edges
    for a, b, data in graph.edges(data=True):
        if graph.nodes[a]["kind"] in GROUP_KINDS or graph.nodes[b]["kind"] in GROUP_KINDS:
            if data["role"] == "part_of":
                continue
            a, b = _chain_end(graph, a, last=True), _chain_end(graph, b, last=False)
        if a not in pos or b not in pos:
            continue
        st = _EDGE_STYLE[data["role"]]
        if a == b:
            x, y = pos[a]
            ax.annotate("", xy=(x + 0.35, y + 0.42), xytext=(x - 0.35, y + 0.42),
                        arrowprops=dict(arrowstyle="->", color=st["color"], connectionstyle="arc3,rad=-1.2"))
            continue
        rad = 0.25 if data["role"] == "reads" else (0.0 if data["role"] == "stream" else 0.1)
        arrow = FancyArrowPatch(pos[a], pos[b], arrowstyle="-|>", mutation_scale=11, color=st["color"],
                                ls={"solid": "-", "dashed": "--", "dotted": ":"}[st["style"]],
                                connectionstyle=f"arc3,rad={rad}", shrinkA=24, shrinkB=24, lw=1.1, zorder=2)
        ax.add_patch(arrow)
        label = data.get("via") or st["label"]
        if label and data["role"] != "part_of":
            # label near the source so labels of edges converging on one node do not collide
            mx, my = 0.7 * pos[a][0] + 0.3 * pos[b][0], 0.7 * pos[a][1] + 0.3 * pos[b][1]
            ax.text(mx, my, label, fontsize=6.5, color=st["color"], ha="center", zorder=6,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    # nodes
    for nid, (x, y) in pos.items():
        data = graph.nodes[nid]
        small = data["kind"] in ("adaptive", "optimizer")
        text = _node_text(nid, data)
        chars = max(len(line) for line in text.splitlines())
        w, h = (1.3, 0.5) if small else (max(1.5, 0.062 * chars), 0.95)
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04",
                                    fc=colour(_band(data)), ec="#333333", lw=0.9, zorder=4,
                                    alpha=0.55 if small else 0.9))
        ax.text(x, y, text, ha="center", va="center", fontsize=6.5 if small else 7.2,
                zorder=5, linespacing=1.15)
    g = graph.graph
    ax.set_title(f"{g['name']} — level graph (blocks x{g['repeat']}, d_model {g['d_model']}, "
                 f"hash {g['hash']})", fontsize=10)
    handles = [plt.Line2D([], [], color=s["color"], ls={"solid": "-", "dashed": "--", "dotted": ":"}[s["style"]],
                          label={"stream": "residual stream", "reads": "reads (stream / gate)",
                                 "part_of": "part of", "optimizes": "optimizer level of"}[r])
               for r, s in _EDGE_STYLE.items()]
    ax.legend(handles=handles, loc="lower right", fontsize=7, frameon=False)
    ax.set_xlim(min(xs) - 3.0, max(xs) + 1.2)
    ax.set_ylim(min(y1 for _, y1 in band_box.values()) - 0.1, 0.3)
    ax.axis("off")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format=suffix[1:]))
    finally:
        plt.close(fig)
