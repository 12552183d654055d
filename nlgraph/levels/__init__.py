"""The maths of a level, as pure functions of tensors: memories, objectives, inner optimizers,
rates, and the resolution of a level spec against its data (:func:`prepare`).

Execution forms live in :mod:`nlgraph.compilers` (``reference``, ``chunked``); the public entry
point is :func:`nlgraph.runtime.run_level`.
"""

from .gates import AdaptiveGate, activate, resolve_rate
from .memories import Layer, Memory, build_memory
from .objectives import Objective, build_objective
from .optimizers import InnerOptimizer, build_optimizer, gradients, newton_schulz
from .run import LevelRun, Stream, init_state, periods, prepare, schedule

__all__ = [
    "AdaptiveGate",
    "InnerOptimizer",
    "Layer",
    "LevelRun",
    "Memory",
    "Objective",
    "Stream",
    "activate",
    "build_memory",
    "build_objective",
    "build_optimizer",
    "gradients",
    "init_state",
    "newton_schulz",
    "periods",
    "prepare",
    "resolve_rate",
    "schedule",
]
