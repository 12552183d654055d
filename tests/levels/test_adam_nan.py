"""Adam memories stay differentiable where a coordinate's gradients are exactly zero.

Adam's update ``m̂ / (√v̂ + ε)`` is smooth at ``g = 0`` (``√v̂ = O(|g|)`` enters only at second order
next to ``m̂ = O(g)``), but ``√v`` itself is not: torch's ``sqrt`` backward at ``v = 0`` is
``0 / (2·√0) = NaN``. Exactly-zero gradient coordinates are common — a silent key channel, a
memory whose last layer starts at zero (every earlier layer's gradient is then 0 in the first
chunk), an output that matches its target exactly in bfloat16 — and one NaN poisons every outer
gradient (issue: ``adam_memory`` at d_model 256 under bf16 failed at its first step). Both forms
(the reference's per-token ``Adam.step`` and the chunked form's materialised states) are checked
for finite gradients, against each other, and against central finite differences in float64,
which do not depend on how ``√`` is differentiated at 0. At a true zero the update's slope is
``1/ε``; a zero that only bfloat16 rounding made must not get it, so the chunked form takes adam's
gradients in float32 under autocast (the last test).
"""

import pytest
import torch
from levelcheck import Draw, assert_close, run

from nlgraph import load_spec
from nlgraph.levels.optimizers import sqrt_second_moment
from nlgraph.lower import build
from nlgraph.train.loop import lm_loss

EPS = 1e-3  # Adam's ε: finite differences of step h see ~h/ε of curvature (kept ≲ 1e-5 below)


def _case(case: str, d: Draw):
    """A level and its inputs ``[B, T, H, D]`` where some gradient coordinates are exactly 0."""
    b, t, h, dim = 1, 6, 1, 3
    opt = {"kind": "adam", "lr": {"from": "input"}, "betas": [0.9, 0.99], "eps": EPS}
    k, v, q = d.unit(b, t, h, dim), d.normal(b, t, h, dim), d.normal(b, t, h, dim)
    if case == "silent_key_channel":
        # key channel 0 is never on: column 0 of every token's gradient δ kᵀ is 0, for the whole sequence
        level = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"}, "optimizer": opt,
                 "gradient_point": {"chunk": 4}}
        k = torch.nn.functional.normalize(k * torch.tensor([0.0, 1.0, 1.0]), dim=-1)
        state = {"memory.w0": 0.3 * d.normal(b, h, dim, dim)}
    else:  # zero_last_layer: a deep memory that starts as the zero map (mlp init: zeros)
        level = {"memory": {"kind": "mlp", "depth": 2, "hidden": 4, "activation": "silu"},
                 "objective": {"kind": "l2"}, "optimizer": opt, "gradient_point": {"chunk": 3},
                 "retention": {"kind": "weight_decay", "gate": 0.95}}
        # W1 = 0: δ of the first layer is W1ᵀ δ₁ ⊙ σ' = 0, so w0's gradients are all 0 in the
        # first chunk (v = 0 there) and non-zero in the second, once W1 has moved
        state = {"memory.w0": 0.5 * d.normal(b, h, 4, dim), "memory.w1": torch.zeros(b, h, dim, 4)}
    inputs = {"keys": k, "values": v, "queries": q, "lr": d.uniform(b, t, h, lo=0.05, hi=0.2)}
    return level, inputs, state


def _fn(level, form: str, names: list[str], state_names: list[str]):
    """The level as a function of its input tensors and initial state: ``(outputs, end state...)``."""
    def f(*tensors):
        kw = dict(zip(names, tensors[:len(names)]))
        state = dict(zip(state_names, tensors[len(names):]))
        y, end = run(level, form, **kw, state=state)
        return (y, *(end[n] for n in state_names))
    return f


@pytest.mark.parametrize("case", ["silent_key_channel", "zero_last_layer"])
def test_adam_gradients_finite_where_gradients_are_zero(case):
    level, inputs, state = _case(case, Draw(3))
    names, state_names = list(inputs), list(state)
    leaves = [t.clone().requires_grad_() for t in [*inputs.values(), *state.values()]]
    grads = {}
    for form in ("reference", "chunked"):
        outs = _fn(level, form, names, state_names)(*leaves)
        assert all(torch.isfinite(o).all() for o in outs), f"{form}: non-finite forward"
        if case == "silent_key_channel":  # the case in point: v = 0 exactly, to the end
            _, end = run(level, form, **inputs, state=state)
            assert (end["optimizer.memory.exp_avg_sq.w0"][..., 0] == 0).all()
        cot = torch.Generator().manual_seed(11)  # the same random cotangents for both forms
        loss = sum((o * torch.randn(o.shape, generator=cot)).sum() for o in outs)
        grads[form] = torch.autograd.grad(loss, leaves, allow_unused=True)
        for n, g in zip(names + state_names, grads[form]):
            assert g is None or torch.isfinite(g).all(), f"{form}: d/d{n} is not finite"
    for n, g1, g2 in zip(names + state_names, grads["reference"], grads["chunked"]):
        assert (g1 is None) == (g2 is None), n
        if g1 is not None:
            # ε = 1e-3 scales the inputs' rounding by up to 1/ε (as in test_chunked's adam cases)
            assert_close(g2, g1, f"chunked vs reference d/d{n}", tol=1e-8, atol=1e-10)


