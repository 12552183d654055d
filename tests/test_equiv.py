"""nlgraph equiv: shipped equivalent pairs are confirmed, different specs are rejected."""

import pytest

from nlgraph.cli import main
from nlgraph.equiv import compare

TINY = ["vars.d_model=32", "vars.heads=2", "vars.layers=2"]


def test_cms_with_infinite_period_is_the_transformer_mlp():
    report = compare("transformer_pp", "equiv/cms_never", overrides=TINY, seeds=2, length=16)
    assert report.equivalent and report.rel <= 1e-12
    assert not report.only_a and not report.only_b
    assert report.first_difference is None


def test_a_different_pair_is_rejected_and_the_level_named():
    report = compare("transformer_pp", "cms", overrides=TINY, seeds=1, length=16)
    assert not report.equivalent
    assert report.first_difference == "block0.mlp"  # attention is shared; the MLP/CMS differ


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
