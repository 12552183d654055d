"""nlgraph: declarative Nested Learning.

A model is a set of nested optimization problems ("levels"), each an associative memory with its
own objective, inner optimizer and update frequency. Write them as a YAML spec; nlgraph validates it
(:func:`load_spec`), builds and checks the level graph (:func:`build_graph`), and lowers it to
PyTorch.
"""

from .errors import GraphError, NLGraphError, SpecError
from .graph import build_graph
from .spec.loader import dump_spec, library_specs, load_spec, spec_hash
from .spec.schema import Spec

__version__ = "0.1.0"


def __getattr__(name: str):
    # torch-backed entry points load on first use, so spec tools (validate, show) start fast
    if name == "build":
        from .lower import build

        return build
    if name == "run_level":
        from .runtime import run_level

        return run_level
    raise AttributeError(f"module 'nlgraph' has no attribute {name!r}")

__all__ = [
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
]
