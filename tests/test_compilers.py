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


def test_dtype_is_part_of_the_decision_and_a_named_form_falls_back():
    """``supports(level, device, dtype)``: the plan's choice depends on the dtype too; a form asked
    for by name (a model's plan) that refuses the tensors hands over to its registered ``fallback``
    only with ``fall_back=True`` (run time), never when a plan is made."""
    import torch

    fam = "test_family_dtype"

    @register_form(fam, "plain", priority=0)
    def plain():
        return "plain"

    def half_only(level, device, dtype):
        return None if dtype in (None, torch.bfloat16) else f"{dtype} is not bfloat16"

    @register_form(fam, "kernel", priority=20, supports=half_only, fallback="plain")
    def kernel():
        return "kernel"

    assert select_form(fam, None, "cuda", torch.bfloat16).name == "kernel"
    assert select_form(fam, None, "cuda").name == "kernel"  # dtype not known: any it could take
    assert select_form(fam, None, "cuda", torch.float64).name == "plain"
    with pytest.raises(LookupError, match="torch.float64 is not bfloat16"):
        select_form(fam, None, "cuda", torch.float64, want="kernel")
    assert select_form(fam, None, "cuda", torch.float64, want="kernel", fall_back=True).name == "plain"
    assert forms(fam)[0].fallback == "plain" and forms(fam)[1].fallback is None


def test_supports_gets_the_head_width_only_when_it_asks_for_it():
    """A form's ``supports`` may take ``head_dim`` (the plan's and the run's width of the keys per
    head); forms written without it, with extra defaulted parameters or a keyword-only ``dtype``
    are asked as before."""
    fam = "test_head_dim_family"
    seen = {}

    def wide_only(lv, dev, dtype, head_dim=None):
        seen["wide"] = head_dim
        return None if head_dim is None or head_dim <= 64 else f"head dim {head_dim} > 64"

    def extra(lv, dev, dtype=None, strict=False):
        seen["extra"] = (dtype, strict)
        return None

    def kw_dtype(lv, dev, *, dtype=None):
        seen["kw"] = dtype
        return None

    register_form(fam, "plain", priority=0)(lambda lv: "plain")
    register_form(fam, "kernel", priority=30, supports=wide_only, fallback="plain")(lambda lv: "kernel")
    register_form(fam, "extra", priority=20, supports=extra)(lambda lv: "extra")
    register_form(fam, "kw", priority=10, supports=kw_dtype)(lambda lv: "kw")
    assert select_form(fam, None, "cuda", "f32", head_dim=64).name == "kernel" and seen["wide"] == 64
    assert select_form(fam, None, "cuda", "f32").name == "kernel" and seen["wide"] is None
    assert select_form(fam, None, "cuda", "f32", head_dim=128).name == "extra"
    assert seen["extra"] == ("f32", False)
    assert select_form(fam, None, "cuda", "f16", want="kw").name == "kw" and seen["kw"] == "f16"
    assert select_form(fam, None, "cuda", "f32", want="kernel", fall_back=True, head_dim=128).name == "plain"
