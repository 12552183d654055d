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

__all__ = [
    "GraphError",
    "NLGraphError",
    "Spec",
    "SpecError",
    "build_graph",
    "dump_spec",
    "library_specs",
    "load_spec",
    "spec_hash",
]
