"""nlgraph equiv: shipped equivalent pairs are confirmed, different specs are rejected — including
near misses that differ from an equivalent pair by one small thing."""

import pytest
import torch

import nlgraph.equiv
from nlgraph.cli import main
from nlgraph.equiv import compare
from nlgraph.lower import build
from nlgraph.runtime import run_level
from nlgraph.spec.loader import load_spec

TINY = ["vars.d_model=32", "vars.heads=2", "vars.layers=2"]
ENTRIES = ["block0.attn", "block0.mlp", "block1.attn", "block1.mlp"]


def test_cms_with_infinite_period_is_the_transformer_mlp():
    report = compare("transformer_pp", "equiv/cms_never", overrides=TINY, seeds=2, length=16)
    assert report.equivalent and report.rel <= 1e-12
    # every weight of either model has its counterpart, and every entry of both blocks was compared
    assert not report.only_a and not report.only_b
    n_weights = sum(1 for p in build("transformer_pp", overrides=TINY).parameters() if p.requires_grad)
    assert report.shared == n_weights
    assert [n for n, _ in report.entries] == ENTRIES
    assert all(err <= 1e-12 for _, err in report.entries), report.entries
    assert report.first_difference is None


# cms_never changed in one place that keeps every parameter shape (so every weight is still shared):
# the checker must see the function change, and name the first entry it reaches.
NEAR_MISSES = [
    (["levels.cms.levels.0.memory.activation=geglu"], "block0.mlp"),  # SwiGLU's gate → GELU
    (["levels.attn.rope_base=10001"], "block0.attn"),  # rotary base off by 1e-4 relative
    (["levels.cms.levels.0.memory.bias=true"], "block0.mlp"),  # two extra weights per link
]


@pytest.mark.parametrize(("change", "first"), NEAR_MISSES, ids=["activation", "rope_base", "bias"])
def test_near_misses_of_the_pair_are_rejected(change, first):
    b = load_spec("equiv/cms_never", TINY + change)
    report = compare("transformer_pp", b, overrides=TINY, seeds=1, length=16)
    assert not report.equivalent and report.rel > report.tol, report.render("transformer_pp", str(change))
    assert report.first_difference == first
    assert not report.only_a
    # B's extra weights (the two biases of each block's link) are reported as having no counterpart
    assert len(report.only_b) == (4 if "bias" in change[0] else 0), report.only_b


def test_one_perturbed_weight_is_rejected(monkeypatch):
    """After the weights are shared, one entry of block 1's CMS link is moved by 1e-6 (relative
    ~1e-5 of a typical weight): the checker rejects the pair and names that entry, not the ones before."""
    share = nlgraph.equiv.share_parameters

    def share_then_perturb(a, b):
        out = share(a, b)
        with torch.no_grad():
            b.blocks[1].entries["cms"].links[0].inner.mlp.layers[1].weight[0, 0] += 1e-6
        return out

    monkeypatch.setattr(nlgraph.equiv, "share_parameters", share_then_perturb)
    report = compare("transformer_pp", "equiv/cms_never", overrides=TINY, seeds=1, length=16)
    assert not report.equivalent and report.rel > report.tol
    assert report.first_difference == "block1.mlp"
    errors = dict(report.entries)
    assert all(errors[n] == 0.0 for n in ENTRIES[:3]), report.entries


def _swiglu_by_hand(p: dict, x: torch.Tensor) -> torch.Tensor:
    """``W1 (silu(G x) ⊙ W0 x)`` on ``x [B, T, H, D]`` with ``[B, H, ...]`` weights."""
    lin = lambda w, z: torch.einsum("bhoi,bthi->btho", w, z)  # noqa: E731
    g = lin(p["memory.g0"], x)
    return lin(p["memory.w1"], g * torch.sigmoid(g) * lin(p["memory.w0"], x))


