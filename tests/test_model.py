"""Lowered models without parametric memories: shapes, gradients, streaming, compile parity, and
the CMS model's logits against a hand-written forward pass."""

import math

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


CMS_TINY = TINY + ["levels.attn.window=4"]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value (norm weights start at exactly 1, which would
    hide a norm whose weight is never applied)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.abs().mean().clamp(min=0.1) * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _cms_by_hand(w: dict, tokens: torch.Tensor, *, layers: int, heads: int, window: int, links: int) -> torch.Tensor:
    """The ``cms`` spec's logits written out from its YAML (float64), by parameter name: tied
    embedding; per block, pre-RMSNorm sliding-window softmax attention with rotary positions
    (base 1e4, rotate-half), then the chain x ← x + W1 gelu(W0 rmsnorm_i(x)) for every CMS link
    (no link has reached its first period, so every link reads its initial parameters);
    a final RMSNorm and the tied head."""

    def rms(x, weight):
        return x / (x.square().mean(-1, keepdim=True) + 1e-6).sqrt() * weight

    def gelu(z):
        return z * 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))

    b, t = tokens.shape
    x = w["embed.weight"][tokens]  # [B, T, C]
    c = x.shape[-1]
    d = c // heads
    half = d // 2
    # angles as layers.rotary forms them: the position × frequency product in float32 (LLaMA's
    # convention), then cos / sin in the model's dtype
    inv = 10000.0 ** (-torch.arange(0, half, dtype=torch.float32) / half)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().double(), ang.sin().double()

    def rope(z):  # [B, H, T, D]
        z1, z2 = z[..., :half], z[..., half:]
        return torch.cat([z1 * cos - z2 * sin, z1 * sin + z2 * cos], -1)

    i = torch.arange(t)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # [query, key]
    for blk in range(layers):
        pre = f"blocks.{blk}.entries."
        h = rms(x, w[pre + "attn.norm.weight"])
        q, k, v = ((h @ w[pre + f"attn.inner.attn.{r}.proj.weight"].T).reshape(b, t, heads, d).transpose(1, 2)
                   for r in ("q", "k", "v"))
        q, k = rope(q), rope(k)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, float("-inf"))
        att = torch.softmax(scores, -1) @ v  # [B, H, T, D]
        x = x + att.transpose(1, 2).reshape(b, t, c) @ w[pre + "attn.inner.attn.out.weight"].T
        for j in range(links):
            link = pre + f"cms.links.{j}."
            h = rms(x, w[link + "norm.weight"])
            x = x + gelu(h @ w[link + "inner.mlp.layers.0.weight"].T) @ w[link + "inner.mlp.layers.1.weight"].T
    return rms(x, w["norm.weight"]) @ w["embed.weight"].T


def test_cms_logits_equal_a_hand_written_forward():
    """13 tokens: fewer than the fastest CMS period (16), so the logits are the static chain's."""
    torch.manual_seed(0)
    model = build("cms", overrides=CMS_TINY, dtype=torch.float64)
    _perturb(model, 1)
    tokens = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(2))
    weights = dict(model.named_parameters())
    expected = _cms_by_hand(weights, tokens, layers=2, heads=2, window=4, links=3)
    logits = model(tokens)
    # float64 end to end: what is left is reassociation round-off of ~1e-15 relative
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    # streamed token by token with the sliding window's bounded cache, the same values
    state, parts = None, []
    for i in range(13):
        out, state = model.stream(tokens[:, i : i + 1], state)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), expected, rtol=1e-10, atol=1e-10)


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
