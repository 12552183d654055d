"""The execution-form registry that backends plug into (nlgraph.compilers)."""

import pytest

from nlgraph.compilers import forms, register_form, select_form


def test_register_select_and_refuse():
    fam = "test_family_registry"

    @register_form(fam, "slow", priority=0)
    def slow():
        return "slow"

    @register_form(fam, "fast", priority=10, supports=lambda lv, dev: None if dev == "cuda" else "needs CUDA")
    def fast():
        return "fast"

    assert [f.name for f in forms(fam)] == ["fast", "slow"]
    assert select_form(fam, None, "cuda").name == "fast"
    assert select_form(fam, None, "cpu").name == "slow"  # best supported one
    with pytest.raises(LookupError, match="needs CUDA"):
        select_form(fam, None, "cpu", want="fast")
    with pytest.raises(LookupError, match="available: fast, slow"):
        select_form(fam, None, want="kernel")
    with pytest.raises(ValueError, match="already registered"):
        register_form(fam, "slow")(slow)
    with pytest.raises(LookupError, match="no execution form"):
        select_form("no_such_family", None)
