"""The chunked (parallel) form equals the reference form on outputs, final state and gradients
with respect to keys, values, queries, gates and the initial state, for every level kind that has
a parallel form; its implementation chunk size never changes results."""

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, assert_states_close, run
from opspy import OpDtypes

from nlgraph.levels import optimizers
from nlgraph.runtime import init_state, level_form
from nlgraph.spec.loader import load_level


def _optimizer(draw) -> dict:
    kind = draw(st.sampled_from(["gd", "momentum", "dgd", "dgd_proximal", "dgd_momentum"]))
    opt = {"kind": "dgd" if kind.startswith("dgd") else kind, "lr": {"from": "input"}}
    if kind in ("momentum", "dgd_momentum"):
        opt["momentum"] = {"from": "input"}
    if kind == "dgd_proximal":
        opt["form"] = "proximal"
    return opt


@st.composite
def online_levels(draw):
    """Linear memories, exact online: DeltaNet / GDN / Titans-form / linear attention / GLA ..."""
    level = {"memory": {"kind": "linear"}, "objective": {"kind": draw(st.sampled_from(["dot", "l2", "outer"]))},
             "optimizer": _optimizer(draw), "read": draw(st.sampled_from(["after_write", "before_write"]))}
    retention = draw(st.sampled_from([None, "decay", "weight_decay"]))
    per = draw(st.sampled_from(["head", "channel"]))
    if retention:
        level["retention"] = {"kind": retention, "gate": {"from": "input", "per": per}}
    return level


@st.composite
def minibatch_levels(draw):
    """Any memory and objective under mini-batch semantics (gradient-point chunk, or a period)."""
    memory = draw(st.sampled_from([
        {"kind": "linear"},
        {"kind": "mlp", "depth": 2, "hidden": 4, "activation": "gelu", "bias": True},
        {"kind": "mlp", "depth": 3, "hidden": 3, "activation": "swiglu"},
        {"kind": "residual_mlp", "hidden": "2x", "activation": "tanh", "norm": "rms", "bias": True},
    ]))
    objective = draw(st.sampled_from([{"kind": "l2"}, {"kind": "dot"}, {"kind": "huber", "delta": 0.5},
                                      {"kind": "lp", "p": 3.0}]))
    level = {"memory": memory, "objective": objective, "optimizer": _optimizer(draw),
             "read": draw(st.sampled_from(["after_write", "before_write", "chunk_start"]))}
    if draw(st.booleans()) or level["read"] == "chunk_start":
        level["gradient_point"] = {"chunk": draw(st.integers(2, 6))}
    else:
        level["frequency"] = draw(st.integers(2, 5))
    retention = draw(st.sampled_from([None, "decay", "weight_decay"]))
    if retention:
        # per-channel retention scales a linear memory's key channels
        per = draw(st.sampled_from(["head", "channel"])) if memory["kind"] == "linear" else "head"
        level["retention"] = {"kind": retention, "gate": {"from": "input", "per": per}}
        if draw(st.booleans()):
            level["retention"]["toward"] = "initial"
    return level


def _inputs(level, d: Draw, b, t, h, dim):
    """Leaf tensors for everything a level reads, all requiring grad."""
    spec = load_level(level)
    channel = spec.retention is not None and spec.retention.gate.per == "channel"
    x = {
        "keys": d.unit(b, t, h, dim), "values": d.normal(b, t, h, dim), "queries": d.normal(b, t, h, dim),
        # small enough steps that no drawn dynamics diverge (lp's gradient grows like |r|^{p−1},
        # and through a depth-3 SwiGLU memory the inner dynamics are of high degree)
        "lr": d.uniform(b, t, h, lo=0.02, hi=0.5 if spec.memory.kind == "linear" else 0.1)
        * (0.2 if spec.objective.kind == "lp" else 1.0),
    }
    if spec.retention is not None:
        x["retention"] = d.uniform(b, t, h, dim, lo=0.5, hi=1.0) if channel else d.uniform(b, t, h, lo=0.5, hi=1.0)
    if "momentum" in level["optimizer"]:
        x["momentum"] = d.uniform(b, t, h, lo=0.0, hi=0.9)
    state = init_state(spec, batch=b, d_key=dim, d_value=dim, generator=d.g)
    x["state"] = {n: s + 0.2 * d.normal(*s.shape) for n, s in state.items() if n.startswith(("memory.", "adaptive."))}
    return x


def _leaves(x: dict) -> dict:
    out = {k: v.clone().requires_grad_() for k, v in x.items() if k != "state"}
    out["state"] = {k: v.clone().requires_grad_() for k, v in x["state"].items()}
    return out


def _check(level, x: dict, d: Draw, chunk_size: int | None = None, grad_atol: float = 1e-12) -> None:
    assert level_form(level) == "chunked"
    results = []
    for form in ("reference", "chunked"):
        leaves = _leaves(x)
        y, state = run(level, form, **leaves, chunk_size=chunk_size)
        results.append((leaves, y, state))
    (l1, y1, s1), (l2, y2, s2) = results
    assert_close(y2, y1, "outputs")
    assert_states_close(s2, s1)
    # one random cotangent for the outputs and for every final floating state tensor
    cot_g = torch.Generator().manual_seed(1234)
    cot_y = torch.randn(y1.shape, generator=cot_g)
    cot_s = {k: torch.randn(v.shape, generator=cot_g) for k, v in s1.items() if v.is_floating_point()}
    grads = []
    for leaves, y, state in results:
        loss = (y * cot_y).sum() + sum((state[k] * c).sum() for k, c in cot_s.items())
        flat = [v for k, v in leaves.items() if k != "state"] + list(leaves["state"].values())
        grads.append(torch.autograd.grad(loss, flat, allow_unused=True))
    names = [k for k in l1 if k != "state"] + [f"state[{k}]" for k in l1["state"]]
    for name, g1, g2 in zip(names, *grads):
        g1 = torch.zeros(()) if g1 is None else g1
        g2 = torch.zeros(()) if g2 is None else g2
        assert_close(g2, g1, f"d/d{name}", tol=1e-8, atol=grad_atol)


