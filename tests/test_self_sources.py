"""Streams and gates that read the entry's own previous output (``from: self``): token t reads the
entry's output at token t − 1 (zero before a fresh sequence's first token), the level runs token by
token (or a chunk at a time with ``read: chunk_start``), and a sequence fed in pieces, the plan
and compile_blocks (which leaves such a block eager) agree with it."""

import torch
import torch.nn.functional as F

import nlgraph

SPEC = """
name: self_reading
levels:
  mixer:
    memory: {kind: mlp, heads: 2, hidden: 3}
    objective: {kind: l2}
    optimizer: {kind: gd, lr: {from: self, act: sigmoid}}   # η_t from the previous output
    keys: {from: self, norm: l2, conv: 2}                   # k_t from the last two outputs
    values: {from: input}
    queries: {from: input}
  rule:
    kind: delta_rule
    heads: 2
    beta: {from: self, act: sigmoid}
    keys: {from: input, norm: l2}
model: {vocab: 64, d_model: 8, blocks: [[mixer, rule]]}
"""


def _model():
    torch.manual_seed(0)
    return nlgraph.build(SPEC, dtype=torch.float64)


def test_level_reads_its_previous_output_by_hand():
    """The MLP level, online gd, by hand: from the previous outputs o_{t−2}, o_{t−1} (zero before the
    first token), k_t = normalize(conv(W_k o)), η_t = gate(o_{t−1}); W ← W − η_t ∇½‖M_W(k_t) − v_t‖²;
    o_t = W_o M_W(q_t) (read after the write)."""
    from nlgraph.levels import build_memory

    model = _model()
    mixer = model.blocks[0].entries["mixer"].inner
    x = torch.randn(2, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out, state = mixer(x, None)
    heads, d = 2, 4
    mem = build_memory(mixer.spec.memory, d, d)
    w = {p: t for p, t in ((k.split(".", 1)[1], v) for k, v in mixer.initial_state(2).items())}
    wk, wv, wq = (mixer.streams[r].proj.weight for r in "kvq")
    conv = mixer.streams["k"].conv.weight  # [C, 2]: depthwise, causal
    zeros = torch.zeros(2, 8, dtype=torch.float64)
    prev = [zeros, zeros]  # o_{t−2}, o_{t−1}
    outs = []
    for t in range(7):
        pk = [o @ wk.T for o in prev]
        k = F.normalize((pk[0] * conv[:, 0] + pk[1] * conv[:, 1]).view(2, heads, 1, d), dim=-1, eps=1e-6)
        v, q = ((x[:, t] @ p.T).view(2, heads, 1, d) for p in (wv, wq))
        eta = mixer.gates["lr"](prev[1][:, None])[:, 0]  # [B, H]: the gate's projection and activation
        p = {n: t_.detach().requires_grad_() for n, t_ in w.items()}
        loss = 0.5 * (mem.forward(p, k) - v).square().sum()
        grads = torch.autograd.grad(loss, list(p.values()))
        w = {n: w[n] - eta[..., None, None] * g for n, g in zip(p, grads)}
        o = mixer.out(mem.forward(w, q).reshape(2, heads * d))
        prev = [prev[1], o]
        outs.append(o)
    torch.testing.assert_close(out, torch.stack(outs, 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["self.prev"][:, 0], outs[-1], rtol=1e-10, atol=1e-12)
    assert outs[3].abs().max() > 1e-3  # not the trivial all-zero trajectory
    # the read is real: continuing with the previous output replaced by zeros changes the result
    first, st1 = mixer(x[:, :1], None)
    again, _ = mixer(x[:, 1:2], st1)
    torch.testing.assert_close(again[:, 0], outs[1], rtol=1e-10, atol=1e-12)
    zero, _ = mixer(x[:, 1:2], {**st1, "self.prev": torch.zeros_like(st1["self.prev"])})
    assert (zero - again).abs().max() > 1e-6


def test_segments_equal_one_pass_and_outputs_are_causal():
    model = _model()
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        a, st = model.stream(tokens[:, :5])
        b, st = model.stream(tokens[:, 5:6], st)
        c, _ = model.stream(tokens[:, 6:], st)
        torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-10, atol=1e-10)
        changed = tokens.clone()
        changed[:, 8] = (changed[:, 8] + 1) % 64
        other = model(changed)
    torch.testing.assert_close(other[:, :8], full[:, :8], rtol=0, atol=0)
    assert (other[:, 8:] - full[:, 8:]).abs().max() > 1e-6


def test_trains():
    model = _model()
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    logits = model(tokens)
    F.cross_entropy(logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1)).backward()
    mixer = model.blocks[0].entries["mixer"].inner
    # the outer gradient reaches the projections that read the previous output
    assert mixer.streams["k"].proj.weight.grad.abs().max() > 0
    assert mixer.gates["lr"].proj.weight.grad.abs().max() > 0


