"""Compiled chunk loops and forward-mode products come from inductor's and AOT autograd's caches in
a later process (``CACHEABLE_FUNCTIONS``), and the cache key covers what they compute: a loop body
or a differentiated function that differs is compiled, never taken from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nlgraph.levels.memories import _quiet_jvp_setup
from nlgraph.lower import build
from nlgraph.model import compile_options

# a compiled function of x and w, differentiated; argv[1] names the activation inside it. Prints
# its value, the gradient's norm and the compile caches' counters
_TEMPLATE = """
import json, sys, torch
from torch._dynamo.utils import counters
from torch._higher_order_ops.scan import scan
from nlgraph.model import compile_options
act = getattr(torch, sys.argv[1])
{body}
g = torch.compile(f, **compile_options())
gen = torch.Generator().manual_seed(0)
x = torch.randn({x_shape}, generator=gen, requires_grad=True)
w = torch.randn(8, 8, generator=gen, requires_grad=True)
y = g(x, w)
y.backward()
print(json.dumps({{"y": y.item(), "gw": w.grad.norm().item(), **counters["inductor"], **counters["aot_autograd"]}}))
"""

SCRIPT = _TEMPLATE.format(x_shape="4, 2, 8", body="""
def f(x, w):
    def body(c, xi):
        c2 = act(c @ w + xi)
        return c2.clone(), (2 * c2).sum(-1)  # scan refuses outputs that alias each other
    c, ys = scan(body, torch.zeros(x.shape[1], x.shape[2]), x)
    return ys.sum() + c.sum()
""")

# J v of a function inside a compiled graph, as DGD's `inner_errors: gain` takes it
# (nlgraph.levels.memories.gain_scales): torch.func.jvp enters and leaves a forward-mode level
JVP_SCRIPT = _TEMPLATE.format(x_shape="4, 8", body="""
def f(x, w):
    _, jv = torch.func.jvp(lambda h: act(h @ w), (x,), (torch.ones_like(x),))
    return jv.square().sum()
""")


def _run(act: str, cache: str, script: str = SCRIPT) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    done = subprocess.run([sys.executable, "-c", script, act], env=env, capture_output=True, text=True, timeout=600)
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


def test_forward_mode_graphs_come_from_both_caches_in_a_later_process(tmp_path):
    # without the mark AOT autograd bypassed its cache for these graphs and traced them again in
    # every process (hope_large_chunk compiled from the cache in 21.9 s instead of 7.8 s on CPU)
    cache = str(tmp_path / "inductor")
    cold = _run("tanh", cache, JVP_SCRIPT)
    assert cold.get("autograd_cache_bypass", 0) == 0 and cold.get("fxgraph_cache_bypass", 0) == 0
    assert cold.get("autograd_cache_miss", 0) > 0
    warm = _run("tanh", cache, JVP_SCRIPT)
    assert warm.get("autograd_cache_hit", 0) > 0 and warm.get("autograd_cache_miss", 0) == 0
    assert (warm["y"], warm["gw"]) == (cold["y"], cold["gw"])
    other = _run("sin", cache, JVP_SCRIPT)  # only the differentiated function differs: compiled anew
    assert other.get("autograd_cache_miss", 0) > 0 and other["y"] != cold["y"]
    # the same values as without the compiler
    _quiet_jvp_setup()  # torch's forward-mode decompositions warn on their first load
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=gen, requires_grad=True)
    w = torch.randn(8, 8, generator=gen, requires_grad=True)
    _, jv = torch.func.jvp(lambda h: torch.tanh(h @ w), (x,), (torch.ones_like(x),))
    y = jv.square().sum()
    y.backward()
    assert abs(warm["y"] - y.item()) <= 1e-5 * abs(y.item())
    assert abs(warm["gw"] - w.grad.norm().item()) <= 1e-5 * w.grad.norm().item()


def test_compile_blocks_asks_inductor_to_cache_the_loops(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or m)
    model = build("titans", overrides=["vars.d_model=32", "vars.heads=2", "vars.layers=1"])
    model.compile_blocks()
    assert seen and all(kw["options"] == compile_options()["options"] and kw["fullgraph"] for kw in seen)
    seen.clear()
    model.compile_blocks(backend="aot_eager")  # other backends and modes take no inductor options
    model.compile_blocks(mode="max-autotune")
    assert seen and all("options" not in kw for kw in seen)


def _traced_ops(decompositions) -> set:
    """Every operator of the forward and backward graphs AOT autograd traces for a forward-mode
    product whose second matrix is not differentiated (DGD's gain, :func:`gain_scales`)."""
    from functorch.compile import aot_function, make_boxed_func

    seen: set = set()

    def inspect(gm, _inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm)

    def f(x, w1, w2, d):
        def read(p):
            return torch.tanh(x @ w1.T + p) @ w2.T

        _, jd = torch.func.jvp(read, (torch.zeros_like(d),), (d,))
        return jd.square().sum()

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=gen, requires_grad=True) for s in ((5, 4), (6, 4), (3, 6), (5, 6))]
    _quiet_jvp_setup()
    aot_function(f, fw_compiler=inspect, bw_compiler=inspect, decompositions=decompositions)(*args).backward()
    return seen


