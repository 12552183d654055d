"""An independent oracle for HOPE's self-modifying Titans level (nested-learning-math.md §2.8,
§4.2–4.4; arXiv Eqs. 83–94), checked against ``nlgraph.run_level`` in both execution forms.

The oracle is a plain float64 loop over tokens written from the equations. It uses none of
nlgraph's memory, objective, optimizer or gate code: the residual MLP, its inner gradient (by the
chain rule, not autograd), the DGD step, momentum, weight decay and the gates are spelled out
below. Autograd is used only for the *outer* gradients (of a loss on the outputs and the final
state with respect to the inputs and the initial memories), through both computations.

HOPE's setup, every option pinned in the spec so that changed defaults cannot change what is
tested. Per head, with slots □ ∈ {memory, k, v, η, α}, each a residual MLP
``M_□(x) = x + W_□,1 σ(W_□,0 x)`` (``w0`` the first layer, D → hidden; ``w1`` the second):

* chunk boundaries every N tokens; ``P`` is the state at the last boundary (the previous chunk's last
  state, §4.3 — the text, not the printed index); N = 1 is exact online (``P`` = the rolling state);
* ``k_t = l2norm(M_k,P(x_t))``, ``v_t = M_v,P(x_t)`` (optionally l2-normalised),
  ``η_t = s_η · sigmoid(mean_d M_η,P(x_t) + b_η)``, ``α_t = sigmoid(mean_d M_α,P(x_t) + b_α)``;
* self-targets ``v̂_□ = M_□,P(v_t)``; objective ``ℓ_□ = ½‖M_□(k_t) − v̂_□‖²``, gradient at ``P``;
* proximal DGD per affine layer with input ``x̂`` at ``P`` (``k`` for ``w0``, ``σ(W_0,P k)`` for
  ``w1``): ``Δ = −η' (W x̂ x̂ᵀ + ∇_W ℓ)`` with ``η' = η/(1 + η‖x̂‖²)`` (``η`` for the explicit
  form) and ``W`` the rolling state — the DGD erase ``W(I − η' x̂ x̂ᵀ)`` of §2.8;
* momentum ``S ← μ S + Δ`` (HOPE's Table 6 ablation; it accumulates the DGD erase too); weight
  decay ``W ← α W + S``, i.e. Eq. 88's ``W(α I − η' x̂ x̂ᵀ) − η' ∇ℓ`` when μ = 0, or toward the
  initial state, ``W ← W_0 + α (W − W_0) + S`` (``retention.toward: initial``);
* the read ``o_t = M_memory,t−1(q_t)`` (Eq. 94, ``read: before_write``), ``M_memory,t(q_t)``
  (``after_write``) or ``M_memory,P(q_t)`` (``chunk_start``, Eq. 90's read at the boundary).

Drawn by hypothesis (budget: the profile in tests/conftest.py): B, T, H, D, the chunk N, σ, the DGD
form, momentum on/off, value normalisation, the read and the retention target, and the form of
``run_level`` (reference or chunked; N = 1 runs the reference form only).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close

from nlgraph.runtime import run_level

SLOTS = ("memory", "k", "v", "eta", "alpha")
ETA_SCALE, ETA_BIAS, ALPHA_BIAS = 0.5, 0.5, 2.0


def _act(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ(z), σ'(z))`` written out (exact GELU z·Φ(z), SiLU z·s(z), tanh). The logistic s is
    torch's: 1/(1 + exp(−z)) written out overflows for z ≪ 0 and its gradient becomes inf/inf."""
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return z * cdf, cdf + z * pdf
    if name == "silu":
        s = torch.sigmoid(z)
        return z * s, s + z * s * (1.0 - s)
    t = torch.tanh(z)
    return t, 1.0 - t * t