@given(SEEDS, online_levels(), st.integers(1, 2), st.integers(1, 16), st.integers(1, 2), st.integers(2, 5), st.integers(1, 7))
def test_chunked_equals_reference_online(seed, level, b, t, h, dim, chunk_size):
    level["memory"]["heads"] = h
    d = Draw(seed)
    _check(level, _inputs(level, d, b, t, h, dim), d, chunk_size)


@given(SEEDS, minibatch_levels(), st.integers(1, 16), st.integers(1, 2), st.integers(2, 4))
def test_chunked_equals_reference_minibatch(seed, level, t, h, dim):
    level["memory"]["heads"] = h
    d = Draw(seed)
    _check(level, _inputs(level, d, 2, t, h, dim), d)


@st.composite
def self_modifying_levels(draw):
    """HOPE's self-modifying Titans (adaptive k, v, η, α; self-generated targets) at chunk N."""
    mem = draw(st.sampled_from([{"kind": "residual_mlp", "hidden": "2x"}, {"kind": "linear"},
                                {"kind": "mlp", "hidden": 3, "activation": "silu"}]))
    level = {
        "memory": {"kind": "residual_mlp", "hidden": "2x"},
        "objective": {"kind": "l2"},
        "optimizer": {"kind": "dgd", "form": draw(st.sampled_from(["explicit", "proximal"])),
                      "lr": {"from": "adaptive.eta", "act": "sigmoid", "scale": 0.1},
                      "momentum": {"from": "input"}},
        "retention": {"kind": draw(st.sampled_from(["decay", "weight_decay"])),
                      "gate": {"from": "adaptive.alpha", "act": "sigmoid", "bias": 3.0}},
        "adaptive": {"k": mem, "v": mem, "eta": mem, "alpha": mem},
        "keys": {"from": "adaptive.k", "project": False, "norm": "l2"},
        "values": {"from": "adaptive.v", "project": False, "self_target": True},
        "queries": {"from": "input", "norm": "l2"},
        "read": draw(st.sampled_from(["after_write", "before_write"])),
        "gradient_point": {"chunk": draw(st.integers(2, 5))},
    }
    return level


@given(SEEDS, self_modifying_levels(), st.integers(1, 12), st.integers(2, 4))
def test_chunked_equals_reference_self_modifying(seed, level, t, dim):
    d = Draw(seed)
    b, h = 2, 1
    xin = d.normal(b, t, h, dim)
    spec = load_level(level)
    state = init_state(spec, batch=b, d_key=dim, d_value=dim, generator=d.g)
    x = {"keys": xin, "values": xin.clone(), "queries": d.unit(b, t, h, dim), "momentum": d.uniform(b, t, h, hi=0.9),
         "state": {n: s + 0.1 * d.normal(*s.shape) for n, s in state.items() if n.startswith(("memory.", "adaptive."))}}
    _check(level, x, d)


@given(SEEDS, st.integers(1, 20), st.integers(1, 8), st.integers(1, 8))
def test_chunk_size_is_a_free_knob(seed, t, c1, c2):
    """The implementation chunk of the exact online form never changes results (Gated DeltaNet)."""
    d = Draw(seed)
    level = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"},
             "optimizer": {"kind": "momentum", "lr": 0.3, "momentum": 0.5}, "retention": {"kind": "decay", "gate": 0.9}}
    k, v, q = d.unit(2, t, 1, 3), d.normal(2, t, 1, 3), d.normal(2, t, 1, 3)
    y1, s1 = run(level, "chunked", keys=k, values=v, queries=q, chunk_size=c1)
    y2, s2 = run(level, "chunked", keys=k, values=v, queries=q, chunk_size=c2)
    assert_close(y1, y2, "outputs")
    assert_states_close(s1, s2)


@st.composite
def adam_muon_levels(draw):
    """Adam and Muon memories (Atlas' optimizer) under mini-batch semantics: their per-token states
    are materialised, not solved, in the chunked form."""
    kind = draw(st.sampled_from(["adam", "muon"]))
    if kind == "adam":
        memory = draw(st.sampled_from([
            {"kind": "linear"},
            {"kind": "mlp", "depth": 2, "hidden": 4, "activation": "gelu", "bias": True},
            {"kind": "residual_mlp", "hidden": "2x", "activation": "tanh", "norm": "rms"},
        ]))
        opt = {"kind": "adam", "lr": {"from": "input"}, "betas": [draw(st.sampled_from([0.0, 0.9])), 0.99],
               "eps": 1e-3, "bias_correction": draw(st.booleans())}
    else:  # muon orthogonalises matrices: no biases
        memory = draw(st.sampled_from([{"kind": "linear"},
                                       {"kind": "mlp", "depth": 2, "hidden": 3, "activation": "silu"}]))
        opt = {"kind": "muon", "lr": {"from": "input"}, "momentum": draw(st.sampled_from([0.0, 0.9])),
               "nesterov": draw(st.booleans()), "ns_steps": draw(st.integers(1, 3)),
               "weight_decay": draw(st.sampled_from([0.0, 0.1])),
               "adjust_lr": draw(st.sampled_from(["original", "match_rms_adamw", "none"]))}
    level = {"memory": memory, "objective": draw(st.sampled_from([{"kind": "l2"}, {"kind": "dot"}])),
             "optimizer": opt, "read": draw(st.sampled_from(["after_write", "before_write", "chunk_start"]))}
    if draw(st.booleans()):
        level["gradient_point"] = {"chunk": draw(st.integers(2, 6))}
    else:
        level["frequency"] = draw(st.integers(2, 5))
    retention = draw(st.sampled_from([None, "decay", "weight_decay"]))
    if retention:
        level["retention"] = {"kind": retention, "gate": {"from": "input"},
                              "toward": draw(st.sampled_from(["zero", "initial"]))}
        if memory["kind"] == "linear" and draw(st.booleans()):  # W·Diag(α): a rate per key channel
            level["retention"]["gate"]["per"] = "channel"
    return level


