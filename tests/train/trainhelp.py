"""Helpers shared by the training tests: a small corpus and a free local port for torchrun."""

from __future__ import annotations

import socket
from pathlib import Path

import torch


def write_corpus(path: Path) -> Path:
    """Write a small corpus to ``path``: 400 pseudo-sentences over a fixed word list (seeded)."""
    g = torch.Generator().manual_seed(0)
    words = "the of and to in that it is was he for on are as with his they at be this from".split()
    lines = []
    for _ in range(400):
        n = int(torch.randint(4, 12, (1,), generator=g))
        idx = torch.randint(0, len(words), (n,), generator=g).tolist()
        lines.append(" ".join(words[i] for i in idx).capitalize() + ".")
    path.write_text("\n".join(lines))
    return path


def free_port() -> int:
    """A port nobody listens on now: a fixed one may still be held by an earlier run's socket."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
