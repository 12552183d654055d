"""HOPE's level with its options (issue 14), against a hand-written per-token loop.

The loop below is written from the equations, not from the runtime: residual-MLP memories
``M(x) = x + W1 σ(W2 x)`` for the level memory and the adaptive ``k, v, η, α`` projections, keys and
values read at the chunk start (gradient point ``{chunk: C}``) and L2-normalised, self-targets
``v̂_□ = M_□(v)``, the proximal DGD step per layer with momentum, and weight-decay retention toward
zero (``α W``, arXiv Eq. 88) or toward the initial state (``W_0 + α (W − W_0)``). Reads are the
rolling state ``M_{t−1}(q_t)`` (``read: before_write``, Eq. 94) or the chunk-boundary state
(``read: chunk_start``, Eq. 90). Both execution forms must follow it.
"""

import pytest
import torch
import torch.nn.functional as F

from nlgraph.runtime import run_level

SLOTS = ("memory", "k", "v", "eta", "alpha")
BIAS = 2.0


def _spec(read: str, toward: str, chunk: int) -> dict:
    mem = {"kind": "residual_mlp", "hidden": "2x"}
    return {
        "memory": mem,
        "objective": {"kind": "l2"},
        "optimizer": {"kind": "dgd", "form": "proximal", "momentum": {"from": "input", "act": "sigmoid"},
                      "lr": {"from": "adaptive.eta", "act": "sigmoid", "scale": 1.0}},
        "retention": {"kind": "weight_decay", "toward": toward,
                      "gate": {"from": "adaptive.alpha", "act": "sigmoid", "bias": BIAS}},
        "adaptive": {s: mem for s in SLOTS[1:]},
        "keys": {"from": "adaptive.k", "project": False, "norm": "l2"},
        "values": {"from": "adaptive.v", "project": False, "norm": "l2", "self_target": True},
        "queries": {"from": "input", "norm": "l2"},
        "read": read,
        "gradient_point": {"chunk": chunk},
    }


def _m(w: dict, x: torch.Tensor) -> torch.Tensor:
    """``x + W1 gelu(W2 x)``; ``w0`` is W2 (first layer), ``w1`` is W1."""
    return x + w["w1"] @ F.gelu(w["w0"] @ x)


def _by_hand(m: dict, x, q, mu, read: str, toward: str, chunk: int):
    """``m``: slot -> {w0, w1}; ``x, q [T, D]``, ``mu [T]``. Returns (reads [T, D], final m)."""
    origin = {s: {p: t.clone() for p, t in w.items()} for s, w in m.items()}
    mom = {s: {p: torch.zeros_like(t) for p, t in w.items()} for s, w in m.items()}
    ys = []
    for t in range(x.shape[0]):
        if t % chunk == 0:
            a = {s: {p: w.clone() for p, w in ws.items()} for s, ws in m.items()}  # chunk-start state
        ys.append(_m(a["memory"] if read == "chunk_start" else m["memory"], q[t]))
        k = F.normalize(_m(a["k"], x[t]), dim=-1, eps=1e-6)
        v = F.normalize(_m(a["v"], x[t]), dim=-1, eps=1e-6)
        eta = torch.sigmoid(_m(a["eta"], x[t]).mean())
        alpha = torch.sigmoid(_m(a["alpha"], x[t]).mean() + BIAS)
        new = {}
        for s in SLOTS:
            target = _m(a[s], v).detach()
            w0 = a[s]["w0"].clone().requires_grad_(True)
            w1 = a[s]["w1"].clone().requires_grad_(True)
            loss = 0.5 * (_m({"w0": w0, "w1": w1}, k) - target).square().sum()
            g0, g1 = torch.autograd.grad(loss, (w0, w1))
            inputs = {"w0": k, "w1": F.gelu(a[s]["w0"] @ k)}  # each layer's input at the gradient point
            grads = {"w0": g0, "w1": g1}
            new[s] = {}
            for p in ("w0", "w1"):
                xin, w = inputs[p], m[s][p]
                step = eta / (1.0 + eta * xin.square().sum())
                delta = -step * (torch.outer(w @ xin, xin) + grads[p])
                mom[s][p] = mu[t] * mom[s][p] + delta
                kept = alpha * w if toward == "zero" else origin[s][p] + alpha * (w - origin[s][p])
                new[s][p] = kept + mom[s][p]
        m = new
    return torch.stack(ys), m


def _state(m: dict) -> dict:
    out = {}
    for s, ws in m.items():
        prefix = "memory" if s == "memory" else f"adaptive.{s}"
        for p, w in ws.items():
            out[f"{prefix}.{p}"] = w[None, None]
    return out


def _draw(seed: int, t: int, dim: int):
    g = torch.Generator().manual_seed(seed)
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    m = {s: {"w0": 0.7 * n(2 * dim, dim), "w1": 0.5 * n(dim, 2 * dim)} for s in SLOTS}
    x = 2.0 * n(1, t, 1, dim)  # unnormalised, as the keys' convolution output in a model
    q = F.normalize(n(1, t, 1, dim), dim=-1)
    mu = torch.sigmoid(n(1, t, 1))
    return m, x, q, mu


@pytest.mark.parametrize("form", ["reference", "chunked"])
@pytest.mark.parametrize("toward", ["zero", "initial"])
@pytest.mark.parametrize("read", ["before_write", "chunk_start"])
@pytest.mark.parametrize("seed", [0])
def test_hope_level_follows_the_hand_loop(seed, read, toward, form):
    t, dim, chunk = 11, 3, 4
    m, x, q, mu = _draw(seed, t, dim)
    y, state = run_level(_spec(read, toward, chunk), keys=x, values=x, queries=q, momentum=mu,
                         state=_state(m), form=form)
    ys, final = _by_hand(m, x[0, :, 0], q[0, :, 0], mu[0, :, 0], read, toward, chunk)
    torch.testing.assert_close(y[0, :, 0], ys, rtol=1e-9, atol=1e-10)
    for key, w in _state(final).items():
        torch.testing.assert_close(state[key], w, rtol=1e-9, atol=1e-10)
    if toward == "initial":
        for key, w in _state(m).items():
            assert torch.equal(state[f"origin.{key}"], w)