@pytest.mark.parametrize("form", ["reference", "chunked"])
@pytest.mark.parametrize("case", ["silent_key_channel", "zero_last_layer"])
def test_adam_gradients_match_finite_differences_at_zero_gradients(case, form):
    """Central differences with a step far below ε: the analytic derivative of the update at a
    zero gradient, with no convention for √ at 0 involved."""
    level, inputs, state = _case(case, Draw(5))
    leaves = tuple(t.clone().requires_grad_() for t in [*inputs.values(), *state.values()])
    f = _fn(level, form, list(inputs), list(state))
    assert torch.autograd.gradcheck(f, leaves, eps=1e-8, atol=1e-5, rtol=1e-4)


def test_sqrt_second_moment_is_sqrt_with_zero_derivative_at_zero():
    v = torch.tensor([0.0, 1e-300, 0.25, 4.0, float("inf")], requires_grad=True)
    s = sqrt_second_moment(v)
    assert torch.equal(s.detach(), v.detach().sqrt()), "the forward is √v"
    assert torch.isnan(sqrt_second_moment(torch.tensor([float("nan"), -1.0]))).all(), "NaN stays visible"
    (g,) = torch.autograd.grad(s.sum(), v)
    assert torch.equal(g, torch.tensor([0.0, 0.5e150, 0.5 / 0.5, 0.5 / 2.0, 0.0])), g


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_adam_memory_with_zero_initial_last_layer_trains(precision):
    """The library's adam_memory with a memory that starts as the zero map (every first-layer
    gradient of the first chunk is 0): one training step has finite gradients."""
    torch.set_default_dtype(torch.float32)  # a model, not a maths check; the float64 fixture restores it
    torch.manual_seed(0)
    spec = load_spec("adam_memory", ["vars.d_model=32", "vars.heads=2", "vars.layers=1", "model.vocab=64",
                                      "levels.memory.memory.init=zeros"])
    model = build(spec)
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(tokens[:, :-1])
    loss = lm_loss(logits, tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:3]}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "memory" in n)


def test_adam_bf16_outer_gradients_ignore_rounding_collisions():
    """Under bf16 autocast an output can round to exactly its target: ``W k₀ = 1 + 2⁻¹²`` is 1 in
    bfloat16, and ``v₀ = 1``. The true error is 2⁻¹², not 0; a 0 would put the ``1/ε`` (10⁶) slope
    of Adam's first step into the outer gradients. The chunked form's gradients (float32 errors)
    match the float64 reference on the same bfloat16 inputs to bfloat16 accuracy."""
    f32, bf = torch.float32, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    b, t, h, dim = 1, 4, 1, 4
    level = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"}, "gradient_point": {"chunk": 4},
             "optimizer": {"kind": "adam", "lr": {"from": "input"}, "betas": [0.9, 0.99], "eps": 1e-6}}
    # dyadic weights and keys: every product and sum is exact in float32, whatever the kernel
    w = (torch.randint(-16, 17, (b, h, dim, dim), generator=g) / 64).to(f32)
    w[..., 0, :] = torch.tensor([1.0, 2**-6, 0.0, 0.0])
    k = (torch.randint(-16, 17, (b, t, h, dim), generator=g) / 16).to(bf)
    k[0, 0, 0] = torch.tensor([1.0, 2**-6, 0.5, -0.25])
    v = torch.randn(b, t, h, dim, generator=g).to(bf)
    v[0, 0, 0, 0] = 1.0
    q = torch.randn(b, t, h, dim, generator=g).to(bf)
    lr = torch.full((b, t, h), 0.1, dtype=f32)

    def grads(dtype, form, autocast):
        leaves = [x.to(dtype).requires_grad_() for x in (k, v, q)]
        w0 = w.to(torch.promote_types(dtype, f32)).requires_grad_()
        with torch.autocast("cpu", dtype=bf, enabled=autocast):
            y, end = run(level, form, keys=leaves[0], values=leaves[1], queries=leaves[2], lr=lr.to(w0.dtype),
                         state={"memory.w0": w0})
        return torch.autograd.grad(y.double().sum() + end["memory.w0"].double().sum(), [*leaves, w0])

    expected = grads(torch.float64, "reference", False)
    got = grads(bf, "chunked", True)
    errors = {name: float((a.double() - e).norm() / e.norm())
              for name, a, e in zip(["keys", "values", "queries", "state"], got, expected)}
    # ~5% is the rest of bfloat16 (the moments' and the reads' matmuls); bfloat16 errors gave ~2,500
    assert all(err < 0.1 for err in errors.values()), f"relative errors against the float64 reference: {errors}"