@given(SEEDS, adam_muon_levels(), st.integers(1, 14), st.integers(1, 2), st.integers(2, 4))
def test_chunked_equals_reference_adam_muon(seed, level, t, h, dim):
    level["memory"]["heads"] = h
    d = Draw(seed)
    x = _inputs(level, d, 2, t, h, dim)
    x["lr"] = x["lr"] * 0.5
    x.pop("momentum", None)  # muon's momentum is a constant of the spec, not a gate
    # muon's Newton–Schulz in float64 instead of bfloat16, so both forms are compared on their
    # maths, not on bfloat16 roundings (test_muon_mini_batch_in_bfloat16_newton_schulz covers those)
    with mock.patch.object(optimizers.Muon, "__init__", _float_ns_init):
        # adam's 1/(√v + ε) (ε = 1e-3 here) scales the rounding of its inputs by up to 1/ε in the
        # outer gradients: an entry that is exactly 0 in the reference comes out ~1e-12 chunked
        _check(level, x, d, grad_atol=1e-10)


def _float_ns_init(self, spec):
    self.spec, self.ns_dtype = spec, None


def test_muon_mini_batch_in_bfloat16_newton_schulz():
    """With muon's default bfloat16 Newton–Schulz, the batched iteration of the chunked form and
    the reference's one matrix at a time agree to bfloat16 rounding."""
    d = Draw(7)
    level = {"memory": {"kind": "mlp", "depth": 2, "hidden": 4, "activation": "silu", "heads": 2},
             "objective": {"kind": "l2"}, "optimizer": {"kind": "muon", "lr": {"from": "input"}},
             "retention": {"kind": "weight_decay", "gate": {"from": "input"}}, "gradient_point": {"chunk": 4}}
    x = _inputs(level, d, 2, 11, 2, 4)
    x.pop("momentum", None)
    (y1, s1), (y2, s2) = (run(level, form, **_leaves(x)) for form in ("reference", "chunked"))
    assert_close(y2, y1, "outputs", tol=2e-2, atol=2e-2)
    for k in s1:
        assert_close(s2[k], s1[k], k, tol=2e-2, atol=2e-2)
    assert not torch.equal(y2, run(level, "chunked", **{**_leaves(x), "lr": x["lr"] * 0})[0]), "the updates matter"


@given(SEEDS, st.sampled_from(["adam", "muon"]), st.integers(1, 10), st.integers(2, 3),
       st.sampled_from(["decay", "weight_decay"]))
def test_chunked_equals_reference_self_modifying_adam_muon(seed, kind, t, dim, retention):
    """A self-modifying level whose five memories (level, k, v, η, α) step by adam or muon: the
    stacked slots of the chunked form against the reference."""
    mem = {"kind": "mlp", "hidden": 3, "activation": "silu"}
    lr = {"from": "adaptive.eta", "act": "sigmoid", "scale": 0.05}
    opt = {"kind": "adam", "lr": lr} if kind == "adam" else {"kind": "muon", "lr": lr, "weight_decay": 0.1}
    level = {"memory": {**mem}, "objective": {"kind": "l2"}, "optimizer": opt,
             "retention": {"kind": retention, "toward": "initial",
                           "gate": {"from": "adaptive.alpha", "act": "sigmoid", "bias": 3.0}},
             "adaptive": {"k": mem, "v": mem, "eta": mem, "alpha": mem},
             "keys": {"from": "adaptive.k", "project": False, "norm": "l2"},
             "values": {"from": "adaptive.v", "project": False, "self_target": True},
             "queries": {"from": "input", "norm": "l2"}, "read": "before_write", "gradient_point": {"chunk": 3}}
    d = Draw(seed)
    b, h = 2, 1
    xin = d.normal(b, t, h, dim)
    state = init_state(load_level(level), batch=b, d_key=dim, d_value=dim, generator=d.g)
    x = {"keys": xin, "values": xin.clone(), "queries": d.unit(b, t, h, dim),
         "state": {n: s + 0.1 * d.normal(*s.shape) for n, s in state.items() if n.startswith(("memory.", "adaptive."))}}
    with mock.patch.object(optimizers.Muon, "__init__", _float_ns_init):
        _check(level, x, d)


