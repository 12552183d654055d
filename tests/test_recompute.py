"""Activation checkpointing per block (``NLModel.recompute``, ``nlgraph train --recompute-blocks``):
the same loss and gradients, less kept for the backward, each block run again in the backward."""

import pytest
import torch
import torch.nn.functional as F

from nlgraph import build
from nlgraph.spec.loader import load_spec


def tiny(name: str, layers: int = 2, d_model: int = 32) -> list[str]:
    """Small sizes that cross chunk and segment boundaries at T = 40."""
    spec_vars = load_spec(name).vars
    out = ["model.vocab=128"]
    for key, value in (("d_model", d_model), ("heads", 2), ("layers", layers), ("chunk", 8), ("segment", 16)):
        if key in spec_vars:
            out.append(f"vars.{key}={value}")
    return out


def _tokens(b=2, t=40, vocab=128):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))


def _step(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["gated_deltanet", "titans", "hope"])
def test_recompute_gives_the_same_loss_and_gradients(name):
    torch.manual_seed(0)
    model = build(name, overrides=tiny(name))
    tokens = _tokens()
    loss, grads = _step(model, tokens)
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in model.blocks]
    loss_r, grads_r = _step(model.recompute(), tokens)
    for h in hooks:
        h.remove()
    assert torch.allclose(loss, loss_r, rtol=1e-6, atol=0)
    assert grads.keys() == grads_r.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_r[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)
    # each block ran again in the backward (HOPE's blocks run once per segment, and again where a
    # commit differentiates its period before the outer backward)
    assert len(calls) >= 2 * len(model.blocks)
    # the phases of scheduled levels are restored after the recomputations
    assert all(m.phase is None for m in model._phased)


def _saved_bytes(model, tokens) -> int:
    """Bytes the autograd graph keeps for the backward outside the checkpointed blocks."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
    logits.float().square().mean().backward()
    return total


def test_recompute_keeps_a_fraction_of_the_activations():
    torch.manual_seed(0)
    model = build("gated_deltanet", overrides=tiny("gated_deltanet", layers=4, d_model=64))
    tokens = _tokens(t=64)
    kept = _saved_bytes(model, tokens)
    kept_r = _saved_bytes(model.recompute(), tokens)
    # the blocks' intermediates are gone; the embedding, head and the blocks' inputs remain
    assert kept_r < 0.25 * kept, (kept_r, kept)


def test_recompute_off_without_gradients_and_when_switched_off():
    model = build("gated_deltanet", overrides=tiny("gated_deltanet")).recompute()
    calls = []
    for b in model.blocks:
        b.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(_tokens())
    assert len(calls) == len(model.blocks)
    calls.clear()
    _step(model.recompute(False), _tokens())
    assert len(calls) == len(model.blocks) and model.recompute_blocks is False


def test_recompute_of_compiled_blocks_matches_eager():
    torch.manual_seed(0)
    model = build("gated_deltanet", overrides=tiny("gated_deltanet"))
    tokens = _tokens()
    loss, grads = _step(model, tokens)
    model.compile_blocks().recompute()
    loss_r, grads_r = _step(model, tokens)
    torch.testing.assert_close(loss_r, loss, rtol=1e-5, atol=0)
    for n in grads:
        torch.testing.assert_close(grads_r[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _second_order_spec(meta: str) -> dict:
    link = {"memory": {"kind": "mlp", "hidden": "2x", "activation": "gelu"},
            "objective": {"kind": "outer", "meta_gradient": meta}, "optimizer": {"kind": "gd", "lr": 0.5},
            "frequency": 3}
    return {"name": "tiny_cms", "levels": {"attn": {"kind": "attention", "heads": 2},
                                           "cms": {"kind": "chain", "levels": [link]}},
            "model": {"vocab": 64, "d_model": 8, "blocks": [["attn", "cms"]], "repeat": 1}}


def test_recompute_refuses_second_order_commits_and_takes_first_order_ones():
    """A second-order meta-gradient differentiates the commits' inner steps through the blocks, which
    the recomputation (its backward is once-differentiable) cannot carry: refused in one line."""
    from nlgraph.errors import NLGraphError

    model = build(_second_order_spec("second_order"))
    with pytest.raises(NLGraphError, match="second_order.*drop --recompute-blocks"):
        model.recompute()
    assert model.recompute_blocks is False
    torch.manual_seed(0)
    first = build(_second_order_spec("first_order"))
    tokens = _tokens(t=16, vocab=64)
    loss, grads = _step(first, tokens)
    loss_r, grads_r = _step(first.recompute(), tokens)
    torch.testing.assert_close(loss_r, loss, rtol=1e-6, atol=0)
    for n in grads:
        torch.testing.assert_close(grads_r[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_recompute_names_a_block_whose_recomputation_changes_shape():
    from nlgraph.errors import NLGraphError
    from nlgraph.model import recompute_call

    lin = torch.nn.Linear(4, 4)

    def fn(x):  # one output without gradients, two with: the recomputation's outputs differ
        y = lin(x)
        return (y,) if not torch.is_grad_enabled() else (y, y * 2)

    x = torch.randn(2, 4, requires_grad=True)
    (out,) = recompute_call(fn, (x,), list(lin.parameters()))
    with pytest.raises(NLGraphError, match="another structure.*without --recompute-blocks"):
        out.sum().backward()


def test_recompute_has_no_second_derivative():
    from nlgraph.model import recompute_call

    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    y = recompute_call(lambda a: torch.tanh(lin(a)), (x,), list(lin.parameters()))
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|marked with @once"):
        torch.autograd.grad(g.sum(), x)