def test_plan_says_token_by_token():
    from nlgraph.lower import plan as make_plan

    plan = make_plan(SPEC)
    forms = {lv.node: lv.form for lv in plan.levels}
    assert "token by token" in forms["b0.mixer"] and "token by token" in forms["b0.rule"]


CHUNKED = """
name: self_reading_chunks
levels:
  mixer:
    memory: {kind: mlp, heads: 2, hidden: 3}
    objective: {kind: l2}
    optimizer: {kind: momentum, lr: {from: self, act: sigmoid}, momentum: 0.5}
    retention: {kind: weight_decay, gate: {from: self, act: sigmoid, bias: 3.0}}
    keys: {from: self, norm: l2, conv: 2}
    values: {from: input}
    queries: {from: input, conv: 2}
    read: chunk_start
    gradient_point: {chunk: 4}
model: {vocab: 64, d_model: 8, blocks: [[mixer]]}
"""


def test_chunk_start_reads_run_chunk_by_chunk_exactly(monkeypatch):
    """With ``read: chunk_start`` a self-reading level runs a gradient-point chunk at a time (its
    chunk's outputs are read at the chunk-start state before the chunk runs); that equals the
    token-by-token run, also for a sequence continued off the chunk grid, and its gradients too."""
    from nlgraph.memory import MemoryLevel

    torch.manual_seed(0)
    model = nlgraph.build(CHUNKED, dtype=torch.float64)
    mixer = model.blocks[0].entries["mixer"].inner
    x = torch.randn(2, 13, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    calls = []
    real = MemoryLevel._read_at_start
    monkeypatch.setattr(MemoryLevel, "_read_at_start", lambda *a: calls.append(1) or real(*a))
    fast, st = mixer(x, None)
    assert calls, "the chunk path ran"
    (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
    monkeypatch.setattr(MemoryLevel, "_self_segments", lambda self, level_state, length: None)
    slow, st_slow = mixer(x, None)
    (g_slow,) = torch.autograd.grad(slow.square().sum(), x)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-9, atol=1e-12)
    for k in st_slow["level"]:
        torch.testing.assert_close(st["level"][k], st_slow["level"][k], rtol=1e-10, atol=1e-12)
    assert fast[:, 6:].abs().max() > 1e-3
    monkeypatch.undo()
    # continued sequences: from position 1 the first segment (tokens 1-3) starts inside a chunk,
    # where it reads the anchor (the state at position 0), not the committed state after token 0
    for split in (1, 3, 6):
        a, sa = mixer(x[:, :split], None)
        b, _ = mixer(x[:, split:], sa)
        torch.testing.assert_close(torch.cat([a, b], 1), slow, rtol=1e-10, atol=1e-12)
    from nlgraph.lower import plan as make_plan

    forms = {lv.node: lv.form for lv in make_plan(CHUNKED).levels}
    assert "4 tokens at a time" in forms["b0.mixer"]


def test_compile_leaves_self_reading_blocks_eager():
    """A block with a `from: self` level stays eager under compile_blocks (its per-token or
    per-chunk calls continue the level's state, whose position a compiled graph cannot branch
    on); the model still runs and equals the eager one."""
    torch.manual_seed(0)
    model = nlgraph.build(CHUNKED, dtype=torch.float64)
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eager = model(tokens)
        model.compile_blocks(backend="aot_eager")
        assert model._compiled[0] is model.blocks[0]
        torch.testing.assert_close(model(tokens), eager, rtol=0, atol=0)
