"""Every spec in the library lowers to a model that runs forward and backward on CPU (tiny sizes
through overrides), streams in segments exactly like one pass, and compiles with fullgraph=True to
the same logits and parameter gradients as eager (float64)."""

import pytest
import torch

from nlgraph import library_specs
from nlgraph.lower import build
from tinyspecs import tiny

LIBRARY = sorted(library_specs())


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
    """Logits and the gradient of every trainable parameter, compiled (fullgraph) vs eager, in
    float64. The ``aot_eager`` backend captures the whole graph and builds the joint forward /
    backward graph, then runs the same aten kernels as eager: what may differ is only the order of
    float64 operations that decompositions reassociate (measured: logits bit-identical, gradients
    within 1.5e-14 absolute for every library spec). rtol 1e-10 / atol 1e-12 leaves four orders of
    magnitude for that while any change of semantics (a dropped term, a detached path, a float32
    detour) moves values by far more."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(name, overrides=tiny(name), dtype=torch.float64)
    tokens = torch.randint(0, 64, (2, 8))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # a random cotangent, so every logit's gradient counts with its own weight
    probe = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def logits_and_grads():
        logits = model(tokens)
        return logits, torch.autograd.grad((logits * probe).sum(), list(params.values()))

    eager, eager_grads = logits_and_grads()
    assert all(g.abs().max() > 0 for g in eager_grads), "a trainable parameter without gradient"
    counter = CompileCounterWithBackend("aot_eager")  # fullgraph capture + autograd, no codegen (fast)
    model.compile_blocks(backend=counter)
    compiled, compiled_grads = logits_and_grads()
    assert counter.frame_count >= 1  # the compiled blocks ran, not the eager ones
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
    for n, a, b in zip(params, compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"d/d{n}: {m}")
