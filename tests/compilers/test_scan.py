"""The chunked form's chunk loop as torch's higher-order ``scan`` equals the Python loop.

``compilers/chunked.py`` steps through chunks with a Python loop, which ``torch.compile`` unrolls
(one copy of the chunk's maths per chunk), or with ``scan`` (traced once). Both run the same
per-chunk function; here they agree on outputs, final state and gradients with respect to every
input and the initial state, for online (exact chunkwise) and mini-batch levels, with a partial
last chunk and when a sequence is continued from a state inside a chunk (pending updates, an
anchor). A compiled level that scans equals eager.
"""

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "levels"))
from levelcheck import Draw, assert_close, assert_states_close, initial_memories  # noqa: E402

import nlgraph.compilers.chunked as chunked  # noqa: E402
from nlgraph.runtime import run_level  # noqa: E402
from nlgraph.spec.loader import load_level  # noqa: E402

# the module (the attribute ``torch._higher_order_ops.scan`` is the function)
scan_module = importlib.import_module("torch._higher_order_ops.scan")


pytestmark = pytest.mark.usefixtures("float64")


RESIDUAL = {"kind": "residual_mlp", "hidden": "2x"}
LEVELS = {
    # online, exact chunkwise form (the implementation chunk is the scan step)
    "gated_delta_rule": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
                         "optimizer": {"kind": "gd", "lr": {"from": "input"}},
                         "retention": {"kind": "decay", "gate": {"from": "input"}}},
    "titans_linear": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
                      "optimizer": {"kind": "dgd", "form": "proximal", "lr": {"from": "input"},
                                    "momentum": {"from": "input"}},
                      "retention": {"kind": "weight_decay", "gate": {"from": "input", "per": "channel"}},
                      "read": "before_write"},
    # per-head gates: the full chunks' solve for all chunks at once, the state's recurrence scanned
    "dgd_momentum_toward_initial": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
                                    "optimizer": {"kind": "dgd", "form": "proximal", "lr": {"from": "input"},
                                                  "momentum": {"from": "input"}},
                                    "retention": {"kind": "decay", "gate": {"from": "input"}, "toward": "initial"},
                                    "read": "before_write"},
    "linear_attention_momentum": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "dot"},
                                  "optimizer": {"kind": "momentum", "lr": {"from": "input"},
                                                "momentum": {"from": "input"}},
                                  "retention": {"kind": "weight_decay", "gate": {"from": "input"}}},
    # mini-batch: Titans LMM (MLP memory, momentum, weight decay, chunk-start gradients)
    "titans": {"memory": {"kind": "mlp", "heads": 2, "depth": 2, "hidden": "2x", "activation": "silu"},
               "objective": {"kind": "l2"},
               "optimizer": {"kind": "momentum", "lr": {"from": "input"}, "momentum": {"from": "input"}},
               "retention": {"kind": "weight_decay", "gate": {"from": "input"}},
               "gradient_point": {"chunk": 3}},
    # mini-batch with a period: updates pend until the period's last token (TTT-MLP with biases)
    "ttt_period": {"memory": {"kind": "mlp", "heads": 2, "hidden": 4, "bias": True}, "objective": {"kind": "l2"},
                   "optimizer": {"kind": "momentum", "lr": {"from": "input"}, "momentum": 0.5},
                   "retention": {"kind": "decay", "gate": {"from": "input"}}, "frequency": 3},
    # HOPE's self-modifying Titans: adaptive k, v, η, α, self-generated targets, proximal DGD with
    # momentum, weight decay, reads before the write
    "hope": {"memory": {"kind": "residual_mlp", "heads": 2, "hidden": "2x"}, "objective": {"kind": "l2"},
             "optimizer": {"kind": "dgd", "form": "proximal",
                           "lr": {"from": "adaptive.eta", "act": "sigmoid", "scale": 0.1},
                           "momentum": {"from": "input"}},
             "retention": {"kind": "weight_decay", "gate": {"from": "adaptive.alpha", "act": "sigmoid", "bias": 3.0}},
             "adaptive": {"k": RESIDUAL, "v": RESIDUAL, "eta": RESIDUAL, "alpha": RESIDUAL},
             "keys": {"from": "adaptive.k", "project": False, "norm": "l2"},
             "values": {"from": "adaptive.v", "project": False, "self_target": True},
             "queries": {"from": "input", "norm": "l2"},
             "read": "before_write", "gradient_point": {"chunk": 3}},
}
ONLINE = ("gated_delta_rule", "titans_linear", "dgd_momentum_toward_initial", "linear_attention_momentum")
CHUNK = 3  # the mini-batch levels' chunk, and the implementation chunk of the online ones
B, H, D = 2, 2, 3


def _inputs(name: str, d: Draw, t: int) -> dict:
    """Every tensor the level reads, ``[B, T, H, ...]``; the self-modifying level gets its input
    ``x`` once, as keys and values (one tensor in two roles)."""
    level = LEVELS[name]
    x = {"queries": d.normal(B, t, H, D)}
    if "adaptive" in level:
        x["keys"] = d.normal(B, t, H, D)
        x["values"] = x["keys"]
    else:
        x["keys"], x["values"] = d.unit(B, t, H, D), d.normal(B, t, H, D)
        x["lr"] = d.uniform(B, t, H, lo=0.02, hi=0.5 if level["memory"]["kind"] == "linear" else 0.1)
        gate = level.get("retention", {}).get("gate", {})
        if gate.get("from") == "input":
            per = gate.get("per", "head")
            x["retention"] = d.uniform(B, t, H, *((D,) if per == "channel" else ()), lo=0.5, hi=1.0)
    if level["optimizer"].get("momentum") == {"from": "input"}:
        x["momentum"] = d.uniform(B, t, H, hi=0.9)
    return x


