"""Spec language: the pydantic schema (:mod:`.schema`) and the OmegaConf loader (:mod:`.loader`)."""

from .loader import dump_spec, library_specs, load_level, load_raw, load_spec, resolve_source, spec_hash
from .schema import LevelSpec, Spec

__all__ = [
    "LevelSpec",
    "Spec",
    "dump_spec",
    "library_specs",
    "load_level",
    "load_raw",
    "load_spec",
    "resolve_source",
    "spec_hash",
]
