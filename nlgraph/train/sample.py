"""Text generation from a trained model, through the model's streaming state: the prompt is read
once, then every new token costs one step of every level's recurrence (no re-reading of the
prefix)."""

from __future__ import annotations

import torch

__all__ = ["generate"]


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int, *, temperature: float = 0.8,
             top_k: int | None = 50, seed: int = 0) -> torch.Tensor:
    """Continue ``prompt [B, T0]`` by ``new_tokens`` sampled tokens; returns ``[B, new_tokens]``.

    ``temperature`` 0 is greedy decoding. The model runs eagerly (a compiled model would recompile
    for the one-token segments) and in evaluation mode.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, T0] with T0 >= 1, got {tuple(prompt.shape)}")
    was_training = model.training
    compiled = getattr(model, "_compiled", None)
    model.eval()
    model._compiled = None
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    try:
        logits, state = model.stream(prompt)
        out = []
        for _ in range(new_tokens):
            last = logits[:, -1].float()
            if temperature <= 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None and top_k < last.shape[-1]:
                    kth = last.topk(top_k, dim=-1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=gen)
            out.append(nxt)
            logits, state = model.stream(nxt, state)
        return torch.cat(out, dim=1)
    finally:
        model._compiled = compiled
        model.train(was_training)