def test_the_read_options_differ_inside_a_chunk():
    """Guard against a vacuous pass: the two reads agree on the first token of every chunk and
    nowhere else (tokens inside a chunk see the writes of earlier tokens only with before_write)."""
    m, x, q, mu = _draw(3, 8, 3)
    ys = {r: run_level(_spec(r, "initial", 4), keys=x, values=x, queries=q, momentum=mu, state=_state(m),
                       form="chunked")[0][0, :, 0] for r in ("before_write", "chunk_start")}
    gap = (ys["before_write"] - ys["chunk_start"]).norm(dim=-1)
    assert torch.all(gap[[0, 4]] < 1e-12)
    assert torch.all(gap[[1, 2, 3, 5, 6, 7]] > 1e-6)


@pytest.mark.parametrize("form", ["reference", "chunked"])
def test_retention_toward_initial_state_streams_exactly(form):
    """Two segments with the returned state (which carries ``origin.*``, the sequence's M_0)
    equal one pass, also when the split falls inside a chunk."""
    m, x, q, mu = _draw(4, 10, 3)
    spec = _spec("before_write", "initial", 4)
    y, s = run_level(spec, keys=x, values=x, queries=q, momentum=mu, state=_state(m), form=form)
    y1, s1 = run_level(spec, keys=x[:, :6], values=x[:, :6], queries=q[:, :6], momentum=mu[:, :6],
                       state=_state(m), form=form)
    y2, s2 = run_level(spec, keys=x[:, 6:], values=x[:, 6:], queries=q[:, 6:], momentum=mu[:, 6:], state=s1,
                       form=form)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-12)
    for key in s:
        torch.testing.assert_close(s2[key], s[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["decay", "weight_decay"])
def test_online_linear_memory_decays_toward_its_initial_state(kind):
    """The exact online chunkwise form (linear memory, gradient point token) with ``toward:
    initial`` against the per-token rule W ← W_0 + α (W − W_0), then (decay) or around (weight
    decay) the delta-rule step, with and without momentum."""
    g = torch.Generator().manual_seed(5)
    t, dk, dv = 9, 3, 2
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    k, v = F.normalize(n(1, t, 1, dk), dim=-1), n(1, t, 1, dv)
    beta, alpha, mu = torch.sigmoid(n(1, t, 1)), torch.sigmoid(n(1, t, 1) + 1), torch.sigmoid(n(1, t, 1))
    w0 = n(dv, dk)
    for momentum in (False, True):
        opt = {"kind": "momentum", "lr": {"from": "input"}, "momentum": {"from": "input"}} if momentum else (
            {"kind": "gd", "lr": {"from": "input"}})
        spec = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"}, "optimizer": opt,
                "retention": {"kind": kind, "toward": "initial", "gate": {"from": "input"}}}
        extra = {"momentum": mu} if momentum else {}
        y, state = run_level(spec, keys=k, values=v, queries=k, lr=beta, retention=alpha,
                             state={"memory.w0": w0[None, None]}, form="chunked", chunk_size=4, **extra)
        w, s, ys = w0.clone(), torch.zeros_like(w0), []
        for i in range(t):
            kk, vv, a, b = k[0, i, 0], v[0, i, 0], alpha[0, i, 0], beta[0, i, 0]
            kept = w0 + a * (w - w0)
            point = kept if kind == "decay" else w  # decay: the step sees the decayed state
            grad = torch.outer(point @ kk - vv, kk)
            if momentum:
                s = mu[0, i, 0] * s - b * grad
                w = kept + s
            else:
                w = kept - b * grad
            ys.append(w @ kk)
        torch.testing.assert_close(y[0, :, 0], torch.stack(ys), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["memory.w0"][0, 0], w, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("read", ["before_write", "chunk_start"])
def test_scan_carries_the_initial_state(read):
    """The chunk loop as torch's ``scan`` (what ``torch.compile`` runs) carries ``W_0`` through the
    steps and gives the Python loop's outputs and state, in the mini-batch and the online form."""
    from nlgraph.compilers.chunked import run_chunked
    from nlgraph.levels.run import prepare
    from nlgraph.spec.loader import load_level

    m, x, q, mu = _draw(0, 16, 3)
    spec = load_level(_spec(read, "initial", 4))
    runs = [run_chunked(prepare(spec, keys=x, values=x, queries=q, momentum=mu, state=_state(m)), loop=loop)
            for loop in ("python", "scan")]
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-10, atol=1e-12)
    for key in runs[0][1]:
        torch.testing.assert_close(runs[1][1][key], runs[0][1][key], rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    k = F.normalize(torch.randn(1, 16, 1, 3, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(1, 16, 1, 2, generator=g, dtype=torch.float64)
    w0 = torch.randn(1, 1, 2, 3, generator=g, dtype=torch.float64)
    online = load_level({"memory": {"kind": "linear"}, "objective": {"kind": "l2"},
                         "optimizer": {"kind": "gd", "lr": 0.5},
                         "retention": {"kind": "decay", "toward": "initial", "gate": 0.9}, "read": read})
    ys = [run_chunked(prepare(online, keys=k, values=v, queries=k, state={"memory.w0": w0}), chunk_size=4, loop=loop)[0]
          for loop in ("python", "scan")]
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-10, atol=1e-12)