def _mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``W x`` for ``W [B, H, o, i]``, ``x [B, H, i]``."""
    return torch.einsum("bhoi,bhi->bho", w, x)


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bho,bhi->bhoi", a, b)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)


def _read(m: dict, x: torch.Tensor, act: str) -> torch.Tensor:
    """``M(x) = x + W1 σ(W0 x)`` per batch element and head: ``x [B, H, D] -> [B, H, D]``."""
    return x + _mv(m["w1"], _act(act, _mv(m["w0"], x))[0])


def hope_oracle(init: dict, x: torch.Tensor, q: torch.Tensor, mu: torch.Tensor | None, *, chunk: int,
                act: str, proximal: bool, value_norm: bool, read: str, toward: str = "zero") -> tuple[torch.Tensor, dict]:
    """HOPE's level token by token.

    Args:
        init: ``{slot: {"w0": [B, H, Dh, D], "w1": [B, H, D, Dh]}}`` for every slot of :data:`SLOTS`.
        x, q: ``[B, T, H, D]``, the level input and the queries.
        mu: momentum ``[B, T, H]``, or ``None`` for DGD without momentum.
        read: ``before_write`` (o_t = M_t−1(q_t), Eq. 94), ``after_write`` (M_t(q_t)) or
            ``chunk_start`` (M_P(q_t), Eq. 90's read at the boundary).
        toward: weight decay toward ``zero`` (α W) or toward the ``initial`` state (W_0 + α (W − W_0)).

    Returns:
        ``(outputs [B, T, H, D], final)`` where ``final`` has the rolling state, the anchor ``P``
        and the momentum buffers per slot.
    """
    rolling = {s: dict(p) for s, p in init.items()}
    buf = {s: {n: torch.zeros_like(w) for n, w in p.items()} for s, p in init.items()}
    anchor = rolling
    outs = []
    for t in range(x.shape[1]):
        if t % chunk == 0:
            anchor = rolling  # the previous chunk's last state
        xt, qt = x[:, t], q[:, t]
        if read != "after_write":
            o = _read((anchor if read == "chunk_start" else rolling)["memory"], qt, act)
        k = _unit(_read(anchor["k"], xt, act))
        v = _read(anchor["v"], xt, act)
        if value_norm:
            v = _unit(v)
        eta = ETA_SCALE * torch.sigmoid(_read(anchor["eta"], xt, act).mean(-1) + ETA_BIAS)  # [B, H]
        alpha = torch.sigmoid(_read(anchor["alpha"], xt, act).mean(-1) + ALPHA_BIAS)
        new = {}
        for s in SLOTS:
            a0, a1 = anchor[s]["w0"], anchor[s]["w1"]
            target = _read(anchor[s], v, act)  # v̂_□ = M_□,P(v)
            z = _mv(a0, k)
            h, dh = _act(act, z)
            err = k + _mv(a1, h) - target  # ∂ℓ/∂M(k) for ℓ = ½‖M(k) − v̂‖²
            grad = {"w1": _outer(err, h), "w0": _outer(torch.einsum("bhoi,bho->bhi", a1, err) * dh, k)}
            inputs = {"w0": k, "w1": h}
            new[s] = {}
            for n in ("w0", "w1"):
                w, xh = rolling[s][n], inputs[n]
                step = eta / (1.0 + eta * xh.square().sum(-1)) if proximal else eta
                delta = -step[..., None, None] * (_outer(_mv(w, xh), xh) + grad[n])
                if mu is not None:
                    delta = mu[:, t, :, None, None] * buf[s][n] + delta
                    buf[s][n] = delta
                origin = init[s][n] if toward == "initial" else torch.zeros_like(w)
                new[s][n] = origin + alpha[..., None, None] * (w - origin) + delta
        rolling = new
        if (t + 1) % chunk == 0:
            anchor = rolling
        outs.append(o if read != "after_write" else _read(rolling["memory"], qt, act))
    return torch.stack(outs, 1), {"rolling": rolling, "anchor": anchor, "momentum": buf}


def hope_level(heads: int, chunk: int, act: str, proximal: bool, momentum: bool, value_norm: bool,
               read: str, toward: str = "zero") -> dict:
    """The level spec of the oracle's configuration, with every option HOPE relies on spelled out."""
    mem = {"kind": "residual_mlp", "depth": 2, "hidden": "2x", "activation": act, "norm": "none", "bias": False,
           "init": "learned"}
    optimizer = {"kind": "dgd", "form": "proximal" if proximal else "explicit",
                 "lr": {"from": "adaptive.eta", "act": "sigmoid", "per": "head", "scale": ETA_SCALE,
                        "bias": ETA_BIAS}}
    if momentum:
        optimizer["momentum"] = {"from": "input", "act": "sigmoid", "per": "head"}
    return {
        "memory": {**mem, "heads": heads},
        "objective": {"kind": "l2"},
        "optimizer": optimizer,
        "retention": {"kind": "weight_decay", "toward": toward,
                      "gate": {"from": "adaptive.alpha", "act": "sigmoid", "per": "head", "bias": ALPHA_BIAS}},
        "adaptive": {name: mem for name in SLOTS[1:]},
        "keys": {"from": "adaptive.k", "project": False, "norm": "l2", "conv": 0, "feature_map": "identity"},
        "values": {"from": "adaptive.v", "project": False, "self_target": True, "norm": "l2" if value_norm else "none",
                   "conv": 0, "feature_map": "identity"},
        "queries": {"from": "input", "norm": "none", "conv": 0, "feature_map": "identity"},
        "read": read,
        "frequency": 1,
        "gradient_point": {"chunk": chunk} if chunk > 1 else "token",
    }


def _bounded(y: torch.Tensor, final: dict, limit: float = 1e3) -> bool:
    """The oracle's trajectory stayed finite and moderate. Rare draws diverge (the explicit DGD step
    is unstable once η‖x̂‖² > 2; ~1 in 300 here): there both computations overflow, and nothing is
    left to compare."""
    weights = [w for p in final["rolling"].values() for w in p.values()]
    return all(bool(torch.isfinite(t).all()) and t.abs().max() <= limit for t in [y, *weights])


def _prefix(slot: str) -> str:
    return "memory" if slot == "memory" else f"adaptive.{slot}"


def _draw_case(seed: int, b: int, t: int, h: int, dim: int, momentum: bool):
    d = Draw(seed)
    hidden = 2 * dim
    x = d.normal(b, t, h, dim)
    q = d.unit(b, t, h, dim)
    mu = d.uniform(b, t, h, lo=0.05, hi=0.9) if momentum else None
    # initial memories away from the W1 = 0 fixed point, of the size a meta-learned M_0 has
    init = {s: {"w0": d.normal(b, h, hidden, dim, scale=1 / math.sqrt(dim)),
                "w1": d.normal(b, h, dim, hidden, scale=0.5 / math.sqrt(hidden))} for s in SLOTS}
    return x, q, mu, init


def _state_of(init: dict) -> dict[str, torch.Tensor]:
    return {f"{_prefix(s)}.{n}": w for s, p in init.items() for n, w in p.items()}


SHAPES = dict(b=st.integers(1, 2), t=st.integers(1, 12), h=st.integers(1, 2), dim=st.integers(2, 4))
CONFIG = dict(chunk=st.integers(1, 5), act=st.sampled_from(["gelu", "silu", "tanh"]), proximal=st.booleans(),
              momentum=st.booleans(), value_norm=st.booleans(),
              read=st.sampled_from(["before_write", "after_write", "chunk_start"]),
              toward=st.sampled_from(["zero", "initial"]))


@given(SEEDS, st.fixed_dictionaries(SHAPES), st.fixed_dictionaries(CONFIG), st.sampled_from(["reference", "chunked"]))
def test_run_level_matches_the_hope_oracle(seed, shape, config, form):
    """Outputs, every memory, the anchors and the momentum buffers equal the oracle's."""
    if config["chunk"] == 1:
        form = "reference"  # exact online deep memories have no parallel form
    x, q, mu, init = _draw_case(seed, momentum=config["momentum"], **shape)
    level = hope_level(shape["h"], **config)
    y_o, final = hope_oracle(init, x, q, mu, **{k: v for k, v in config.items() if k != "momentum"})
    assume(_bounded(y_o, final))
    y, state = run_level(level, keys=x, values=x, queries=q, momentum=mu, state=_state_of(init), form=form,
                         chunk_size=3)
    assert_close(y, y_o, "outputs")
    expected = {"position": torch.tensor(shape["t"])}
    for s in SLOTS:
        for n in ("w0", "w1"):
            expected[f"{_prefix(s)}.{n}"] = final["rolling"][s][n]
            if config["chunk"] > 1:
                expected[f"anchor.{_prefix(s)}.{n}"] = final["anchor"][s][n]
            if config["momentum"]:
                expected[f"optimizer.{_prefix(s)}.momentum.{n}"] = final["momentum"][s][n]
            if config["toward"] == "initial":
                expected[f"origin.{_prefix(s)}.{n}"] = init[s][n]
    assert set(state) == set(expected), sorted(set(state) ^ set(expected))
    for name, want in expected.items():
        assert_close(state[name], want, name)


@given(SEEDS, st.fixed_dictionaries(SHAPES), st.fixed_dictionaries(CONFIG), st.sampled_from(["reference", "chunked"]))
def test_input_gradients_match_the_hope_oracle(seed, shape, config, form):
    """The outer gradient of a random linear functional of (outputs, final memories) with respect
    to the input x, the queries, the momentum gate and every initial memory M_□,0 (meta-learned)."""
    if config["chunk"] == 1:
        form = "reference"
    x, q, mu, init = _draw_case(seed, momentum=config["momentum"], **shape)
    d = Draw(seed + 1)
    level = hope_level(shape["h"], **config)
    leaves = {"x": x, "q": q, **({"mu": mu} if mu is not None else {}), **_state_of(init)}
    probe_y = d.normal(*x.shape)
    probe_s = {n: d.normal(*w.shape) for n, w in _state_of(init).items()}

    def objective(y, memories):
        return (y * probe_y).sum() + sum((memories[n] * p).sum() for n, p in probe_s.items())

    ora = {n: v.clone().requires_grad_() for n, v in leaves.items()}
    init_o = {s: {n: ora[f"{_prefix(s)}.{n}"] for n in ("w0", "w1")} for s in SLOTS}
    y_o, final = hope_oracle(init_o, ora["x"], ora["q"], ora.get("mu"),
                             **{k: v for k, v in config.items() if k != "momentum"})
    assume(_bounded(y_o.detach(), final))
    mem_o = {f"{_prefix(s)}.{n}": final["rolling"][s][n] for s in SLOTS for n in ("w0", "w1")}
    g_ora = torch.autograd.grad(objective(y_o, mem_o), list(ora.values()))

    lib = {n: v.clone().requires_grad_() for n, v in leaves.items()}
    y, state = run_level(level, keys=lib["x"], values=lib["x"], queries=lib["q"], momentum=lib.get("mu"),
                         state={n: lib[n] for n in probe_s}, form=form, chunk_size=3)
    g_lib = torch.autograd.grad(objective(y, state), list(lib.values()))
    for name, a, b in zip(lib, g_lib, g_ora):
        # second-order chains (the gradient of an inner gradient) lose a few more digits
        assert_close(a, b, f"d/d{name}", tol=1e-8, atol=1e-11)


def test_oracle_tells_the_readings_apart():
    """The oracle's options are not vacuous on this data: each changes the outputs (a check that
    the comparison above could fail if run_level took the other reading)."""
    x, q, mu, init = _draw_case(3, b=1, t=8, h=1, dim=3, momentum=True)
    base = dict(chunk=4, act="gelu", proximal=True, value_norm=False, read="before_write")
    y0, _ = hope_oracle(init, x, q, mu, **base)
    for change in ({"chunk": 1}, {"proximal": False}, {"value_norm": True}, {"read": "after_write"},
                   {"read": "chunk_start"}, {"toward": "initial"}, {"act": "silu"}):
        y1, _ = hope_oracle(init, x, q, mu, **{**base, **change})
        assert (y1 - y0).abs().max() > 1e-6, change
    y1, _ = hope_oracle(init, x, q, None, **base)
    assert (y1 - y0).abs().max() > 1e-6, "momentum"


@pytest.mark.parametrize("form", ["reference", "chunked"])
def test_hope_level_continues_from_its_state(form):
    """Running [0, c) then [c, T) with the returned state equals the oracle over [0, T), for a cut
    inside a gradient chunk (the anchor and the momentum carry over)."""
    x, q, mu, init = _draw_case(11, b=2, t=11, h=2, dim=3, momentum=True)
    config = dict(chunk=4, act="gelu", proximal=True, value_norm=False, read="before_write")
    level = hope_level(2, momentum=True, **config)
    y_o, final = hope_oracle(init, x, q, mu, **config)
    cut = 6
    y1, s1 = run_level(level, keys=x[:, :cut], values=x[:, :cut], queries=q[:, :cut], momentum=mu[:, :cut],
                       state=_state_of(init), form=form, chunk_size=3)
    y2, s2 = run_level(level, keys=x[:, cut:], values=x[:, cut:], queries=q[:, cut:], momentum=mu[:, cut:],
                       state=s1, form=form, chunk_size=3)
    assert_close(torch.cat([y1, y2], 1), y_o, "outputs")
    for s in SLOTS:
        for n in ("w0", "w1"):
            assert_close(s2[f"{_prefix(s)}.{n}"], final["rolling"][s][n], f"{s}.{n}")
