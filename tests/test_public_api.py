"""Pins the public surface: what `import nlgraph` exports and the CLI's command list."""

import nlgraph
from nlgraph import cli

PUBLIC = {
    "GraphError",
    "NLGraphError",
    "Spec",
    "SpecError",
    "build",
    "build_graph",
    "dump_spec",
    "library_specs",
    "load_spec",
    "run_level",
    "spec_hash",
}


def test_all_is_pinned():
    assert set(nlgraph.__all__) == PUBLIC
    for name in nlgraph.__all__:
        assert getattr(nlgraph, name) is not None


def test_errors_hierarchy():
    assert issubclass(nlgraph.SpecError, nlgraph.NLGraphError)
    assert issubclass(nlgraph.GraphError, nlgraph.NLGraphError)


def test_cli_commands_are_pinned():
    assert cli.COMMANDS == ("validate", "show", "compile", "equiv", "train", "eval", "sample", "demo", "data",
                            "bench", "list", "schema")
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert tuple(sub.choices) == cli.COMMANDS


def test_compilers_live_inside_the_package():
    import importlib.util

    import nlgraph.compilers

    assert nlgraph.compilers.__name__ == "nlgraph.compilers"
    # no generic top-level `compilers` module is installed
    assert importlib.util.find_spec("compilers") is None or "nlgraph" not in str(
        importlib.util.find_spec("compilers").origin or ""
    )


def test_entry_point_signatures():
    import inspect

    sig = inspect.signature(nlgraph.run_level)
    assert list(sig.parameters)[:1] == ["level"]
    for name in ("keys", "values", "queries", "lr", "retention", "momentum", "state", "form"):
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["form"].default == "auto"
    b = inspect.signature(nlgraph.build)
    for name in ("compile", "device", "dtype"):
        assert b.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert b.parameters["compile"].default is False