def test_adam_muon_mini_batch_under_bfloat16():
    """The model's situation under bf16 autocast: bfloat16 streams, float32 memory and buffers. The
    optimizers' constants (β₂ = 0.999 is 1 in bfloat16) stay float32, so after 256 tokens the
    buffers agree with the float64 reference about as well as the reference's own autocast run
    does; a bfloat16 run keeps bfloat16 states."""
    g = torch.Generator().manual_seed(0)
    b, t, h, dim = 2, 256, 1, 8
    f32 = torch.float32  # this folder's default dtype is float64
    x = {"keys": torch.nn.functional.normalize(torch.randn(b, t, h, dim, generator=g, dtype=f32), dim=-1),
         "values": torch.randn(b, t, h, dim, generator=g, dtype=f32),
         "queries": torch.randn(b, t, h, dim, generator=g, dtype=f32), "lr": torch.full((b, t, h), 1e-4, dtype=f32)}
    for opt in ({"kind": "adam", "lr": {"from": "input"}}, {"kind": "muon", "lr": {"from": "input"}}):
        level = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"}, "optimizer": opt,
                 "gradient_point": {"chunk": 16}}
        _, exact = run(level, "reference", **{k: v.double() for k, v in x.items()})
        low = {k: v.bfloat16() if k != "lr" else v for k, v in x.items()}
        errors = {}
        for form in ("reference", "chunked"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, s = run(level, form, **low, state={"memory.w0": torch.zeros(b, h, dim, dim, dtype=f32)})
            errors[form] = {k: float((s[k].double() - exact[k]).norm() / exact[k].norm())
                            for k in exact if k.startswith("optimizer.") and exact[k].is_floating_point()}
        for k, e in errors["chunked"].items():
            assert e < max(3 * errors["reference"][k], 1e-2), (opt["kind"], k, errors)
        _, s = run(level, "chunked", **{k: v.bfloat16() for k, v in x.items()})
        assert all(v.dtype == torch.bfloat16 for k, v in s.items() if v.is_floating_point()), s


@given(SEEDS, st.integers(1, 12), st.integers(1, 3), st.booleans(), st.booleans(), st.booleans())
def test_chunk_rows_are_the_last_rows_of_the_transfer_products(seed, n, d, channel, momentum, zeros):
    """A chunk that only needs its end state takes the last rows of G, Y and Ω = G Y in O(n log n)
    (``chunk_rows``), which must equal the rows of the full matrices, gates of exactly 0 included,
    and give the same end state."""
    from nlgraph.compilers.chunked import _chunk_end, chunk_rows, solve_chunk, transfer

    g = torch.Generator().manual_seed(seed)
    b, h, o, i = 2, 2, 3, d
    alpha = torch.rand((b, h, n, i) if channel else (b, h, n), generator=g, dtype=torch.float64)
    mu = torch.rand((b, h, n), generator=g, dtype=torch.float64) if momentum else None
    if zeros:
        alpha.view(-1)[::3] = 0.0
        if mu is not None:
            mu.view(-1)[::2] = 0.0
    like = torch.zeros(b, h, n, i, dtype=torch.float64)
    rows = chunk_rows(alpha, mu, n, like)
    big_g = transfer(alpha, channel)
    assert_close(rows.g, big_g[..., -1, :, :] if channel else big_g[..., -1, :], "G[n, :]")
    if momentum:
        big_y = transfer(mu, False)
        big_om = torch.einsum("...rid,...ij->...rjd", big_g, big_y) if channel else big_g @ big_y
        assert_close(rows.y, big_y[..., -1, :], "Y[n, :]")
        assert_close(rows.omega, big_om[..., -1, :, :] if channel else big_om[..., -1, :], "Ω[n, :]")
    w0 = torch.randn(b, h, o, i, generator=g, dtype=torch.float64)
    s0 = torch.randn(b, h, o, i, generator=g, dtype=torch.float64) if momentum else None
    x = torch.randn(b, h, n, i, generator=g, dtype=torch.float64)
    f = torch.randn(b, h, n, o, generator=g, dtype=torch.float64)
    sol = solve_chunk(w0, s0, x, x, None, f, big_g, transfer(mu, False) if momentum else None, channel)
    w_ref, s_ref = sol.end()
    w, s = _chunk_end(w0, s0, x, f, rows, None)
    assert_close(w, w_ref, "W_n")
    if momentum:
        assert_close(s, s_ref, "S_n")


@given(SEEDS, st.integers(1, 12), st.integers(1, 3), st.booleans(), st.booleans())
def test_transfer_products_and_their_gradients(seed, n, d, channel, zeros):
    """``transfer`` (one cumulative product forward, one matmul backward) against the products taken
    one by one: the values, the gradient of a weighted sum, and its second order (a meta-gradient
    through an inner step differentiates the backward again), factors of exactly 0 included."""
    from nlgraph.compilers.chunked import transfer

    g = torch.Generator().manual_seed(seed)
    f = torch.rand((2, n, d) if channel else (2, n), generator=g, dtype=torch.float64)
    if zeros:
        f.view(-1)[:: 2 + seed % 3] = 0.0

    def loop(f):
        one = torch.ones_like(f[:, 0])
        rows = []
        for r in range(n + 1):
            cols = []
            for j in range(n + 1):
                p = one if r >= j else torch.zeros_like(one)
                for l in range(j + 1, r + 1):
                    p = p * f[:, l - 1]
                cols.append(p)
            rows.append(torch.stack(cols, 1))
        return torch.stack(rows, 1)  # [2, n+1, n+1(, d)]

    w = torch.randn((2, n + 1, n + 1, d) if channel else (2, n + 1, n + 1), generator=g, dtype=torch.float64)
    v = torch.randn(f.shape, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda x: transfer(x, channel), loop):
        x = f.clone().requires_grad_()
        out = fn(x)
        (grad,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
        # G is linear in each factor: with one factor the gradient is a constant
        second = torch.autograd.grad((grad * v).sum(), x)[0] if grad.requires_grad else torch.zeros_like(x)
        results.append((out, grad, second))
    for got, ref, what in zip(results[0], results[1], ("G", "dG/df", "second order")):
        assert_close(got, ref, what)
    # vmap (torch.func) against the loop
    assert_close(torch.func.vmap(lambda x: transfer(x, channel))(f), results[1][0], "vmap")


def test_transfer_products_compile_without_asking_torch_about_autocast(monkeypatch):
    """``transfer`` turns autocast off without ``torch.amp.is_autocast_available``, a C function
    torch 2.11's Dynamo refuses to trace: a compiled Titans (its MLP-memory kernel builds transfer
    products) failed on the GPU machine with it. Made to raise here, the products must still
    compile with ``fullgraph`` and run eagerly, on CPU and on ``meta``."""
    from nlgraph.compilers.chunked import transfer

    def refuse(*_):
        raise AssertionError("torch.amp.is_autocast_available called")

    monkeypatch.setattr(torch.amp, "is_autocast_available", refuse)
    f = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    eager = transfer(f, False)
    assert transfer(f.to("meta"), False).shape == eager.shape
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: transfer(x, False), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(f), eager)


def test_transfer_backward_ignores_the_gradient_above_the_diagonal():
    """G is a constant 0 above its diagonal: whatever gradient arrives there, inf included, must not
    reach the factors."""
    from nlgraph.compilers.chunked import transfer

    f = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    (clean,) = torch.autograd.grad(transfer(f, False).sum(), f)
    g = transfer(f, False)
    g.register_hook(lambda grad: torch.where(upper, torch.full_like(grad, float("inf")), grad))
    (dirty,) = torch.autograd.grad(g.sum(), f)
    assert_close(dirty, clean, "dG/df with inf above the diagonal")


def test_stacking_slots_reuses_the_tensor_they_were_unbound_from():
    # a chunk's end state [S, B, H, ...] is unbound into per-slot views; stacking those views again
    # must hand back that tensor (no copy kept for the backward), and anything else must be stacked
    from nlgraph.compilers.chunked import _stack, _unbound_from

    x = torch.randn(3, 2, 4, 5, requires_grad=True) * 1.0
    parts = list(x.unbind(0))
    assert _unbound_from(parts) is x
    assert _stack([{"w": p} for p in parts])["w"] is x
    assert _unbound_from(parts[:2]) is None  # not all of it
    assert _unbound_from([parts[1], parts[0], parts[2]]) is None  # another order
    assert _unbound_from([p.clone() for p in parts]) is None  # copies
    sliced = x[..., :-1].unbind(0)  # views of a view: their _base is x, whose shape differs
    assert _unbound_from(list(sliced)) is None
    assert torch.equal(_stack([{"w": p} for p in sliced])["w"], x[..., :-1])
    flat = torch.randn(6, 4, 5, requires_grad=True) * 1.0  # the chunk walk's [S·B·H, o, i] output
    seen = flat.view(3, 2, 4, 5)
    found = _unbound_from(list(seen.unbind(0)))  # their _base is flat: its storage read as the stack
    assert found is not None and found._base is flat and torch.equal(found, seen)
    assert found.stride() == seen.stride() and found.storage_offset() == seen.storage_offset()
    assert _unbound_from(list(flat.view(2, 3, 4, 5).unbind(0))[:1] + list(seen.unbind(0))[1:]) is None
    assert _unbound_from(list(flat.view(3, 2, 4, 5)[:, :1].unbind(0))) is None  # part of the rows
    with torch.no_grad():
        quiet = list(x.unbind(0))
    assert _unbound_from(quiet) is None  # views without grad of a tensor with: not the same thing
    expanded = torch.randn(2, 3).expand(4, 2, 3)
    assert _unbound_from(list(expanded.unbind(0))) is None  # stride 0: the stack is a real copy
    # the gradient through the reused tensor equals the one through a fresh stack
    w = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    grads = []
    for reuse in (True, False):
        leaf = w.clone().requires_grad_()
        for z in ((leaf * 2.0).unbind(0), (leaf.reshape(6, 4, 5) * 2.0).view(3, 2, 4, 5).unbind(0)):
            y = _stack([{"w": p} for p in z])["w"] if reuse else torch.stack(z)
            (y.sin() * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_hope_level_stacks_its_slots_once_per_call(hope_level_copies):
    # HOPE's five memories are solved stacked on a slot axis; across a call's chunks (and the
    # in-context calls of a sequence, through the state) the per-slot views are not copied again
    first, second = hope_level_copies("chunked")
    assert first > 0  # the first call stacks W_0 and the meta-learned M_0 once
    assert second == 0  # the second call (four more chunks): its slots arrive as views of stacks


def test_the_blocked_chunk_solve_equals_the_triangular_one(monkeypatch):
    """``NLGRAPH_CHUNK_SOLVE=blocked`` (the inverse from the diagonal blocks' by doubling, one matmul)
    solves a chunk's unit lower-triangular system as ``solve_triangular`` does, in value and in the
    gradients of both operands, against float64; chunks that are not 64 · 2^k rows fall back to the
    triangular solve, and an unknown mode is one error naming the variable."""
    import pytest

    from nlgraph.compilers import chunked
    from nlgraph.errors import NLGraphError

    gen = torch.Generator().manual_seed(0)

    def system(n, dtype):
        a = torch.eye(n) + torch.tril(torch.randn(2, 3, n, n, generator=gen), -1) * (0.5 / n ** 0.5)
        return a.to(dtype), torch.randn(2, 3, n, 24, generator=gen).to(dtype)

    for n in (128, 256):
        a64, r64 = system(n, torch.float64)
        ref_a, ref_r = a64.clone().requires_grad_(), r64.clone().requires_grad_()
        want = torch.linalg.solve_triangular(ref_a, ref_r, upper=False, unitriangular=True)
        dy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        want.backward(dy)
        monkeypatch.setattr(chunked, "CHUNK_SOLVE", "blocked")
        got_a, got_r = a64.float().requires_grad_(), r64.float().requires_grad_()
        got = chunked._solve_lower(got_a, got_r)
        got.backward(dy.float())
        for x, y in ((got, want), (got_a.grad.tril(-1), ref_a.grad.tril(-1)), (got_r.grad, ref_r.grad)):
            assert ((x.double() - y).norm() / y.norm()).item() < 1e-5
        # bf16 operands are solved in float32 and cast back
        assert chunked._solve_lower(a64.bfloat16(), r64.bfloat16()).dtype == torch.bfloat16
    # the model's call: one system broadcast over a leading dim of the right-hand sides
    a64, r64 = system(128, torch.float64)
    r64 = torch.stack([r64, 2 * r64.flip(-1)])
    want = torch.linalg.solve_triangular(a64, r64, upper=False, unitriangular=True)
    got = chunked._solve_lower(a64.float(), r64.float())
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    # float32 operands under autocast stay float32 (the matmuls must not run in bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked._solve_lower(a64.float(), r64.float())
    assert got.dtype == torch.float32 and ((got.double() - want).norm() / want.norm()).item() < 1e-5
    calls = []
    real = torch.linalg.solve_triangular
    monkeypatch.setattr(torch.linalg, "solve_triangular", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    for n in (64, 96, 192):  # not 64 · 2^k rows with k ≥ 1: one triangular solve of the whole chunk
        chunked._solve_lower(*system(n, torch.float32))
    a, r = system(256, torch.float32)  # blocked: one solve, of the four diagonal blocks
    chunked._solve_lower(a, r)
    assert calls == [torch.Size([2, 3, n, n]) for n in (64, 96, 192)] + [torch.Size([2, 3, 4, 64, 64])]
    monkeypatch.setattr(chunked, "CHUNK_SOLVE", "lu")
    with pytest.raises(NLGraphError, match="NLGRAPH_CHUNK_SOLVE"):
        chunked._solve_lower(a, r)


def test_the_chunk_solve_keeps_its_operands_and_solution_as_they_are(monkeypatch):
    """The triangular chunk solve (``_SolveLower``): its value and both operands' gradients are
    ``solve_triangular``'s (float64, first and second order, by ``gradcheck``; ``a`` broadcast over
    the right-hand sides' leading slots, as the model calls it); half-precision operands are solved
    in float32 and returned in their dtype, and the backward keeps only ``a`` as it came and the
    returned solution (no float32 copy of either), with gradients near float32's; it runs under
    autocast, ``torch.func.vmap`` and ``torch.compile(fullgraph=True)`` with its backward."""
    from nlgraph.compilers import chunked

    monkeypatch.setattr(chunked, "CHUNK_SOLVE", "triangular")

    gen = torch.Generator().manual_seed(0)
    n = 12
    a = torch.eye(n) + torch.tril(torch.randn(2, n, n, generator=gen), -1) * 0.3
    r = torch.randn(2, n, 5, generator=gen)
    # the folder runs in float64: .double() would return the tensor itself, so each use takes a copy
    a64, r64 = a.double().clone().requires_grad_(), r.double().clone().requires_grad_()
    assert torch.autograd.gradcheck(chunked._SolveLower.apply, (a64, r64))
    assert torch.autograd.gradgradcheck(chunked._SolveLower.apply, (a64, r64))
    want = torch.linalg.solve_triangular(a.double(), r.double(), upper=False, unitriangular=True)
    assert torch.allclose(chunked._solve_lower(a64, r64), want)

    ab, rb = a.bfloat16().requires_grad_(), r.bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = chunked._solve_lower(ab, rb)
    assert out.dtype == torch.bfloat16 and [t.dtype for t in saved] == [torch.bfloat16, torch.bfloat16]
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-2
    dy = torch.randn(out.shape, generator=gen)
    out.backward(dy.bfloat16())
    ref_a, ref_r = a.double().clone().requires_grad_(), r.double().clone().requires_grad_()
    torch.linalg.solve_triangular(ref_a, ref_r, upper=False, unitriangular=True).backward(dy.double())
    assert ab.grad.dtype == torch.bfloat16 and rb.grad.dtype == torch.bfloat16
    for got, ref in ((ab.grad.tril(-1), ref_a.grad.tril(-1)), (rb.grad, ref_r.grad)):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 2e-2

    # the model's call: a [B, H, n, n] against right-hand sides with a leading slot axis
    slots = torch.randn(3, 2, n, 5, generator=gen).double().requires_grad_()
    assert torch.autograd.gradcheck(chunked._SolveLower.apply, (a64, slots))
    got = torch.autograd.grad(chunked._solve_lower(a64, slots).square().sum(), (a64, slots))
    ref = torch.autograd.grad(torch.linalg.solve_triangular(a64, slots, upper=False, unitriangular=True)
                              .square().sum(), (a64, slots))
    for x, y in zip(got, ref):
        assert x.shape == y.shape and torch.allclose(x, y)
    # float32 and bf16 operands under autocast: float32 out, each gradient in its operand's dtype
    a32, r32 = a.float(), r.float()
    am, rm = a32.clone().requires_grad_(), r.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked._solve_lower(am, rm)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert am.grad.dtype == torch.float32 and rm.grad.dtype == torch.bfloat16
    # under autocast, ∂a's product ∂rhs xᵀ runs in bf16 (float32 accumulation), as a matmul's
    # backward would; the solve in float32: ∂a within bf16's rounding of float32's
    seen = OpDtypes()
    am.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked._solve_lower(am, r32)
    with seen:
        out.backward(dy.float())
    assert torch.bfloat16 in seen.inputs_of("bmm") and torch.float32 not in seen.inputs_of("bmm"), seen.seen
    a_ref = a32.clone().requires_grad_()
    chunked._solve_lower(a_ref, r32).backward(dy.float())
    low, full = am.grad.tril(-1).double(), a_ref.grad.tril(-1).double()
    assert ((low - full).norm() / full.norm()).item() < 2e-2
    assert torch.equal(am.grad.triu(), torch.zeros_like(am.grad))

    batched = torch.func.vmap(chunked._SolveLower.apply)(a32, r32)
    assert torch.allclose(batched, chunked._solve_lower(a32, r32), atol=1e-6)
    grads = torch.func.vmap(torch.func.grad(lambda x, y: chunked._SolveLower.apply(x, y).sum(), (0, 1)))(a32, r32)
    for x, y in zip(grads, torch.autograd.grad(chunked._solve_lower(a32.requires_grad_(), r32.requires_grad_()).sum(),
                                              (a32, r32))):
        assert torch.allclose(x, y, atol=1e-5)
    compiled = torch.compile(chunked._solve_lower, fullgraph=True, backend="aot_eager")
    ac, rc = a32.detach().clone().requires_grad_(), r32.detach().clone().requires_grad_()
    compiled(ac, rc).square().sum().backward()
    ae, re_ = a32.detach().clone().requires_grad_(), r32.detach().clone().requires_grad_()
    chunked._solve_lower(ae, re_).square().sum().backward()
    assert torch.allclose(ac.grad, ae.grad, atol=1e-5) and torch.allclose(rc.grad, re_.grad, atol=1e-5)


def test_transfer_backward_multiplies_in_autocasts_dtype():
    """Under bf16 autocast (or from bf16 factors) ``_Transfer``'s backward product ``Gᵀ Ḡ`` runs in
    bf16 with float32 accumulation, on operands padded to multiples of 8 (``n+1`` = 8 here: 7
    tokens, already aligned; 9 tokens, padded): the gates' gradients within bf16's rounding of
    float32's, the same under an ``aot_eager`` compile; outside autocast the product stays float32."""
    from nlgraph.compilers import chunked

    for n in (7, 9):
        f = torch.rand(3, n, generator=torch.Generator().manual_seed(4)).float() * 0.5 + 0.5
        w = torch.randn(3, n + 1, n + 1, generator=torch.Generator().manual_seed(5)).float()
        full = f.clone().requires_grad_()
        (chunked.transfer(full, False) * w).sum().backward()
        for make in ("autocast", "bf16 factors"):
            low, seen = f.clone().requires_grad_(), OpDtypes()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=make == "autocast"):
                g = chunked.transfer(low if make == "autocast" else low.bfloat16(), False)
            with seen:
                (g.float() * w).sum().backward()
            assert torch.bfloat16 in seen.inputs_of("bmm") and torch.float32 not in seen.inputs_of("bmm"), make
            assert ((low.grad - full.grad).norm() / full.grad.norm()).item() < 2e-2, make
        eager, comp = f.clone().requires_grad_(), f.clone().requires_grad_()
        fn = lambda y: (chunked.transfer(y, False) * w).sum()  # noqa: E731
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn(eager).backward()
            torch._dynamo.reset()
            torch.compile(fn, fullgraph=True, backend="aot_eager")(comp).backward()
        assert torch.allclose(comp.grad, eager.grad, atol=1e-6)
        seen = OpDtypes()
        plain = f.clone().requires_grad_()
        with seen:
            fn(plain).backward()
        assert torch.float32 in seen.inputs_of("bmm") and torch.bfloat16 not in seen.inputs_of("bmm")


def test_aligned_matmul_pads_16_bit_products_to_multiples_of_8():
    """``_aligned_matmul``: a 16-bit product (bf16 operands, or float32 under autocast) of sizes not
    multiples of 8 runs on operands zero-padded to them and equals ``a @ b`` in value and gradients;
    float32 and float64 products, and aligned ones, are ``a @ b`` itself."""
    from nlgraph.compilers import chunked

    class Shapes(torch.utils._python_dispatch.TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("bmm", "mm"):
                self.mm.append([tuple(a.shape[-2:]) for a in args[:2]])
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(7)
    for (m, k, n), aligned in (((9, 257, 5), False), ((8, 16, 24), True)):
        a = torch.randn(2, m, k, generator=gen, dtype=torch.float32)
        b = torch.randn(2, k, n, generator=gen, dtype=torch.float32)
        for autocast in (True, False):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            xr, yr = a.clone().requires_grad_(), b.clone().requires_grad_()
            shapes = Shapes()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                with shapes:
                    out = chunked._aligned_matmul(x, y)
                ref = xr @ yr
            assert out.shape == ref.shape and out.dtype == ref.dtype
            padded = autocast and not aligned
            assert all(d % 8 == 0 for pair in shapes.mm for sh in pair for d in sh) == (padded or aligned)
            assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
            dy = torch.randn(out.shape, generator=gen, dtype=torch.float32)
            out.backward(dy.to(out.dtype))
            ref.backward(dy.to(ref.dtype))
            for p, q in ((x, xr), (y, yr)):
                assert torch.allclose(p.grad, q.grad, rtol=1e-2, atol=1e-2)
    a64 = torch.randn(9, 11, generator=gen, dtype=torch.float64)
    b64 = torch.randn(11, 3, generator=gen, dtype=torch.float64)
    assert torch.equal(chunked._aligned_matmul(a64, b64), a64 @ b64)


def _float64_like(fn, expr, args, gen, exact: bool = False) -> torch.Tensor:
    """``fn`` against ``expr`` in float64: gradcheck and gradgradcheck, the value (bit for bit with
    ``exact``), and every input's gradient against a random ``dy`` (drawn from ``gen``, returned)."""
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    want = expr(*args)
    got = fn(*args)
    assert torch.equal(got, want) if exact else torch.allclose(got, want)
    dy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for got, ref in zip(torch.autograd.grad(fn(*args), args, dy), torch.autograd.grad(want, args, dy)):
        assert got.shape == ref.shape and torch.allclose(got, ref)
    return dy


def _under_autocast(fn, expr, args, dy) -> tuple[list, list]:
    """``fn`` and ``expr`` on float32 copies of ``args`` under CPU bf16 autocast: the same value, dtype
    and bits, and gradients (against ``dy``) in each input's dtype within 2e-2 of the expression's.
    Returns what ``fn`` saved for its backward and its float32 inputs."""
    f32 = [t.detach().float().requires_grad_() for t in args]
    r32 = [t.detach().float().requires_grad_() for t in args]
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            got = fn(*f32)
        ref = expr(*r32)
    assert got.dtype == ref.dtype and torch.equal(got, ref)
    for g_, r_ in zip(torch.autograd.grad(got, f32, dy.float()), torch.autograd.grad(ref, r32, dy.float())):
        assert g_.dtype == r_.dtype and ((g_ - r_).norm() / r_.norm()).item() < 2e-2
    return saved, f32


def _compiled_like(fn, expr, plain, atol: float, rtol: float = 1e-5):
    """``fn`` compiled (``aot_eager``, fullgraph) gives the expression's gradients on ``plain``;
    returns the compiled function."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    c32 = [t.clone().requires_grad_() for t in plain]
    e32 = [t.clone().requires_grad_() for t in plain]
    compiled(*c32).square().sum().backward()
    expr(*e32).square().sum().backward()
    for c, e in zip(c32, e32):
        assert torch.allclose(c.grad, e.grad, atol=atol, rtol=rtol)
    return compiled


def test_the_erase_system_saves_only_its_inputs():
    """``_EraseSystem``: ``I + diag(b) ((U Xᵀ) ⊙ Ω)`` with the expression's value and gradients (float64,
    first and second order, ``Ω`` shared across a leading slot axis as the model calls it), the same
    under bf16 autocast to bf16's rounding, saving only its four inputs; under ``vmap`` and an
    ``aot_eager`` compile with the backward; with X = U passed once."""
    from nlgraph.compilers import chunked

    gen = torch.Generator().manual_seed(1)
    n, i = 6, 4

    def expr(u, x, b, om):
        return torch.eye(n, dtype=x.dtype) + b.unsqueeze(-1) * ((u @ x.transpose(-1, -2)) * om)

    u, x = (torch.randn(3, 2, n, i, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    b = torch.rand(3, 2, n, generator=gen, dtype=torch.float64).requires_grad_()
    om = torch.rand(2, n, n, generator=gen, dtype=torch.float64).requires_grad_()
    args = (u, x, b, om)
    dy = _float64_like(chunked._EraseSystem.apply, expr, args, gen, exact=True)

    # bf16 autocast: the product in bf16 as the expression's, gradients within bf16's rounding
    saved, f32 = _under_autocast(chunked._EraseSystem.apply, expr, args, dy)
    assert len(saved) == 4 and all(s is t for s, t in zip(saved, f32))

    plain = [t.detach().float() for t in args]
    mapped = torch.func.vmap(chunked._EraseSystem.apply, in_dims=(0, 0, 0, None))(*plain)
    assert torch.allclose(mapped, expr(*plain), atol=1e-5)
    compiled = _compiled_like(chunked._EraseSystem.apply, expr, plain, atol=1e-4)
    # X = U (the model's erase of the layer input itself), passed as None: the same tensor twice is
    # what Dynamo refuses
    same = [t.clone().requires_grad_() for t in (plain[0], plain[2], plain[3])]
    ref = [t.clone().requires_grad_() for t in (plain[0], plain[2], plain[3])]
    compiled(same[0], None, same[1], same[2]).square().sum().backward()
    expr(ref[0], ref[0], ref[1], ref[2]).square().sum().backward()
    for c, e in zip(same, ref):
        assert torch.allclose(c.grad, e.grad, atol=1e-4)
    u64 = u.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda u_, b_, om_: chunked._EraseSystem.apply(u_, None, b_, om_), (u64, b, om))


@pytest.mark.parametrize("which", ["scaled_product", "score_read"])
def test_the_chunk_reads_save_only_their_inputs(which):
    """``_ScaledProduct`` (``(U ⊙ F) Wᵀ``) and ``_ScoreRead`` (``((U Xᵀ) ⊙ Ω) E``): the expressions'
    values and gradients (float64, first and second order, per-token and per-channel factors, Ω shared
    across a slot axis, X = U passed once), the same value under bf16 autocast and gradients within
    its rounding, saving only their inputs; under ``vmap`` and an ``aot_eager`` compile with the
    backward."""
    from nlgraph.compilers import chunked

    gen = torch.Generator().manual_seed(3)
    n, i, o = 6, 4, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if which == "scaled_product":
        fn = chunked._ScaledProduct.apply

        def expr(u, f, w):
            return (u * f) @ w.transpose(-1, -2)

        cases = [(rnd(3, 2, n, i), torch.rand(3, 2, n, 1, generator=gen, dtype=torch.float64), rnd(3, 2, o, i)),
                 (rnd(3, 2, n, i), torch.rand(2, n, i, generator=gen, dtype=torch.float64), rnd(3, 2, o, i))]
        dims = (0, 0, 0)
    else:
        fn = chunked._ScoreRead.apply

        def expr(u, x, om, e):
            x = u if x is None else x
            return ((u @ x.transpose(-1, -2)) * om) @ e

        cases = [(rnd(3, 2, n, i), rnd(3, 2, n, i), torch.rand(2, n, n, generator=gen, dtype=torch.float64),
                  rnd(3, 2, n, o))]
        dims = (0, 0, None, 0)
    for case in cases:
        args = tuple(t.requires_grad_() for t in case)
        dy = _float64_like(fn, expr, args, gen)
        saved, f32 = _under_autocast(fn, expr, args, dy)
        assert len(saved) == len(f32) and all(s is t for s, t in zip(saved, f32))
        plain = [t.detach().float() for t in args]
        if plain[1].dim() == 4:  # vmap over the leading axis (the shared per-channel factors have none)
            mapped = torch.func.vmap(fn, in_dims=dims)(*plain)
            assert torch.allclose(mapped, expr(*plain), atol=1e-5)
        _compiled_like(fn, expr, plain, atol=1e-4, rtol=1e-4)
    if which == "score_read":  # X = U, passed as None
        u, om, e = (t.detach().clone().requires_grad_() for t in (cases[0][0], cases[0][2], cases[0][3]))
        assert torch.autograd.gradcheck(lambda u_, om_, e_: fn(u_, None, om_, e_), (u, om, e))
        assert torch.allclose(fn(u, None, om, e), expr(u, u, om, e))


def test_transfer_keeps_only_its_factors_and_compiles_with_its_backward():
    """``_Transfer`` saves the factors, not ``G`` (made again in the backward): under bf16 autocast
    nothing ``[n+1, n+1]`` is kept; its gradients equal the eager ones through an ``aot_eager``
    compile of forward and backward, per head and per channel."""
    from nlgraph.compilers.chunked import transfer

    f = torch.rand(3, 7, generator=torch.Generator().manual_seed(4)).float().requires_grad_()
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = transfer(f.bfloat16(), False)
    assert out.dtype == torch.bfloat16 and saved and all(t.shape[-1] != 8 for t in saved)
    for channel, shape in ((False, (3, 7)), (True, (3, 7, 4))):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(5)).float()
        w = torch.randn(transfer(x, channel).shape, generator=torch.Generator().manual_seed(6)).float()
        eager, comp = x.clone().requires_grad_(), x.clone().requires_grad_()
        (transfer(eager, channel) * w).sum().backward()
        torch._dynamo.reset()
        compiled = torch.compile(lambda y: (transfer(y, channel) * w).sum(), fullgraph=True, backend="aot_eager")
        compiled(comp).backward()
        assert torch.allclose(comp.grad, eager.grad, atol=1e-6)

