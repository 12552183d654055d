"""Do two specs compute the same function?

Both specs are lowered; the parameters of B are copied from A wherever they correspond (same name,
or the same position and shape inside corresponding block entries); both models run on the same
random tokens for several seeds; the logits and the output of every block entry are compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .lower import build
from .model import NLModel
from .spec.loader import load_spec

__all__ = ["EquivReport", "compare"]


@dataclass
class EquivReport:
    """Outcome of :func:`compare`.

    Attributes:
        equivalent: every seed's logits agree within ``tol`` (relative to the logits' scale).
        max_abs: largest absolute logit difference over all seeds.
        rel: ``max_abs`` divided by the largest absolute logit of A.
        shared: number of parameter tensors copied from A to B.
        only_a, only_b: parameter names that had no counterpart.
        entries: per block entry ``(node, max abs output difference)`` in model order.
        first_difference: the first entry whose outputs differ beyond ``tol``, or ``None``.
    """

    equivalent: bool
    max_abs: float
    rel: float
    tol: float
    shared: int
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    entries: list[tuple[str, float]] = field(default_factory=list)
    first_difference: str | None = None

    def render(self, name_a: str, name_b: str) -> str:
        verdict = "EQUIVALENT" if self.equivalent else "DIFFERENT"
        lines = [
            f"{verdict}: {name_a} vs {name_b}: max |Δlogits| {self.max_abs:.3e}, relative "
            f"{self.rel:.3e} (tolerance {self.tol:.1e}); {self.shared} parameter tensors shared",
        ]
        if self.only_a or self.only_b:
            lines.append(f"unshared: {len(self.only_a)} only in A {self.only_a[:4]}, "
                         f"{len(self.only_b)} only in B {self.only_b[:4]}")
        for node, err in self.entries:
            lines.append(f"  {node:<24} relative |Δ| {err:.3e}")
        if self.first_difference:
            lines.append(f"first level that differs: {self.first_difference}")
        return "\n".join(lines)


def _entry_params(model: NLModel) -> list[list[list[tuple[str, torch.nn.Parameter]]]]:
    """Parameters grouped by block instance and entry position, in registration order."""
    out = []
    for b, block in enumerate(model.blocks):
        entries = []
        for name in block.names:
            prefix = f"blocks.{b}.entries.{name}."
            entries.append([(prefix + n, p) for n, p in block.entries[name].named_parameters()])
        out.append(entries)
    return out


def share_parameters(a: NLModel, b: NLModel) -> tuple[int, list[str], list[str]]:
    """Copy A's parameters into B where they correspond; returns (count, only in A, only in B)."""
    shared = 0
    used_a: set[str] = set()
    used_b: set[str] = set()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    with torch.no_grad():
        for name in ("embed.weight", "norm.weight", "norm.bias", "head.weight"):
            if name in pa and name in pb and pa[name].shape == pb[name].shape:
                pb[name].copy_(pa[name])
                used_a.add(name)
                used_b.add(name)
                shared += 1
        ga, gb = _entry_params(a), _entry_params(b)
        for block_a, block_b in zip(ga, gb):
            for ea, eb in zip(block_a, block_b):
                # same suffix first (identical structure), then position-and-shape order
                free_b = [(n, p) for n, p in eb if n not in used_b]
                for na, p in ea:
                    match = next((q for q in free_b if q[0].split(".", 4)[-1] == na.split(".", 4)[-1]
                                  and q[1].shape == p.shape), None)
                    if match is None:
                        match = next((q for q in free_b if q[1].shape == p.shape), None)
                    if match is None:
                        continue
                    match[1].copy_(p)
                    used_a.add(na)
                    used_b.add(match[0])
                    free_b.remove(match)
                    shared += 1
    # frozen parameters (a zero initial state that is not meta-learned) are constants, not weights
    only_a = [n for n, p in pa.items() if n not in used_a and p.requires_grad
              and not (n == "head.weight" and a.spec.model.tie_embeddings)]
    only_b = [n for n, p in pb.items() if n not in used_b and p.requires_grad
              and not (n == "head.weight" and b.spec.model.tie_embeddings)]
    return shared, only_a, only_b


def _entry_outputs(model: NLModel, tokens: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    # an entry's output over the whole sequence: a model with in-context levels reads it in
    # segments (one hook call each), joined along the tokens
    outs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for b, block in enumerate(model.blocks):
        for name in block.names:
            node = f"block{b}.{name}"
            hooks.append(block.entries[name].register_forward_hook(
                lambda mod, args, out, node=node: outs.setdefault(node, []).append(out[0].detach())))
    try:
        logits = model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return logits.detach(), [(n, torch.cat(v, dim=1)) for n, v in outs.items()]


def compare(
    spec_a: Any,
    spec_b: Any,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    seeds: int = 3,
    batch: int = 2,
    length: int = 32,
    tol: float = 1e-8,
    dtype: torch.dtype = torch.float64,
) -> EquivReport:
    """Compare the functions computed by two specs (see the module docstring).

    Args:
        spec_a, spec_b: anything :func:`~nlgraph.load_spec` accepts.
        overrides: ``key=value`` strings applied to both (e.g. to shrink them).
        seeds: number of random weight/token draws.
        tol: relative tolerance on the logits (and on every entry's output).
    """
    a_spec, b_spec = load_spec(spec_a, overrides), load_spec(spec_b, overrides)
    if a_spec.model.vocab != b_spec.model.vocab:
        raise ValueError(f"the specs have different vocabularies ({a_spec.model.vocab} vs "
                         f"{b_spec.model.vocab}); they cannot compute the same function")
    worst, scale, entries = 0.0, 0.0, {}
    shared, only_a, only_b = 0, [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        a = build(a_spec, dtype=dtype)
        b = build(b_spec, dtype=dtype)
        shared, only_a, only_b = share_parameters(a, b)
        g = torch.Generator().manual_seed(10_000 + seed)
        tokens = torch.randint(0, a_spec.model.vocab, (batch, length), generator=g)
        with torch.no_grad():
            la, oa = _entry_outputs(a, tokens)
            lb, ob = _entry_outputs(b, tokens)
        worst = max(worst, (la - lb).abs().max().item())
        scale = max(scale, la.abs().max().item())
        for (na, xa), (_, xb) in zip(oa, ob):
            err = (xa - xb).abs().max().item() if xa.shape == xb.shape else float("inf")
            entries[na] = max(entries.get(na, 0.0), err / max(xa.abs().max().item(), 1e-30))
    rel = worst / max(scale, 1e-30)
    first = next((n for n, e in entries.items() if e > tol), None)
    return EquivReport(
        equivalent=rel <= tol,
        max_abs=worst,
        rel=rel,
        tol=tol,
        shared=shared,
        only_a=only_a,
        only_b=only_b,
        entries=list(entries.items()),
        first_difference=first,
    )
