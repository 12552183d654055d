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
