"""bf16 autocast works for every library spec (issue 10 item 4): one training forward+backward
under ``torch.autocast(bfloat16)`` (CPU autocast here, the CUDA one on the GPU) gives a finite loss
and finite gradients for every parameter that gets one, within bf16 tolerance of the fp32 step."""

from __future__ import annotations

import pytest
import torch

from nlgraph import library_specs, load_spec
from nlgraph.lower import build
from nlgraph.train.loop import lm_loss

SPECS = sorted(n for n in library_specs() if not n.startswith("equiv/"))
TINY = ["vars.d_model=32", "vars.heads=2", "vars.layers=1", "model.vocab=64"]


def _step(model, tokens, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", SPECS)
def test_bf16_autocast_step_is_finite_and_close_to_fp32(name):
    torch.manual_seed(0)
    model = build(load_spec(name, TINY))
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(1))
    loss32, g32 = _step(model, tokens, False)
    loss16, g16 = _step(model, tokens, True)
    assert torch.isfinite(torch.tensor(loss16)), f"{name}: bf16 loss {loss16}"
    assert set(g16) == set(g32), f"{name}: parameters with a gradient differ under bf16"
    bad = [n for n, g in g16.items() if not torch.isfinite(g).all()]
    assert not bad, f"{name}: non-finite bf16 gradients in {bad[:3]}"
    # bf16 keeps 8 bits of mantissa: the loss (≈ ln 64) within a few percent, and the gradient as a
    # whole pointing the same way
    assert abs(loss16 - loss32) < 0.05 * abs(loss32), f"{name}: loss {loss16} (bf16) vs {loss32} (fp32)"
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].flatten().float() for n in g32])
    cos = torch.nn.functional.cosine_similarity(flat16, flat32, dim=0)
    assert cos > 0.95, f"{name}: bf16 and fp32 gradients have cosine {float(cos):.3f}"


def _level_states(obj, found):
    """Every tensor of every ``level`` state (a runtime level's memory, optimizer buffers...)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "level" and isinstance(v, dict):
                found.update({n: t for n, t in v.items() if torch.is_tensor(t)})
            else:
                _level_states(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _level_states(v, found)
    return found


@pytest.mark.parametrize("name", ["titans", "hope", "atlas", "adam_memory", "ttt_mlp", "gated_deltanet"])
def test_memory_state_stays_float32_under_bf16_autocast(name):
    """Deep memories keep their in-context state (weights, momentum, Adam's moments) in float32
    while their inputs are bfloat16: the state is a running sum that bfloat16 would round away."""
    torch.manual_seed(0)
    model = build(load_spec(name, TINY))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = model.stream(torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2)))
    states = _level_states(state, {})
    assert states, f"{name}: no level state found"
    low = sorted(n for n, t in states.items() if t.is_floating_point() and t.dtype != torch.float32)
    assert not low, f"{name}: level state in {low[:3]} is not float32"