def test_compiled_graphs_hold_no_efficient_zero_tensors(monkeypatch):
    # inductor reused the storage-less zero tensor of a forward-mode product as a later kernel's
    # output, which it refuses ("ZeroTensors are immutable": compiled hope_large_chunk at T=64)
    from torch._inductor import decomposition

    # what compile_blocks calls: registers the decomposition, for the rest of the process (inductor
    # keeps one table), which every later compiled test then runs with, as a user's process does
    compile_options()
    op = torch.ops.aten._efficientzerotensor.default
    assert "aten._efficientzerotensor.default" not in _traced_ops(decomposition.select_decomp_table())
    # the check sees them where they would be: the table without the registration
    monkeypatch.delitem(decomposition.decompositions, op)
    decomposition.fast_random_decomps.cache_clear()
    try:
        assert "aten._efficientzerotensor.default" in _traced_ops(decomposition.select_decomp_table())
    finally:
        monkeypatch.undo()
        decomposition.fast_random_decomps.cache_clear()
    assert op in decomposition.select_decomp_table()


@pytest.mark.slow
def test_hope_large_chunk_compiles_below_its_chunk():
    # the case that failed: one partial chunk of 64 tokens (the chunk and the CMS periods are 256)
    torch.manual_seed(0)
    model = build("hope_large_chunk", overrides=["vars.d_model=64", "vars.heads=2", "vars.layers=1"])
    tokens = torch.randint(0, model.spec.model.vocab, (2, 64))
    eager = model(tokens)
    eager.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.compile_blocks()
    out = model(tokens)
    out.float().logsumexp(-1).mean().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-3, atol=1e-5, msg=n)


def test_the_cache_keys_say_whether_zeros_are_materialized(monkeypatch):
    # AOT autograd's key does not cover the decomposition table: a graph compiled without the
    # registration (its backward the failing one) must not be taken from the cache for one with it
    import nlgraph.model as model_module

    marks = compile_options()["options"]["unsafe_marked_cacheable_functions"]
    assert marks[model_module.EFFICIENT_ZEROS_KEY] == "materialized"
    monkeypatch.setattr(model_module, "materialize_efficient_zeros", lambda: False)
    marks = compile_options()["options"]["unsafe_marked_cacheable_functions"]
    assert marks[model_module.EFFICIENT_ZEROS_KEY] == "fallback"
    # a caller's own marks join nlgraph's rather than replace them
    given = compile_options(options={"unsafe_marked_cacheable_functions": {"my.op": "1"}})
    assert {"my.op", "torch.ops.higher_order.scan"} <= set(given["options"]["unsafe_marked_cacheable_functions"])


def test_accelerator_graphs_run_host_ops_as_aten(monkeypatch):
    from nlgraph import model as model_module

    host = model_module.HOST_OPS_AS_ATEN
    assert host.items() <= compile_options("cuda")["options"].items()
    assert not set(host) & set(compile_options("cpu")["options"])
    assert not set(host) & set(compile_options()["options"])
    own = compile_options("cuda", options={"disable_cpp_codegen": False})["options"]
    assert own["disable_cpp_codegen"] is False  # the caller's option wins
    # inductor's cpp_wrapper needs C++ code generation: the option stays out under it
    assert "disable_cpp_codegen" not in compile_options("cuda", options={"cpp_wrapper": True})["options"]
    from torch._inductor import config as inductor_config

    with inductor_config.patch(cpp_wrapper=True):
        assert "disable_cpp_codegen" not in compile_options("cuda")["options"]
    # compile_blocks passes the model's device: a CPU model's blocks without the option, the same
    # model's blocks on another device (meta: no memory, no GPU needed) with it
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or m)
    model = build("gated_deltanet", overrides=["vars.d_model=32", "vars.heads=2", "vars.layers=1"])
    model.compile_blocks()
    assert seen and all(not set(host) & set(kw["options"]) for kw in seen)
    seen.clear()
    model.to("meta").compile_blocks()
    assert seen and all(host.items() <= kw["options"].items() for kw in seen)


def test_host_ops_as_aten_compile_no_cpp_kernel():
    """What the option asks of inductor: a host scalar's arithmetic (a level's position) and other
    CPU work become ATen calls, so loading the graph builds and probes no C++."""
    from torch._inductor.utils import run_and_get_code

    import nlgraph.compilers.chunked  # noqa: F401  (imports inductor's mkldnn dependency, its warning ignored)

    def f(x, position):
        return x.sin().cumsum(-1), position + 16

    x, pos = torch.randn(4, 8), torch.zeros((), dtype=torch.int64)
    opts = compile_options("cuda")  # the options of a GPU model, applied to CPU tensors here
    (y, p), code = run_and_get_code(torch.compile(f, **opts), x, pos)
    assert torch.equal(p, pos + 16) and torch.allclose(y, x.sin().cumsum(-1))
    text = "\n".join(code)
    assert "async_compile.cpp" not in text and "torch.ops.aten.add" in text
