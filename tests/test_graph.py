"""The level graph: nodes, edges and roles, and each check as a GraphError naming its nodes."""

import networkx as nx
import pytest

from nlgraph import GraphError, build_graph, load_spec
from nlgraph.graph import level_order

BASE = """\
levels:
  a:
    memory: {kind: linear, heads: 4}
  b:
    memory: {kind: linear, heads: 4}
model: {vocab: 256, d_model: 64, blocks: [[a, b]]}
"""


def test_hope_graph_structure():
    g = build_graph("hope")
    assert isinstance(g, nx.DiGraph)
    kinds = {n: d["kind"] for n, d in g.nodes(data=True)}
    assert kinds["embed"] == "embed" and kinds["head"] == "head"
    assert kinds["b0.titans"] == "level" and kinds["b0.cms"] == "chain"
    assert {n for n, k in kinds.items() if k == "adaptive"} == {
        f"b0.titans.adaptive.{x}" for x in ("k", "v", "eta", "alpha")}
    assert [g.nodes[f"b0.cms[{j}]"]["frequency"] for j in range(3)] == [16, 256, 2048]
    reads = {(a, b, d["via"]) for a, b, d in g.edges(data=True) if d["role"] == "reads"}
    assert ("b0.titans.adaptive.k", "b0.titans", "keys") in reads
    assert ("b0.titans.adaptive.eta", "b0.titans", "optimizer.lr") in reads
    assert ("b0.titans.adaptive.alpha", "b0.titans", "retention.gate") in reads
    order = level_order(g)
    assert order[0] == "embed" and order[-1] == "head"
    assert order.index("b0.titans") < order.index("b0.cms[0]") < order.index("b0.cms[2]")
    assert g.graph["repeat"] == 8 and len(g.graph["hash"]) == 16


def test_reading_an_earlier_level_is_a_data_flow_edge():
    g = build_graph(load_spec(BASE, ["levels.b.keys.from=a"]))
    assert g.edges["b0.a", "b0.b"]["role"] in ("stream", "reads")
    assert any(d.get("via") == "keys" for _, _, d in g.edges(data=True))


def test_self_read_is_allowed():
    g = build_graph(load_spec(BASE, ["levels.a.values.from=self"]))
    assert g.edges["b0.a", "b0.a"]["previous"] is True


def test_cycle_names_the_nodes():
    with pytest.raises(GraphError) as e:
        build_graph(load_spec(BASE, ["levels.a.queries.from=b"]))
    assert set(e.value.nodes) == {"b0.a", "b0.b"}
    assert e.value.path == "levels.a.queries"
    assert "b0.a -> b0.b -> b0.a" in e.value.message


def test_gate_reading_the_future_is_a_cycle():
    with pytest.raises(GraphError) as e:
        build_graph(load_spec(BASE, ["levels.a.optimizer={kind: gd, lr: {from: b}}"]))
    assert e.value.path == "levels.a.optimizer.lr"


def test_deep_momentum_is_a_nested_level():
    spec = load_spec(BASE, ["levels.a.memory={kind: mlp}",
                            "levels.a.optimizer={kind: deep_momentum, level: {memory: {kind: mlp}, "
                            "optimizer: {kind: deep_momentum, level: {memory: {kind: mlp}}}}}"])
    g = build_graph(spec)
    assert g.edges["b0.a.optimizer", "b0.a"]["role"] == "optimizes"
    assert g.edges["b0.a.optimizer.optimizer", "b0.a.optimizer"]["role"] == "optimizes"


def test_graph_error_from_a_file_carries_file_and_line(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(BASE.replace("[[a, b]]", "[[a, c]]"))
    with pytest.raises(GraphError) as e:
        build_graph(str(f))
    assert e.value.file.endswith("s.yaml") and e.value.line == 6
    assert e.value.nodes == ["b0.c"]


def test_same_level_in_two_blocks_gets_two_nodes():
    g = build_graph(load_spec(BASE, ["model.blocks=[[a, b], [a]]"]))
    assert "b0.a" in g and "b1.a" in g


def test_unused_levels_are_reported():
    g = build_graph(load_spec(BASE, ["model.blocks=[a]"]))
    assert g.graph["unused"] == ["b"]


def test_widths_recorded():
    g = build_graph(load_spec(BASE, ["levels.a.memory.d_key=8", "levels.a.memory.d_value=4"]))
    assert g.nodes["b0.a"]["widths"] == {"keys": 32, "values": 16, "queries": 32}
