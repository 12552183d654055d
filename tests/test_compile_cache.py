"""Compiled chunk loops come from inductor's caches in a later process (``CACHEABLE_LOOPS``), and
the cache key covers a loop's body: a body that differs is compiled, never taken from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from nlgraph.lower import build
from nlgraph.model import CACHEABLE_LOOPS

SCRIPT = """
import json, sys, torch
from torch._dynamo.utils import counters
from torch._higher_order_ops.scan import scan
from nlgraph.model import CACHEABLE_LOOPS
act = getattr(torch, sys.argv[1])

def f(x, w):
    def body(c, xi):
        c2 = act(c @ w + xi)
        return c2.clone(), (2 * c2).sum(-1)  # scan refuses outputs that alias each other
    c, ys = scan(body, torch.zeros(x.shape[1], x.shape[2]), x)
    return ys.sum() + c.sum()

g = torch.compile(f, fullgraph=True, dynamic=False, options=CACHEABLE_LOOPS)
gen = torch.Generator().manual_seed(0)
x = torch.randn(4, 2, 8, generator=gen, requires_grad=True)
w = torch.randn(8, 8, generator=gen, requires_grad=True)
y = g(x, w)
y.backward()
print(json.dumps({"y": y.item(), "gw": w.grad.norm().item(), **counters["inductor"], **counters["aot_autograd"]}))
"""


def _run(act: str, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    done = subprocess.run([sys.executable, "-c", SCRIPT, act], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_scan_graphs_come_from_the_cache_in_a_later_process(tmp_path):
    cache = str(tmp_path / "inductor")
    cold = _run("tanh", cache)
    assert cold.get("fxgraph_cache_bypass", 0) == 0 and cold.get("autograd_cache_bypass", 0) == 0
    assert cold.get("fxgraph_cache_miss", 0) > 0
    warm = _run("tanh", cache)
    assert warm.get("fxgraph_cache_hit", 0) > 0 and warm.get("fxgraph_cache_miss", 0) == 0
    assert (warm["y"], warm["gw"]) == (cold["y"], cold["gw"])
    other = _run("sigmoid", cache)  # only the loop body differs: compiled anew
    assert other.get("fxgraph_cache_miss", 0) > 0 and other["y"] != cold["y"]


def test_compile_blocks_asks_inductor_to_cache_the_loops(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or m)
    model = build("titans", overrides=["vars.d_model=32", "vars.heads=2", "vars.layers=1"])
    model.compile_blocks()
    assert seen and all(kw["options"] == CACHEABLE_LOOPS and kw["fullgraph"] for kw in seen)
    seen.clear()
    model.compile_blocks(backend="aot_eager")  # other backends and modes take no inductor options
    model.compile_blocks(mode="max-autotune")
    assert seen and all("options" not in kw for kw in seen)