def _leaves(x: dict, state: dict) -> tuple[dict, dict]:
    """Fresh leaves requiring grad (a tensor passed in two roles stays one leaf)."""
    fresh: dict[int, torch.Tensor] = {}
    out = {k: fresh.setdefault(id(v), v.detach().clone().requires_grad_()) for k, v in x.items()}
    return out, {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in state.items()}


@contextmanager
def _loop(loop: str):
    old = chunked.LOOP
    chunked.LOOP = loop
    try:
        yield
    finally:
        chunked.LOOP = old


def _grads(y, state, x, state0, seed=1234):
    """Gradients of a random linear function of the outputs and every final floating state
    tensor, with respect to the inputs and the initial state."""
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g)).sum()
    for k in sorted(state):
        if state[k].is_floating_point():
            loss = loss + (state[k] * torch.randn(state[k].shape, generator=g)).sum()
    leaves = list({id(v): v for v in x.values()}.values()) + [v for v in state0.values() if v.requires_grad]
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _compare(name: str, x: dict, state: dict, monkeypatch) -> None:
    """Python loop vs scan from ``state``: outputs, final state, gradients."""
    level = load_level(LEVELS[name])
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real_scan(*args, **kwargs)

    real_scan = scan_module.scan
    monkeypatch.setattr(scan_module, "scan", counted)
    results = []
    for loop in ("python", "scan"):
        xs, st = _leaves(x, state)
        with _loop(loop):
            y, new = run_level(level, form="chunked", chunk_size=CHUNK, state=st, **xs)
        results.append((y, new, _grads(y, new, xs, st)))
    assert calls, "the scan loop did not scan"
    (y1, s1, g1), (y2, s2, g2) = results
    assert_close(y2, y1, "outputs", tol=1e-10)
    assert_states_close(s2, s1, tol=1e-10)
    assert len(g1) == len(g2)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert (a is None) == (b is None), f"gradient {i}"
        if a is not None:
            assert_close(b, a, f"gradient {i}", tol=1e-10)


@pytest.mark.parametrize("name", sorted(LEVELS))
def test_scan_equals_python_loop(name, monkeypatch):
    """From a perturbed initial memory, T = 11 = three full chunks of 3 and a partial one."""
    d = Draw(0)
    x = _inputs(name, d, 11)
    state = initial_memories(LEVELS[name], d, B, D, noise=0.2)
    _compare(name, x, state, monkeypatch)


@pytest.mark.parametrize("name", sorted(set(LEVELS) - set(ONLINE)))
def test_scan_continues_a_state_inside_a_chunk(name, monkeypatch):
    """A mini-batch level continued at position 4 (inside a chunk): the first segment is partial
    and starts from pending updates or an anchor; the scan takes the full chunks after it."""
    d = Draw(1)
    x = _inputs(name, d, 14)
    state0 = initial_memories(LEVELS[name], d, B, D, noise=0.2)
    head = {k: v[:, :4] for k, v in x.items()}
    if "adaptive" in LEVELS[name]:
        head["values"] = head["keys"]
    with _loop("python"), torch.no_grad():
        _, state = run_level(load_level(LEVELS[name]), form="chunked", state=state0, **head)
    assert int(state["position"]) == 4
    tail = {k: v[:, 4:].clone() for k, v in x.items()}
    if "adaptive" in LEVELS[name]:
        tail["values"] = tail["keys"]
    _compare(name, tail, state, monkeypatch)


def test_compiled_scan_equals_eager():
    """``torch.compile(fullgraph=True)`` of a mini-batch level scans its full chunks (``auto``)
    and equals the eager Python loop, forward and backward."""
    assert chunked.MIN_SCAN_CHUNKS <= 4
    name = "titans"
    level = load_level(LEVELS[name])  # validation (pydantic) stays outside the compiled region
    d = Draw(2)
    x = _inputs(name, d, 14)  # four full chunks (chunked.MIN_SCAN_CHUNKS) and a partial one
    state = initial_memories(LEVELS[name], d, B, D, noise=0.2)

    def step(x, state):
        y, new = run_level(level, form="chunked", state=state, **x)
        return y, new["memory.w0"], new["optimizer.memory.momentum.w1"]

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    results = []
    with _loop("auto"):
        for fn in (step, torch.compile(step, backend=backend, fullgraph=True)):
            torch._dynamo.reset()
            xs, st = _leaves(x, state)
            y, w, s = fn(xs, st)
            g = torch.Generator().manual_seed(7)
            loss = (y * torch.randn(y.shape, generator=g)).sum() + (w * torch.randn(w.shape, generator=g)).sum()
            loss = loss + (s * torch.randn(s.shape, generator=g)).sum()
            results.append((y, w, s, torch.autograd.grad(loss, [*xs.values(), *st.values()])))
    assert any(n.target is torch.ops.higher_order.scan for gm in graphs for n in gm.graph.nodes)
    (y1, w1, s1, g1), (y2, w2, s2, g2) = results
    assert_close(y2, y1, "outputs", tol=1e-10)
    assert_close(w2, w1, "memory.w0", tol=1e-10)
    assert_close(s2, s1, "momentum.w1", tol=1e-10)
    for a, b in zip(g1, g2):
        assert_close(b, a, "gradient", tol=1e-10)
