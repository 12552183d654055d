"""Self-modifying Titans (HOPE's sequence level, arXiv Eqs. 83–93; nested-learning-math.md §4,
§7.17): keys, values, learning rate and retention come from memories updated in context, every
memory regresses onto its own read of the value, and all run through the same runtime.

Input convention: the level input x is passed as ``keys=`` (and ``values=``) because those streams
come from adaptive projections; gates from adaptive projections read the same x."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, run

SLOTS = ("memory", "k", "v", "eta", "alpha")


def _level(chunk: int | None) -> dict:
    level = {
        "memory": {"kind": "linear"},
        "objective": {"kind": "l2"},
        "optimizer": {"kind": "dgd", "lr": {"from": "adaptive.eta", "act": "sigmoid", "scale": 0.1}},
        "retention": {"kind": "weight_decay", "gate": {"from": "adaptive.alpha", "act": "sigmoid", "bias": 3.0}},
        "adaptive": {name: {"kind": "linear"} for name in SLOTS[1:]},
        "keys": {"from": "adaptive.k", "project": False, "norm": "l2"},
        "values": {"from": "adaptive.v", "project": False, "self_target": True},
        "queries": {"from": "input", "norm": "l2"},
        "read": "before_write",
    }
    if chunk:
        level["gradient_point"] = {"chunk": chunk}
    return level


def _by_hand(m: dict, x: torch.Tensor, q: torch.Tensor, chunk: int) -> tuple[torch.Tensor, dict]:
    """The sequential rule with every projection, target and gradient at the chunk-start state
    (chunk 1: the previous token's state), the DGD erase on the rolling state:
    M_□ ← α M_□ − η M_□ k kᵀ − η (A_□ k − A_□ v) kᵀ, o_t = M_memory,t−1 q_t."""
    ys = []
    for i in range(x.shape[0]):
        if i % chunk == 0:
            a = {s: w.clone() for s, w in m.items()}  # the anchors
        ys.append(m["memory"] @ q[i])
        k = F.normalize(a["k"] @ x[i], dim=-1, eps=1e-6)
        v = a["v"] @ x[i]
        eta = 0.1 * torch.sigmoid((a["eta"] @ x[i]).mean())
        alpha = torch.sigmoid((a["alpha"] @ x[i]).mean() + 3.0)
        for s in SLOTS:
            target = a[s] @ v  # v̂_□ = M_□(v)
            m[s] = alpha * m[s] - eta * torch.outer(m[s] @ k, k) - eta * torch.outer(a[s] @ k - target, k)
    return torch.stack(ys), m


@given(SEEDS, st.integers(1, 16), st.integers(2, 4), st.sampled_from([None, 2, 3, 5]),
       st.sampled_from(["reference", "chunked"]))
def test_self_modifying_titans_follows_its_rule(seed, t, dim, chunk, form):
    if chunk is None:
        form = "reference"  # exact online self-modification is sequential by nature
    d = Draw(seed)
    x, q = d.normal(1, t, 1, dim), d.unit(1, t, 1, dim)
    m = {s: torch.eye(dim) + 0.3 * d.normal(dim, dim) for s in SLOTS}
    state = {("memory.w0" if s == "memory" else f"adaptive.{s}.w0"): w[None, None] for s, w in m.items()}
    y, final = run(_level(chunk), form, keys=x, values=x, queries=q, state=state)
    ys, m = _by_hand(m, x[0, :, 0], q[0, :, 0], chunk or 1)
    assert_close(y[0, :, 0], ys, "outputs")
    for s, w in m.items():
        assert_close(final["memory.w0" if s == "memory" else f"adaptive.{s}.w0"][0, 0], w, s)


@given(SEEDS, st.integers(2, 4))
def test_zero_initialised_residual_memories_start_as_identity(seed, dim):
    """With W_1 = 0 (``init: zeros``) every residual memory is the identity at t = 0, so the first
    token sees k = x, v = x and v̂ = v: the same first write as a plain level fed (x, x)."""
    d = Draw(seed)
    mem = {"kind": "residual_mlp", "hidden": "2x", "init": "zeros"}
    adaptive = {"memory": mem, "objective": {"kind": "l2"}, "optimizer": {"kind": "gd", "lr": 0.3},
                "adaptive": {"k": mem, "v": mem}, "keys": {"from": "adaptive.k"},
                "values": {"from": "adaptive.v", "self_target": True}}
    plain = {"memory": mem, "objective": {"kind": "l2"}, "optimizer": {"kind": "gd", "lr": 0.3}}
    x, q = d.normal(2, 1, 1, dim), d.normal(2, 1, 1, dim)
    y1, s1 = run(adaptive, "reference", keys=x, values=x, queries=q)
    y2, s2 = run(plain, "reference", keys=x, values=x, queries=q)
    for n in ("w0", "w1"):
        assert_close(s1[f"memory.{n}"], s2[f"memory.{n}"], n)
    assert_close(y1, y2, "outputs")
