"""Outer building blocks: streaming equals one pass; attention equals a naive softmax loop."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nlgraph.layers import Attention, Gate, Mlp, ShortConv, Stream
from nlgraph.spec.schema import AttentionSpec, GateSpec, MlpMemorySpec, StreamSpec



pytestmark = pytest.mark.usefixtures("float64")


def _split_run(fn, x, cut):
    y1, s = fn(x[:, :cut], None)
    y2, _ = fn(x[:, cut:], s)
    return torch.cat([y1, y2], dim=1)


@given(st.integers(0, 2**31), st.integers(2, 5), st.integers(1, 11))
def test_short_conv_segments_equal_one_pass(seed, kernel, cut):
    g = torch.Generator().manual_seed(seed)
    conv = ShortConv(3, kernel)
    x = torch.randn(2, 12, 3, generator=g)
    full, _ = conv(x)
    assert torch.allclose(_split_run(conv, x, cut), full)
    # causal: the output at t does not depend on inputs after t
    x2 = x.clone()
    x2[:, cut:] += 1.0
    assert torch.allclose(conv(x2)[0][:, :cut], full[:, :cut])


def test_stream_shapes_and_l2_norm():
    s = Stream(StreamSpec(norm="l2", conv=4, feature_map="silu"), 16, heads=4, d_head=3)
    y, state = s(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 4, 3) and state.shape == (2, 3, 12)
    assert torch.allclose(y.norm(dim=-1), torch.ones(2, 5, 4))


def test_gate_granularities_and_logsigmoid():
    x = torch.randn(2, 5, 16)
    for per, shape in (("scalar", (2, 5, 1)), ("head", (2, 5, 4)), ("channel", (2, 5, 4, 3))):
        g = Gate(GateSpec(per=per, act="logsigmoid", bias=3.0), 16, heads=4, d_head=3)
        y = g(x)
        assert y.shape == shape and bool(((y > 0) & (y < 1)).all())


def test_a_logsigmoid_gates_scale_acts_in_log_space():
    """``act: logsigmoid`` with ``scale: s`` is ``α = exp(s · logsigmoid(z)) = sigmoid(z)^s`` (GLA's
    temperature), in a projected gate and in an adaptive one; other activations scale the value.
    (It once scaled the exponentiated factor, which made GLA's α = sigmoid(z)/16 ≈ 0.06.)"""
    from nlgraph.levels.gates import AdaptiveGate

    x = torch.randn(2, 5, 16)
    g = Gate(GateSpec(per="channel", act="logsigmoid", scale=0.0625, bias=4.0), 16, heads=4, d_head=3)
    z = g.proj(x).unflatten(-1, (4, 3))
    torch.testing.assert_close(g(x), torch.sigmoid(z) ** 0.0625)
    assert float(g(x).detach().min()) > 0.99  # starts near 0.999, as specs/gla.yaml says
    read = torch.randn(2, 4, 5, 3)
    spec = GateSpec(**{"from": "adaptive.alpha"}, per="channel", act="logsigmoid", scale=0.5, bias=1.0)
    torch.testing.assert_close(AdaptiveGate("alpha", spec, read).value(read), torch.sigmoid(read + 1.0) ** 0.5)
    s = Gate(GateSpec(per="head", act="sigmoid", scale=0.1), 16, heads=4, d_head=3)
    torch.testing.assert_close(s(x), 0.1 * torch.sigmoid(s.proj(x)))


def test_swiglu_mlp():
    m = Mlp(MlpMemorySpec(kind="mlp", hidden=8, activation="swiglu"), 6)
    assert m.layers[0].out_features == 16 and m(torch.randn(2, 3, 6)).shape == (2, 3, 6)


def _naive_attention(att: Attention, x: torch.Tensor) -> torch.Tensor:
    """Per-query softmax over the visible keys (the Nadaraya–Watson minimiser)."""
    q, _ = att.q(x)
    k, _ = att.k(x)
    v, _ = att.v(x)
    from nlgraph.layers import rotary

    b, t, h, d = q.shape
    pos = torch.arange(t)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    if att.spec.rotary:
        q, k = rotary(q, pos, att.spec.rope_base), rotary(k, pos, att.spec.rope_base)
    rep = att.heads // att.kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.zeros(b, h, t, d)
    for i in range(t):
        lo = 0 if att.spec.window is None else max(0, i - att.spec.window + 1)
        keys, vals = k[:, :, lo : i + 1], v[:, :, lo : i + 1]
        if att.persistent_k is not None:
            pk = att.persistent_k.repeat_interleave(rep, 0).unsqueeze(0).expand(b, -1, -1, -1)
            pv = att.persistent_v.repeat_interleave(rep, 0).unsqueeze(0).expand(b, -1, -1, -1)
            keys, vals = torch.cat([pk, keys], 2), torch.cat([pv, vals], 2)
        w = torch.softmax((keys @ q[:, :, i, :, None]).squeeze(-1) / d**0.5, dim=-1)
        out[:, :, i] = (w.unsqueeze(-1) * vals).sum(2)
    return att.out(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kv_heads,persistent", [(None, 0), (2, 2)])
def test_attention_matches_naive_and_streams(window, kv_heads, persistent):
    torch.manual_seed(0)
    spec = AttentionSpec(kind="attention", heads=4, kv_heads=kv_heads, window=window,
                         persistent_tokens=persistent)
    att = Attention(spec, 16)
    x = torch.randn(2, 9, 16)
    full, _ = att(x)
    assert torch.allclose(full, _naive_attention(att, x), atol=1e-10)
    for cut in (1, 4, 8):
        assert torch.allclose(_split_run(att, x, cut), full, atol=1e-10)
    # token by token (generation) with a bounded cache for sliding windows
    state, ys = None, []
    for i in range(9):
        y, state = att(x[:, i : i + 1], state)
        ys.append(y)
        if window is not None:
            assert state["k"].shape[2] <= window - 1
    assert torch.allclose(torch.cat(ys, 1), full, atol=1e-10)


@pytest.mark.parametrize("name, groups", [("gated_deltanet", {("lr", "retention")}),
                                          ("titans", {("lr", "momentum", "retention")}),
                                          ("deltanet", {("lr",)})])
def test_gates_reading_one_tensor_share_one_matmul(name, groups, monkeypatch):
    """Gates projecting the same tensor run as one matmul over their stacked weights
    (``_Entry.gate_groups``), with the same logits and parameter gradients as a matmul a gate, and
    the same parameters (a checkpoint of either loads into the other)."""
    import nlgraph.memory
    from nlgraph.lower import build
    from nlgraph.spec import load_spec

    spec = load_spec(f"specs/{name}.yaml", overrides=["vars.d_model=32", "vars.heads=2", "vars.layers=1"])
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))

    def run(fused: bool):
        monkeypatch.setattr(nlgraph.memory, "FUSE_GATES", fused)
        torch.manual_seed(0)
        model = build(spec)
        entries = [m for m in model.modules() if isinstance(m, nlgraph.memory._Entry)]
        out = model(tokens)
        logits = out[0] if isinstance(out, tuple) else out
        logits.sum().backward()
        return model, entries, logits

    fused, entries, logits = run(True)
    assert {g for e in entries for g in e.gate_groups} == groups
    apart, entries_apart, logits_apart = run(False)
    assert all(len(g) == 1 for e in entries_apart for g in e.gate_groups)
    assert fused.state_dict().keys() == apart.state_dict().keys()
    torch.testing.assert_close(logits, logits_apart, rtol=1e-12, atol=1e-12)
    for (n, p), (_, q) in zip(fused.named_parameters(), apart.named_parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("name, before", [("gated_deltanet", 5), ("titans", 5), ("deltanet", 4),
                                          ("transformer_pp", 3)])
def test_an_entry_casts_its_input_once_for_its_projections(name, before, monkeypatch):
    """Under autocast every projection of the entry's float32 input reads one 16-bit copy
    (:class:`~nlgraph.layers.MatmulInputs`), where each autocast matmul cast it itself (Gated
    DeltaNet: five copies written, and saved for the backward; attention's three): the same
    forward and the same gradients, bit for bit (each projection's gradient widened to float32
    before they are added, as before)."""
    import nlgraph.layers
    import nlgraph.memory
    from torch.utils._python_dispatch import TorchDispatchMode

    from nlgraph.lower import build
    from nlgraph.spec import load_spec

    class Casts(TorchDispatchMode):
        def __init__(self, x):
            super().__init__()
            self.x, self.n = x, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                    and args[0].untyped_storage().data_ptr() == self.x.untyped_storage().data_ptr()):
                self.n += 1
            return func(*args, **kwargs)

    spec = load_spec(f"specs/{name}.yaml", overrides=["vars.d_model=32", "vars.heads=2", "vars.layers=1"])
    torch.manual_seed(0)
    entry = next(m for m in build(spec, dtype=torch.float32).modules()
                 if isinstance(m, (nlgraph.memory._Entry, nlgraph.layers.Attention)))
    x = torch.randn(2, 24, 32, dtype=torch.float32, generator=torch.Generator().manual_seed(1))

    def run():
        leaf = x.clone().requires_grad_()
        h = leaf * 1.0  # an activation, as in a model: autocast caches the casts of leaves only
        entry.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), Casts(h) as seen:
            y, _ = entry(h)
        y.float().square().sum().backward()
        return seen.n, y, [leaf.grad] + [p.grad for p in entry.parameters() if p.grad is not None]

    n, y, grads = run()
    monkeypatch.setattr(nlgraph.layers, "SHARE_CASTS", False)  # each matmul casts its own, as before
    n_before, y_before, grads_before = run()
    assert (n, n_before) == (1, before)
    assert torch.equal(y, y_before)
    for g, gb in zip(grads, grads_before, strict=True):
        assert torch.equal(g, gb)


