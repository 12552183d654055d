"""Every spec shipped in specs/ validates, builds a graph, and is recognised as what it claims."""

import pytest

from nlgraph import build_graph, library_specs, load_spec
from nlgraph.families import recognise

LIBRARY = library_specs()


def test_library_has_the_first_specs():
    assert {"linear_attention", "deltanet", "gated_deltanet", "titans", "cms", "hope",
            "transformer_pp"} <= set(LIBRARY)


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_spec_validates_and_builds(name):
    spec = load_spec(name)
    graph = build_graph(spec)
    assert graph.graph["name"] == spec.name == name.split("/")[-1]
    assert spec.description, "every library spec says what it is"
    assert not graph.graph["unused"], "library specs use every level they define"


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_spec_file_is_commented(name):
    text = LIBRARY[name].read_text(encoding="utf-8")
    assert text.lstrip().startswith("#"), "a library spec opens with a comment citing its source"


@pytest.mark.parametrize(
    "name,level,family",
    [
        ("linear_attention", "mixer", "linear attention"),
        ("deltanet", "mixer", "DeltaNet"),
        ("gated_deltanet", "mixer", "Gated DeltaNet"),
        ("titans", "memory", "Titans (LMM)"),
        ("hope", "titans", "self-modifying Titans"),
        ("hope", "cms", "CMS"),
        ("cms", "cms", "CMS"),
        ("transformer_pp", "attn", "softmax attention"),
        ("transformer_pp", "mlp", "MLP"),
        ("hope_attention", "attn", "softmax attention"),
        ("hope_large_chunk", "titans", "self-modifying Titans"),
        ("hope_large_chunk", "cms", "CMS"),
        ("retnet", "mixer", "RetNet"),
        ("mamba2", "mixer", "Mamba2-style decay"),
        ("gla", "mixer", "GLA"),
        ("kda", "mixer", "Kimi Delta Attention"),
        ("ttt_linear", "ttt", "TTT-linear"),
        ("ttt_mlp", "ttt", "TTT-MLP"),
        ("atlas", "memory", "Atlas-style memory"),
        ("titans_mal", "swa", "sliding-window attention"),
        ("dgd_gated", "mixer", "gated DGD memory"),
        ("adam_memory", "memory", "custom"),
    ],
)
def test_family_recognised(name, level, family):
    assert recognise(load_spec(name).levels[level]) == family


def test_hope_attention_drops_the_titans_level():
    spec = load_spec("hope_attention")
    assert "titans" not in spec.levels and spec.model.blocks == [["attn", "cms"]]


def test_hope_large_chunk_is_hope_with_the_benchmarked_overrides():
    """The speed in hope_large_chunk's comment was measured as these overrides of `hope`."""
    ours = load_spec("hope_large_chunk")
    measured = load_spec("hope", ["vars.chunk=256", "levels.cms.levels.0.frequency=256",
                                  "levels.cms.levels.1.frequency=1024"])
    assert ours.levels == measured.levels and ours.model == measured.model
    assert ours.levels["titans"].gradient_point.chunk == 256
    assert [lv.frequency for lv in ours.levels["cms"].levels] == [256, 1024, 2048]


def test_tiny_override_of_a_library_spec():
    spec = load_spec("hope", ["vars.d_model=32", "vars.heads=2", "vars.layers=1", "vars.chunk=4"])
    assert spec.model.d_model == 32 and spec.model.repeat == 1
    assert spec.levels["titans"].memory.heads == 2
    assert spec.levels["titans"].gradient_point.chunk == 4
    build_graph(spec)
