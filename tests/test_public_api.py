"""Pins the public surface: what `import nlgraph` exports and the CLI's command list."""

import nlgraph
from nlgraph import cli

PUBLIC = {
    "GraphError",
    "NLGraphError",
    "Spec",
    "SpecError",
    "build_graph",
    "dump_spec",
    "library_specs",
    "load_spec",
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
    assert cli.COMMANDS == ("validate", "show", "compile", "equiv", "list", "schema")
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
