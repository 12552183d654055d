"""Loader behaviour: sources, includes, interpolation, overrides, error locations."""

from pathlib import Path

import pytest

from nlgraph import SpecError, dump_spec, load_spec, spec_hash
from nlgraph.spec.loader import load_level, load_raw

BASE = """\
vars: {w: 32}
levels:
  mixer:
    memory: {kind: linear, heads: 4}
model:
  vocab: 256
  d_model: ${vars.w}
  blocks: [mixer]
"""


def test_yaml_text_dict_and_file_agree(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(BASE)
    a, b = load_spec(BASE), load_spec(str(f))
    c = load_spec(load_raw(BASE)[0])
    assert a == b == c
    assert a.model.d_model == 32


def test_library_short_name_and_specs_prefix():
    assert load_spec("deltanet") == load_spec("specs/deltanet.yaml") == load_spec("deltanet.yaml")


def test_include_is_merged_underneath(tmp_path):
    (tmp_path / "frag.yaml").write_text("levels:\n  mlp:\n    memory: {kind: mlp}\n    objective: {kind: outer}\n")
    (tmp_path / "main.yaml").write_text("include: [frag.yaml]\n" + BASE.replace("[mixer]", "[[mixer, mlp]]"))
    spec = load_spec(str(tmp_path / "main.yaml"))
    assert set(spec.levels) == {"mixer", "mlp"}


def test_including_file_wins_over_fragment(tmp_path):
    (tmp_path / "frag.yaml").write_text("model: {vocab: 100, d_model: 8, blocks: [mixer]}\n")
    (tmp_path / "main.yaml").write_text("include: frag.yaml\n" + BASE)
    assert load_spec(str(tmp_path / "main.yaml")).model.vocab == 256


def test_include_library_name(tmp_path):
    (tmp_path / "main.yaml").write_text("include: [deltanet]\nname: mine\nvars: {layers: 2}\n")
    spec = load_spec(str(tmp_path / "main.yaml"))
    assert spec.name == "mine" and spec.model.repeat == 2
    assert spec.levels == load_spec("deltanet").levels


def test_overrides_apply_after_includes_and_before_interpolation():
    spec = load_spec(BASE, ["vars.w=64", "levels.mixer.frequency=16", "levels.mixer.optimizer={kind: gd, lr: 0.5}"])
    assert spec.model.d_model == 64
    assert spec.levels["mixer"].frequency == 16
    assert spec.levels["mixer"].optimizer.lr == 0.5


def test_override_error_names_the_override():
    with pytest.raises(SpecError) as e:
        load_spec(BASE, ["levels.mixer.frequency=sometimes"])
    assert e.value.path == "levels.mixer.frequency"
    assert "set by override 'levels.mixer.frequency=sometimes'" in str(e.value)


def test_error_line_points_at_the_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(BASE.replace("heads: 4", "heads: 4, depth: 2"))
    with pytest.raises(SpecError) as e:
        load_spec(str(f))
    assert (e.value.line, e.value.path) == (4, "levels.mixer.memory.depth")
    assert str(e.value).startswith(f"{e.value.file}:4: levels.mixer.memory.depth: unknown key 'depth'")


def test_error_in_an_included_file_names_that_file(tmp_path):
    (tmp_path / "frag.yaml").write_text("levels:\n  mlp:\n    memory: {kind: mlp, hiden: 3}\n")
    (tmp_path / "main.yaml").write_text("include: [frag.yaml]\n" + BASE)
    with pytest.raises(SpecError) as e:
        load_spec(str(tmp_path / "main.yaml"))
    assert e.value.file.endswith("frag.yaml") and e.value.line == 3
    assert "did you mean 'hidden'?" in str(e.value)


def test_nothing_executes(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.yaml"
    f.write_text(f"levels: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError):
        load_spec(str(f))
    assert not marker.exists()


def test_spec_object_passes_through_and_accepts_overrides():
    spec = load_spec(BASE)
    assert load_spec(spec) is spec
    assert load_spec(spec, ["model.vocab=300"]).model.vocab == 300


def test_dump_is_stable_yaml():
    spec = load_spec("hope")
    text = dump_spec(spec)
    assert load_spec(text) == spec and spec_hash(load_spec(text)) == spec_hash(spec)
    assert "${" not in text, "interpolations are resolved in the dump"


def test_load_level_from_yaml_text_and_dict():
    text = "memory: {kind: linear, heads: 2}\nobjective: {kind: dot}\n"
    lv = load_level(text)
    assert lv.memory.heads == 2 and lv.objective.kind == "dot"
    assert load_level({"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "dot"}}) == lv
    with pytest.raises(SpecError) as e:
        load_level({"memory": {"kind": "linear"}, "objectiv": {"kind": "dot"}})
    assert "did you mean 'objective'?" in str(e.value)


def test_frozen_and_hashable():
    spec = load_spec(BASE)
    with pytest.raises(Exception):
        spec.model.vocab = 3  # type: ignore[misc]
    assert hash(spec.levels["mixer"].memory) == hash(load_spec(BASE).levels["mixer"].memory)


def test_every_schema_field_is_documented():
    from pydantic import BaseModel

    import nlgraph.spec.schema as schema

    models = [v for v in vars(schema).values() if isinstance(v, type) and issubclass(v, BaseModel)
              and v.__module__ == schema.__name__ and not v.__name__.startswith("_")]
    assert len(models) > 20
    for m in models:
        assert m.__doc__, m.__name__
        for name, f in m.model_fields.items():
            if name == "kind":
                continue
            assert f.description, f"{m.__name__}.{name} has no docstring"


def test_override_with_another_kind_replaces_the_variant():
    spec = load_spec("deltanet", ["levels.mixer.optimizer={kind: momentum, momentum: 0.5}"])
    opt = spec.levels["mixer"].optimizer
    assert opt.kind == "momentum" and opt.momentum == 0.5 and opt.lr == 1.0  # gd's gate is gone


def test_override_with_the_same_kind_merges():
    spec = load_spec("deltanet", ["levels.mixer.optimizer={kind: gd}"])
    assert spec.levels["mixer"].optimizer.lr == load_spec("deltanet").levels["mixer"].optimizer.lr


def test_include_with_another_kind_replaces_the_variant(tmp_path):
    (tmp_path / "main.yaml").write_text(
        "include: [deltanet]\nlevels:\n  mixer:\n    optimizer: {kind: adam, lr: 0.01}\n")
    opt = load_spec(str(tmp_path / "main.yaml")).levels["mixer"].optimizer
    assert opt.kind == "adam" and opt.lr == 0.01


def test_reference_page_is_current():
    from nlgraph.spec.reference import render_reference

    page = Path(__file__).parent.parent / "docs" / "reference" / "spec.md"
    assert page.read_text(encoding="utf-8") == render_reference(), (
        "docs/reference/spec.md is stale: nlgraph schema --markdown --out docs/reference/spec.md")


def test_null_level_removes_an_included_level(tmp_path):
    (tmp_path / "main.yaml").write_text("include: [deltanet]\nlevels:\n  mlp: null\nmodel:\n  blocks: [mixer]\n")
    spec = load_spec(str(tmp_path / "main.yaml"))
    assert set(spec.levels) == {"mixer"}
    assert set(load_spec("deltanet", ["levels.mlp=null", "model.blocks=[mixer]"]).levels) == {"mixer"}
