"""A dispatch mode that records the operators run inside it, shared by the tests that check which
dtypes a forward or backward computes in."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpDtypes(TorchDispatchMode):
    """Records every op as ``(name, floating dtypes of its tensor arguments, its output's dtype)`` in
    ``seen``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, list, torch.dtype | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        self.seen.append((func.overloadpacket.__name__, ins, out.dtype if isinstance(out, torch.Tensor) else None))
        return out

    def inputs_of(self, name: str) -> set:
        """The dtypes the ops called ``name`` took."""
        return {d for op, ins, _ in self.seen if op == name for d in ins}
