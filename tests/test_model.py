"""Lowered models without parametric memories: shapes, gradients, streaming, compile parity."""

import pytest
import torch

from nlgraph.lower import build, plan

TINY = ["vars.d_model=32", "vars.heads=2", "vars.layers=2"]


@pytest.mark.parametrize("name,extra", [("transformer_pp", []), ("cms", ["levels.attn.window=4"]),
                                        ("hope_attention", [])])
def test_forward_backward_and_streaming(name, extra):
    torch.manual_seed(0)
    model = build(name, overrides=TINY + extra, dtype=torch.float64)
    tokens = torch.randint(0, 256, (2, 13))
    logits = model(tokens)
    assert logits.shape == (2, 13, 256) and logits.dtype == torch.float64
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    for cut in (1, 6, 12):
        a, state = model.stream(tokens[:, :cut])
        b, _ = model.stream(tokens[:, cut:], state)
        torch.testing.assert_close(torch.cat([a, b], 1), logits, rtol=1e-10, atol=1e-10)


def test_token_by_token_generation_state_is_bounded_for_windows():
    model = build("cms", overrides=TINY + ["levels.attn.window=3"])
    tokens = torch.randint(0, 256, (1, 10))
    state = None
    for i in range(10):
        _, state = model.stream(tokens[:, i : i + 1], state)
    k = state["blocks"][0]["attn"]["k"]
    assert k.shape[2] == 2  # window - 1 cached keys, whatever the length


def test_bad_tokens_shape():
    model = build("transformer_pp", overrides=TINY)
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\]"):
        model(torch.zeros(3, dtype=torch.long))


def test_plan_lists_levels_with_forms_and_params():
    model = build("cms", overrides=TINY)
    text = plan("cms", TINY).render(model)
    assert "b0.attn" in text and "sdpa (sliding window)" in text
    assert f"parameters: {sum(p.numel() for p in model.parameters()):,} in all" in text


def test_compiled_matches_eager_without_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = build("transformer_pp", overrides=TINY)
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_blocks(backend=counter)
    tokens = torch.randint(0, 256, (2, 8))
    eager = build("transformer_pp", overrides=TINY)
    eager.load_state_dict(model.state_dict())
    out = model(tokens)
    torch.testing.assert_close(out, eager(tokens), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    # repeated blocks share one graph (parameters are graph inputs)
    assert counter.frame_count == len(model.spec.model.blocks)
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(3):
            out = model(tokens)
            out.sum().backward()
    torch.testing.assert_close(out, eager(tokens), rtol=1e-5, atol=1e-5)
    assert "_orig_mod" not in "".join(model.state_dict())
