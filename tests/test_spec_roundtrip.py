"""Property tests: randomly drawn valid specs validate, round-trip through YAML, keep their hash,
and build a graph."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from nlgraph import build_graph, dump_spec, load_spec, spec_hash
from nlgraph.testing.strategies import specs

ENTRY_KINDS = ("level", "attention", "chain", "linear_attention", "delta_rule")


def _shuffled(obj, rng: random.Random):
    if isinstance(obj, dict):
        items = list(obj.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(obj, list):
        return [_shuffled(v, rng) for v in obj]
    return obj


@given(specs())
def test_drawn_specs_validate_and_build(raw):
    spec = load_spec(raw)
    graph = build_graph(spec)
    names = {n for block in spec.model.blocks for n in block}
    assert {graph.nodes[n]["label"] for n in graph if graph.nodes[n]["kind"] in ENTRY_KINDS} >= names
    assert graph.graph["hash"] == spec_hash(spec)


@given(specs())
def test_round_trip_full_yaml(raw):
    spec = load_spec(raw)
    again = load_spec(dump_spec(spec))
    assert again == spec
    assert spec_hash(again) == spec_hash(spec)


@given(specs())
def test_round_trip_minimal_yaml(raw):
    spec = load_spec(raw)
    again = load_spec(dump_spec(spec, exclude_defaults=True))
    assert again == spec
    assert spec_hash(again) == spec_hash(spec)


@given(specs(), st.integers(0, 2**32 - 1))
def test_hash_ignores_key_order(raw, seed):
    assert spec_hash(load_spec(_shuffled(raw, random.Random(seed)))) == spec_hash(load_spec(raw))


@given(specs())
def test_hash_changes_with_content(raw):
    spec = load_spec(raw)
    changed = load_spec(raw, [f"model.vocab={spec.model.vocab + 1}"])
    assert spec_hash(changed) != spec_hash(spec)