def test_the_compiled_forward_casts_the_entrys_input_once():
    """Traced as ``torch.compile`` traces it (AOT autograd's forward graph), Gated DeltaNet's entry
    converts its float32 input to bf16 once under autocast: the graph inductor fused into one kernel
    writing five copies (``benchmarks/results/gdn_layer_code_cast_h100.txt``) had five conversions."""
    import nlgraph.memory
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from nlgraph.lower import build
    from nlgraph.spec import load_spec

    seen = []

    def forward_graph(gm, example_inputs):
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and tuple(n.meta["val"].shape) == (2, 64, 32)]

        def source(n):  # through detach / alias nodes to what they view
            while n.op == "call_function" and any(w in str(n.target) for w in ("detach", "alias")):
                n = n.args[0]
            return n

        seen.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.args
                        and isinstance(n.args[0], torch.fx.Node) and source(n.args[0]) in inputs
                        and ("convert_element_type" in str(n.target) or "_to_copy" in str(n.target))))
        return make_boxed_func(gm.forward)

    spec = load_spec("specs/gated_deltanet.yaml", overrides=["vars.d_model=32", "vars.heads=2", "vars.layers=1"])
    entry = next(m for m in build(spec, dtype=torch.float32).modules() if isinstance(m, nlgraph.memory._Entry))
    torch._dynamo.reset()
    fn = torch.compile(lambda h: entry(h)[0], backend=aot_autograd(fw_compiler=forward_graph), fullgraph=True)
    x = torch.randn(2, 64, 32, dtype=torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fn(x * 1.0).float().sum().backward()
    torch._dynamo.reset()
    assert sum(seen) == 1 and x.grad is not None  # (a second, inner graph reads no input of that shape)
