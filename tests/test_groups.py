"""Group entries: ``kind: parallel`` (Titans MAG) and ``kind: memory_context`` (Titans MAC).

Checked on tiny float64 models: the MAG combination is the gate written out, both are causal (a
token never changes an earlier output), MAC attention never reaches past its segment, and a
sequence fed in arbitrary pieces equals one pass (the segment boundaries live in the state)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nlgraph

TINY = ["vars.d_model=16", "vars.heads=2", "vars.layers=1"]
MAC = [*TINY, "vars.segment=6"]


@pytest.fixture(scope="module")
def mag():
    torch.manual_seed(0)
    return nlgraph.build("titans_mag", overrides=TINY, dtype=torch.float64)


@pytest.fixture(scope="module")
def mac():
    torch.manual_seed(0)
    return nlgraph.build("titans_mac", overrides=MAC, dtype=torch.float64)


def test_mag_is_attention_gated_by_the_memory(mag):
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    par = mag.blocks[0].entries["mag"].inner
    o, _ = par(x, None)
    y, _ = par.branches["swa"](x, None)
    m, _ = par.branches["memory"](x, None)
    rms = lambda z, w: z / z.square().mean(-1, keepdim=True).add(1e-6).sqrt() * w  # noqa: E731
    expected = rms(y, par.norms[0].weight) * torch.sigmoid(rms(m, par.norms[1].weight))
    torch.testing.assert_close(o, expected)


@pytest.mark.parametrize("name", ["mag", "mac"])
def test_causal(name, request):
    model = request.getfixturevalue(name)
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(tokens)
        for p in (3, 6, 13):
            changed = tokens.clone()
            changed[0, p] = (changed[0, p] + 1) % 256
            out = model(changed)
            torch.testing.assert_close(out[:, :p], base[:, :p], rtol=0, atol=1e-12)
            assert (out[:, p] - base[:, p]).abs().max() > 1e-6  # the changed token itself matters


def test_mac_attention_stays_inside_its_segment():
    # with a frozen memory (no update, no decay) and no short convolutions (causal across the whole
    # sequence by design), the only path between segments would be attention
    frozen = [*MAC, "levels.memory.optimizer.lr=0.0", "levels.memory.retention=null",
              *(f"levels.memory.{role}.conv=0" for role in ("keys", "values", "queries"))]
    torch.manual_seed(0)
    model = nlgraph.build("titans_mac", overrides=frozen, dtype=torch.float64)
    tokens = torch.randint(0, 256, (1, 18), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[0, :6] = (changed[0, :6] + 7) % 256  # rewrite the whole first segment
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, 6:], b[:, 6:], rtol=0, atol=1e-12)
    # with the memory learning, the first segment reaches later ones through the memory only
    torch.manual_seed(0)
    learning = nlgraph.build("titans_mac", overrides=MAC, dtype=torch.float64)
    with torch.no_grad():
        assert (learning(tokens)[:, 6:] - learning(changed)[:, 6:]).abs().max() > 1e-9


@settings(max_examples=10)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4))
def test_pieces_equal_one_pass(mac, mag, pieces):
    tokens = torch.randint(0, 256, (2, sum(pieces)), generator=torch.Generator().manual_seed(3))
    for model in (mac, mag):
        with torch.no_grad():
            full = model(tokens)
            state, outs, start = None, [], 0
            for n in pieces:
                y, state = model.stream(tokens[:, start:start + n], state)
                outs.append(y)
                start += n
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_group_members_are_graph_nodes():
    graph = nlgraph.build_graph("titans_mac", overrides=MAC)
    assert graph.nodes["b0.mac"]["kind"] == "memory_context"
    assert graph.nodes["b0.mac[0]"]["kind"] == "level" and graph.nodes["b0.mac[1]"]["kind"] == "attention"
    assert graph.graph["unused"] == []  # memory and attn are used through the group
