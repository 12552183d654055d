"""Every spec in the library lowers to a model that runs forward and backward on CPU (tiny sizes
through overrides), streams in segments exactly like one pass, and compiles with fullgraph=True to
the same outputs as eager."""

import pytest
import torch

from nlgraph import library_specs, load_spec
from nlgraph.lower import build

LIBRARY = sorted(library_specs())


def tiny(name: str) -> list[str]:
    spec_vars = load_spec(name).vars
    out = ["model.vocab=64"]
    for key, value in (("d_model", 16), ("heads", 2), ("layers", 1), ("chunk", 4)):
        if key in spec_vars:
            out.append(f"vars.{key}={value}")
    return out


@pytest.mark.parametrize("name", LIBRARY)
def test_forward_backward_stream(name):
    torch.manual_seed(0)
    model = build(name, overrides=tiny(name), dtype=torch.float64)
    tokens = torch.randint(0, 64, (2, 10))
    logits = model(tokens)
    assert logits.shape == (2, 10, 64) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    for cut in (3, 7):
        a, state = model.stream(tokens[:, :cut])
        b, _ = model.stream(tokens[:, cut:], state)
        torch.testing.assert_close(torch.cat([a, b], 1), logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", LIBRARY)
def test_compiled_equals_eager(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(name, overrides=tiny(name))
    tokens = torch.randint(0, 64, (2, 8))
    eager = model(tokens)
    model.compile_blocks(backend="aot_eager")  # fullgraph capture + autograd, no codegen (fast)
    compiled = model(tokens)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    compiled.sum().backward()