@pytest.mark.parametrize("frequency", ["never", 4])
def test_only_an_infinite_period_is_the_static_mlp(frequency, float64):
    """The claim behind the pair, on the level itself: a CMS link with ``frequency: never`` reads
    its initial weights at every token whatever the outer gradients u, which is the Transformer++
    MLP; with a finite period C its reads equal that MLP only until the first commit, then follow
    the committed update θ ← θ − η Σ ∇⟨M(x), u⟩ (so a pair with a finite period is not this one)."""
    level = {"memory": {"kind": "mlp", "depth": 2, "hidden": 6, "activation": "swiglu", "bias": False},
             "objective": {"kind": "outer"}, "optimizer": {"kind": "gd", "lr": 0.5}, "frequency": frequency,
             "read": "after_write"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 1, 3, generator=g)
    w = {"memory.w0": torch.randn(2, 1, 6, 3, generator=g), "memory.g0": torch.randn(2, 1, 6, 3, generator=g),
         "memory.w1": torch.randn(2, 1, 3, 6, generator=g)}
    static = _swiglu_by_hand(w, x)
    us = [torch.randn(2, 10, 1, 3, generator=g) for _ in range(2)]
    ys = [run_level(level, keys=x, values=u, queries=None, state=w, form="reference")[0] for u in us]
    if frequency != "never":
        for u, y in zip(us, ys):
            # by hand: commits after tokens 3 and 7 of θ ← θ − η Σ_chunk ∇_θ ⟨M_θ(x_t), u_t⟩ at the
            # chunk-start θ; token t reads the state committed at or before it
            theta, expected = w, []
            for start in (0, 4, 8):
                end = min(start + 4, 10)
                if end - start == 4:
                    p = {n: t.clone().requires_grad_() for n, t in theta.items()}
                    inner = (_swiglu_by_hand(p, x[:, start:end]) * u[:, start:end]).sum()
                    new = {n: t - 0.5 * gr for (n, t), gr in zip(p.items(), torch.autograd.grad(inner, list(p.values())))}
                else:
                    new = theta  # the partial last chunk is not committed
                expected.append(_swiglu_by_hand(theta, x[:, start:end - 1]))
                expected.append(_swiglu_by_hand(new, x[:, end - 1:end]))
                theta = {n: t.detach() for n, t in new.items()}
            torch.testing.assert_close(y, torch.cat(expected, 1), rtol=1e-12, atol=1e-12)
    for y in ys:
        torch.testing.assert_close(y[:, :3], static[:, :3], rtol=1e-12, atol=1e-12)
    if frequency == "never":
        for y in ys:
            torch.testing.assert_close(y, static, rtol=1e-12, atol=1e-12)
        return
    # the commit at token 3 (reads after the write) makes every later read depend on u: one GD step
    # on Σ_{t<4} ⟨M(x_t), u_t⟩ taken at the initial weights
    for y in ys:
        assert (y[:, 3:] - static[:, 3:]).abs().min() > 1e-6
    assert (ys[0][:, 3:] - ys[1][:, 3:]).abs().min() > 1e-6


def test_a_finite_period_cms_model_is_not_the_transformer():
    # issue 9: the finite period runs in context, so the model leaves the Transformer++ at token 4
    b = load_spec("equiv/cms_never", TINY + ["levels.cms.levels.0.frequency=4"])
    report = compare("transformer_pp", b, overrides=TINY, seeds=1, length=16)
    assert not report.equivalent


def test_cli_exit_codes(capsys):
    assert main(["equiv", "transformer_pp", "equiv/cms_never", *TINY, "--seeds", "1", "--length", "8"]) == 0
    assert "EQUIVALENT" in capsys.readouterr().out
    assert main(["equiv", "transformer_pp", "cms", *TINY, "--seeds", "1", "--length", "8"]) == 3
    assert "DIFFERENT" in capsys.readouterr().out


def test_vocabulary_mismatch_is_a_user_error(capsys):
    from nlgraph.spec.loader import load_spec

    a = load_spec("transformer_pp", TINY)
    b = load_spec("transformer_pp", [*TINY, "model.vocab=300"])
    with pytest.raises(ValueError, match="different vocabularies"):
        compare(a, b, seeds=1)


# Every shipped pair in specs/equiv/ that must be equivalent, with the spec it is paired with.
PAIRS = [
    ("linear_attention", "equiv/linear_attention_kind"),  # own kind vs GD(lr 1) on the dot objective
    ("deltanet", "equiv/deltanet_rule"),  # delta rule vs GD(lr β) on ½‖Mk − v‖²
    ("gated_deltanet", "equiv/gated_deltanet_rule"),  # gated delta rule vs decay, then GD on L2
    ("hope_attention", "equiv/hope_attention_swap"),  # HOPE with attention in place of Titans
]


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[b.split("/")[1] for _, b in PAIRS])
def test_shipped_pair_is_equivalent(a, b):
    # 80 tokens: longer than one 64-token chunk of the parallel forms
    report = compare(a, b, overrides=TINY, seeds=2, length=80)
    assert report.equivalent and report.rel <= 1e-12, report.render(a, b)
    assert not report.only_a and not report.only_b  # every trainable weight has its counterpart
    assert report.shared > 0


def test_every_equiv_spec_is_tested():
    from pathlib import Path

    import nlgraph.specs

    shipped = {f"equiv/{p.stem}" for p in Path(nlgraph.specs.__file__).parent.joinpath("equiv").glob("*.yaml")}
    tested = {b for _, b in PAIRS} | {"equiv/cms_never", "equiv/gated_deltanet_titans_form"}
    assert shipped == tested


def test_titans_form_is_not_gated_deltanet_when_alpha_below_one():
    report = compare("equiv/gated_deltanet_rule", "equiv/gated_deltanet_titans_form", overrides=TINY,
                     seeds=1, length=24)
    assert not report.equivalent and report.rel > 1e-3
    assert report.first_difference == "block0.mixer"


def test_titans_form_is_gated_deltanet_when_alpha_is_one():
    # with α ≡ 1 both orders are the plain delta rule: the difference above is the retention order
    no_decay = [*TINY, "levels.mixer.retention.gate=1.0"]
    report = compare("gated_deltanet", "equiv/gated_deltanet_titans_form", overrides=no_decay, seeds=1,
                     length=24)
    assert report.equivalent and report.rel <= 1e-12


def test_cli_rejects_the_titans_form(capsys):
    args = ["equiv", "gated_deltanet", "equiv/gated_deltanet_titans_form", *TINY, "--seeds", "1", "--length", "8"]
    assert main(args) == 3
    out = capsys.readouterr().out
    assert "DIFFERENT" in out and "first level that differs: block0.mixer" in out
