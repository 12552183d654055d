"""Streams and gates that read another level's output (``from: <level>``): the reading level gets
the other level's own output at the same token, in one pass and in segments (``from: self`` is
tests/test_self_sources.py)."""

import pytest
import torch

import nlgraph

SPEC = """
name: cross
levels:
  attn: {kind: attention, heads: 2}
  mixer:
    memory: {kind: linear, heads: 2}
    objective: {kind: l2}
    optimizer: {kind: gd, lr: {from: attn, act: sigmoid}}   # β_t from the attention output
    keys: {from: input, norm: l2, conv: 2}
    values: {from: attn}
    queries: {from: attn, norm: l2}
  rule:
    kind: delta_rule
    heads: 2
    beta: {from: mixer, act: sigmoid}
    keys: {from: mixer, norm: l2}
model: {vocab: 64, d_model: 16, blocks: [[attn, mixer, rule]]}
"""


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nlgraph.build(SPEC, dtype=torch.float64)


def test_reader_sees_the_other_levels_output(model):
    block = model.blocks[0]
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    attn, mixer, rule = (block.entries[n] for n in ("attn", "mixer", "rule"))
    out, _ = block(x)
    # by hand: each entry's own output y, residual stream x ← x + y, with pre-norm
    y_a, _ = attn.inner(attn.norm(x), None)
    h = x + y_a
    y_m, _ = mixer.inner(mixer.norm(h), None, {"attn": y_a})
    h = h + y_m
    y_r, _ = rule.inner(rule.norm(h), None, {"attn": y_a, "mixer": y_m})
    torch.testing.assert_close(out, h + y_r)
    # and the reads matter: a different source changes the result
    other, _ = mixer.inner(mixer.norm(x + y_a), None, {"attn": torch.zeros_like(y_a)})
    assert (other - y_m).abs().max() > 1e-6


def test_segments_equal_one_pass_and_compile(model):
    tokens = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        a, st = model.stream(tokens[:, :10])
        b, _ = model.stream(tokens[:, 10:], st)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-10)
    torch.manual_seed(0)
    compiled = nlgraph.build(SPEC, dtype=torch.float64)
    compiled.load_state_dict(model.state_dict())
    compiled.compile_blocks(backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), full, rtol=1e-9, atol=1e-9)

