"""Hypothesis strategies that draw valid nlgraph specs (as plain dicts, the way YAML loads them).

Reusable by downstream projects: ``from nlgraph.testing.strategies import specs``. Every drawn spec
validates and builds a graph: heads divide ``d_model``, streams read only ``input``, ``self``,
declared adaptive projections or earlier levels of the same block, chunk sizes are multiples of
frequencies, optimizer levels update at least as often as the level they optimize, and chains
list non-decreasing periods.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

__all__ = ["gates", "level_entries", "levels", "rates", "specs"]

ACTS = ["identity", "sigmoid", "logsigmoid", "softplus", "exp", "tanh", "silu", "relu"]
PERIODS = [1, 2, 4, 16, 64, 256, "never"]


def _maybe(draw, key: str, strategy, out: dict) -> None:
    """Set ``out[key]`` half of the time, so defaults are exercised too."""
    if draw(st.booleans()):
        out[key] = draw(strategy)


@st.composite
def gates(draw, sources: list[str]) -> dict:
    g: dict[str, Any] = {"from": draw(st.sampled_from(sources))}
    _maybe(draw, "act", st.sampled_from(ACTS), g)
    _maybe(draw, "per", st.sampled_from(["scalar", "head", "channel"]), g)
    _maybe(draw, "scale", st.floats(0.01, 2.0), g)
    _maybe(draw, "bias", st.floats(-4.0, 4.0), g)
    return g


def rates(sources: list[str], lo: float = 0.0, hi: float = 1.0):
    return st.one_of(st.floats(lo, hi, allow_nan=False), gates(sources))


@st.composite
def memories(draw, heads: list[int], *, allow_linear: bool = True, same_width: bool = False) -> dict:
    kinds = ["mlp", "residual_mlp"] + (["linear"] if allow_linear else [])
    kind = draw(st.sampled_from(kinds))
    m: dict[str, Any] = {"kind": kind}
    _maybe(draw, "heads", st.sampled_from(heads), m)
    if kind in ("mlp", "residual_mlp"):
        _maybe(draw, "depth", st.integers(1, 3), m)
        _maybe(draw, "hidden", st.one_of(st.integers(1, 32), st.sampled_from(["1x", "2x", "4x", "0.5x"])), m)
        acts = ["gelu", "silu", "relu", "relu2", "tanh"] + (["swiglu", "geglu"] if kind == "mlp" else [])
        _maybe(draw, "activation", st.sampled_from(acts), m)
        _maybe(draw, "bias", st.booleans(), m)
    if kind == "linear" and not same_width:
        _maybe(draw, "d_key", st.integers(1, 16), m)
        _maybe(draw, "d_value", st.integers(1, 16), m)
    _maybe(draw, "init", st.sampled_from(["zeros", "learned"]), m)
    return m


def _le(a: Any, b: Any) -> bool:
    inf = float("inf")
    return (inf if a == "never" else a) <= (inf if b == "never" else b)


@st.composite
def optimizers(draw, sources: list[str], heads: list[int], frequency: Any, depth: int = 0) -> dict:
    kinds = ["gd", "momentum", "dgd", "adam", "muon"] + (["deep_momentum"] if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    o: dict[str, Any] = {"kind": kind}
    _maybe(draw, "lr", rates(sources, 0.0, 1.0), o)
    if kind == "momentum":
        _maybe(draw, "momentum", rates(sources), o)
        _maybe(draw, "nesterov", st.booleans(), o)
    elif kind == "dgd":
        _maybe(draw, "form", st.sampled_from(["explicit", "proximal"]), o)
        _maybe(draw, "momentum", st.one_of(st.none(), rates(sources)), o)
    elif kind == "adam":
        _maybe(draw, "betas", st.tuples(st.floats(0, 0.99), st.floats(0, 0.999)).map(list), o)
        _maybe(draw, "eps", st.floats(1e-10, 1e-3), o)
        _maybe(draw, "bias_correction", st.booleans(), o)
    elif kind == "muon":
        _maybe(draw, "momentum", st.floats(0, 0.99), o)
        _maybe(draw, "nesterov", st.booleans(), o)
        _maybe(draw, "ns_steps", st.integers(1, 6), o)
        _maybe(draw, "adjust_lr", st.sampled_from(["original", "match_rms_adamw", "none"]), o)
    elif kind == "deep_momentum":
        inner_freq = draw(st.sampled_from([p for p in PERIODS if _le(p, frequency)]))
        level: dict[str, Any] = {"memory": draw(memories(heads, allow_linear=False)), "frequency": inner_freq}
        _maybe(draw, "objective", st.sampled_from([{"kind": "dot"}, {"kind": "l2"}]), level)
        _maybe(draw, "optimizer", optimizers(["input"], heads, inner_freq, depth + 1), level)
        if "memory" in level:
            level["memory"].pop("d_in", None)
        o["level"] = level
    return o


@st.composite
def level_specs(draw, d_model: int, earlier: list[str], *, outer: bool | None = None) -> dict:
    heads = [h for h in (1, 2, 4) if d_model % h == 0]
    lv: dict[str, Any] = {}
    is_outer = draw(st.booleans()) if outer is None else outer
    frequency = draw(st.sampled_from(PERIODS))
    if is_outer:
        mem = draw(memories([1], allow_linear=False))
        mem.pop("heads", None)
        lv["memory"] = mem
        lv["objective"] = {"kind": "outer"}
    else:
        lv["memory"] = draw(memories(heads))
        lv["objective"] = draw(st.sampled_from([
            {"kind": "dot"}, {"kind": "l2"}, {"kind": "lp", "p": 3.0},
            {"kind": "huber", "delta": 1.0}, {"kind": "huber", "delta": {"from": "input"}},
        ]))
        adaptive_names = draw(st.lists(st.sampled_from(["k", "v", "eta", "alpha"]), unique=True, max_size=3))
        if adaptive_names:
            lv["adaptive"] = {n: {"kind": "residual_mlp", "hidden": "2x"} for n in adaptive_names}
        stream_sources = ["input", "self", *earlier, *[f"adaptive.{n}" for n in adaptive_names]]
        for role in ("keys", "values", "queries"):
            if draw(st.booleans()):
                s: dict[str, Any] = {"from": draw(st.sampled_from(stream_sources))}
                _maybe(draw, "norm", st.sampled_from(["none", "l2", "rms"]), s)
                _maybe(draw, "conv", st.integers(0, 4), s)
                _maybe(draw, "feature_map", st.sampled_from(["identity", "silu", "relu", "elu1"]), s)
                if role == "values":
                    _maybe(draw, "self_target", st.booleans(), s)
                lv[role] = s
        gate_sources = stream_sources
        _maybe(draw, "retention", st.fixed_dictionaries({
            "kind": st.sampled_from(["decay", "weight_decay"]), "gate": rates(gate_sources)}), lv)
        lv["optimizer"] = draw(optimizers(gate_sources, heads, frequency))
        _maybe(draw, "read", st.sampled_from(["after_write", "before_write"]), lv)
        _maybe(draw, "output", st.fixed_dictionaries({"norm": st.sampled_from(["none", "rms"]),
                                                       "gate": st.sampled_from(["none", "sigmoid", "silu"])}), lv)
    lv["frequency"] = frequency
    if frequency != "never" and draw(st.booleans()):
        lv["gradient_point"] = {"chunk": frequency * draw(st.integers(1, 4))}
    _maybe(draw, "lifetime", st.sampled_from(["sequence", "persistent"]), lv)
    return lv


@st.composite
def level_entries(draw, d_model: int, earlier: list[str]) -> dict:
    kind = draw(st.sampled_from(["level", "level", "attention", "chain", "linear_attention", "delta_rule"]))
    if kind in ("linear_attention", "delta_rule"):
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if d_model % h == 0]))
        c: dict[str, Any] = {"kind": kind, "heads": heads}
        sources = ["input", "self", *earlier]
        for role in ("keys", "values", "queries"):
            if draw(st.booleans()):
                s: dict[str, Any] = {"from": draw(st.sampled_from(sources))}
                _maybe(draw, "norm", st.sampled_from(["none", "l2", "rms"]), s)
                _maybe(draw, "conv", st.integers(0, 4), s)
                _maybe(draw, "feature_map", st.sampled_from(["identity", "silu", "elu1"]), s)
                c[role] = s
        if kind == "linear_attention":
            _maybe(draw, "normalize", st.booleans(), c)
        else:
            _maybe(draw, "beta", st.one_of(st.floats(0.05, 1.0), st.fixed_dictionaries(
                {"from": st.sampled_from(sources), "act": st.just("sigmoid"),
                 "per": st.sampled_from(["head", "scalar"])})), c)
            _maybe(draw, "decay", st.one_of(st.floats(0.5, 1.0), st.fixed_dictionaries(
                {"from": st.sampled_from(sources), "act": st.just("logsigmoid"),
                 "per": st.sampled_from(["head", "scalar"])})), c)
        return c
    if kind == "attention":
        heads = draw(st.sampled_from([h for h in (1, 2, 4, 8) if d_model % h == 0]))
        a: dict[str, Any] = {"kind": "attention", "heads": heads}
        _maybe(draw, "window", st.one_of(st.none(), st.integers(1, 512)), a)
        _maybe(draw, "rotary", st.booleans(), a)
        _maybe(draw, "persistent_tokens", st.integers(0, 8), a)
        if heads % 2 == 0:
            _maybe(draw, "kv_heads", st.just(heads // 2), a)
        return a
    if kind == "chain":
        n = draw(st.integers(1, 3))
        links = [draw(level_specs(d_model, earlier, outer=True)) for _ in range(n)]
        inf = float("inf")
        links.sort(key=lambda lv: inf if lv["frequency"] == "never" else lv["frequency"])
        return {"kind": "chain", "levels": links}
    lv = draw(level_specs(d_model, earlier))
    if draw(st.booleans()):
        lv["kind"] = "level"
    return lv


@st.composite
def specs(draw) -> dict:
    """A valid spec as a plain dict."""
    d_model = draw(st.sampled_from([8, 16, 32, 64]))
    n_blocks = draw(st.integers(1, 2))
    names = iter(f"lv{i}" for i in range(100))
    levels_: dict[str, Any] = {}
    blocks = []
    for _ in range(n_blocks):
        block: list[str] = []
        for _ in range(draw(st.integers(1, 3))):
            name = next(names)
            levels_[name] = draw(level_entries(d_model, list(block)))
            block.append(name)
        blocks.append(block)
    spec: dict[str, Any] = {
        "levels": levels_,
        "model": {"vocab": draw(st.integers(2, 512)), "d_model": d_model, "blocks": blocks},
    }
    _maybe(draw, "name", st.text("abcdefghij_", min_size=1, max_size=12), spec)
    _maybe(draw, "repeat", st.integers(1, 4), spec["model"])
    _maybe(draw, "norm", st.sampled_from(["rms", "layer", "none"]), spec["model"])
    _maybe(draw, "norm_position", st.sampled_from(["pre", "post"]), spec["model"])
    _maybe(draw, "tie_embeddings", st.booleans(), spec["model"])
    return spec


levels = level_entries
