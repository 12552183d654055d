"""Levels and models hand their (gated) delta rule to the Triton kernel, and get what the PyTorch
forms give.

The ``triton`` forms (``nlgraph.compilers.kernels.forms``) run the closed-form ``delta_rule`` kind and
the qualifying online memory levels (DeltaNet, Gated DeltaNet, DGD on a linear memory) through
``chunk_delta_rule``; the plan chooses them for the device and dtype. Here (no CUDA) the kernels run under Triton's interpreter with
``set_kernels("interpret")``: each routed level equals the per-token ``reference`` form on outputs,
final state and gradients (float32, a partial last chunk, from a non-zero state); small DeltaNet /
Gated DeltaNet models give the same logits and parameter gradients with and without kernels, and
stream in segments like one pass. A spy counts kernel calls, so a silent fallback fails the tests.
Levels the kernel does not cover keep the PyTorch form, and the plan names the form in use.
"""


import pytest
import torch
import torch.nn.functional as F

from triton_interp import INTERPRET as _INTERPRET  # noqa: E402  (sets up triton first)
from triton_interp import set_interpret as _set_interpret  # noqa: E402

from nlgraph.compilers.kernels import _delta_rule_triton  # noqa: E402
from nlgraph.compilers.kernels import delta_rule as kernel_module  # noqa: E402
from nlgraph.compilers.kernels import dispatch  # noqa: E402
from nlgraph.errors import NLGraphError  # noqa: E402
from nlgraph.lower import PlanError, build, plan  # noqa: E402
from nlgraph.runtime import level_form, run_level  # noqa: E402
from nlgraph.spec.loader import load_level  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODE = "interpret" if _INTERPRET else "auto"


@pytest.fixture(autouse=True)
def _kernels_on():
    old = _set_interpret("1") if _INTERPRET else None
    dispatch.set_kernels(MODE)
    yield
    dispatch.set_kernels(None)  # monkeypatch (torn down first) has put NLGRAPH_KERNELS back by now
    if _INTERPRET:
        _set_interpret(old)


def _count_calls(monkeypatch, module, name):
    """Replace ``module.name`` by a spy; returns its call count (``{"n": …}``)."""
    count = {"n": 0}
    real = getattr(module, name)

    def spy(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return count


@pytest.fixture
def calls(monkeypatch):
    """How many times the kernel ran."""
    return _count_calls(monkeypatch, kernel_module, "chunk_delta_rule")


def _data(seed, b=2, t=70, h=2, dk=8, dv=6):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cpu").to(DEVICE)

    k = F.normalize(rnd(b, t, h, dk), dim=-1)
    q, v = rnd(b, t, h, dk), rnd(b, t, h, dv)
    lr = (0.05 + 0.9 * torch.rand(b, t, h, generator=gen)).to(DEVICE)
    alpha = (0.6 + 0.4 * torch.rand(b, t, h, generator=gen)).to(DEVICE)
    s0 = 0.3 * rnd(b, h, dv, dk)
    return k, v, q, lr, alpha, s0


LEVELS = {
    "deltanet": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
                 "optimizer": {"kind": "gd", "lr": {"act": "sigmoid"}}, "frequency": 1},
    "gated_deltanet": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
                       "optimizer": {"kind": "gd", "lr": {"act": "sigmoid"}},
                       "retention": {"kind": "decay", "gate": {"act": "sigmoid"}}, "frequency": 1},
    "dgd_l2": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
               "optimizer": {"kind": "dgd", "lr": {"act": "sigmoid"}},
               "retention": {"kind": "decay", "gate": {"act": "sigmoid"}}, "frequency": 1},
    "dgd_dot_proximal": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "dot"},
                         "optimizer": {"kind": "dgd", "form": "proximal", "lr": {"act": "sigmoid"}},
                         "frequency": 1},
    # Titans' order (the gradient at the undecayed memory): β = b / α and values α v in the kernel
    "gd_l2_weight_decay": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
                           "optimizer": {"kind": "gd", "lr": {"act": "sigmoid"}},
                           "retention": {"kind": "weight_decay", "gate": {"act": "sigmoid"}}, "frequency": 1},
    "dgd_l2_proximal_weight_decay": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
                                     "optimizer": {"kind": "dgd", "form": "proximal", "lr": {"act": "sigmoid"}},
                                     "retention": {"kind": "weight_decay", "gate": {"act": "sigmoid"}},
                                     "frequency": 1},
}


def _run(spec, form, k, v, q, lr, alpha, s0, rates):
    state = {"memory.w0": s0, "position": torch.zeros((), dtype=torch.int64, device=DEVICE)}
    return run_level(spec, keys=k, values=v, queries=q, lr=lr,
                     retention=alpha if rates else None, state=state, form=form)


@pytest.mark.parametrize("name", sorted(LEVELS))
def test_online_levels_equal_the_reference(name, calls):
    spec = load_level(LEVELS[name])
    rates = spec.retention is not None
    leaves = [x.requires_grad_() for x in _data(1)]
    y, st = _run(spec, "triton", *leaves, rates)
    assert calls["n"] == 1 and level_form(spec, device=DEVICE) == "triton"
    loss = (y * torch.linspace(-1, 1, y.shape[-1], device=DEVICE)).sum() + st["memory.w0"].square().sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    y_ref, st_ref = _run(spec, "reference", *leaves, rates)
    loss_ref = (y_ref * torch.linspace(-1, 1, y.shape[-1], device=DEVICE)).sum() + st_ref["memory.w0"].square().sum()
    grads_ref = torch.autograd.grad(loss_ref, leaves, allow_unused=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st["memory.w0"], st_ref["memory.w0"], rtol=1e-4, atol=1e-4)
    assert int(st["position"]) == int(st_ref["position"]) == 70
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None:  # the retention of a level without one
            assert g is None
            continue
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-3)


def test_closed_form_kind_equals_the_reference(calls):
    spec = load_level({"kind": "delta_rule", "heads": 2, "decay": {"act": "logsigmoid"}})
    k, v, q, beta, alpha, s0 = (x.requires_grad_() for x in _data(2))
    alpha_zero = alpha.detach().clone()
    alpha_zero[:, 5] = 0.0  # α = 0 forgets everything: log α is clamped, still exact
    alpha_zero.requires_grad_()
    outs = {}
    assert level_form(spec, device=DEVICE) == "triton"
    for form in ("triton", "reference"):
        y, st = run_level(spec, keys=k, values=v, queries=q, lr=beta, retention=alpha_zero, form=form,
                          state={"memory": s0, "position": torch.zeros((), dtype=torch.int64, device=DEVICE)})
        loss = y.square().sum() + st["memory"].sum()
        outs[form] = (y, st["memory"], torch.autograd.grad(loss, (k, v, q, beta, alpha_zero, s0)))
    assert calls["n"] == 1
    (y, m, g), (y_ref, m_ref, g_ref) = outs["triton"], outs["reference"]
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m, m_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g[:4] + g[5:], g_ref[:4] + g_ref[5:]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    # the kernel is parametrised by log α: at α = 0 exactly its gradient in α is 0 (∂/∂α = ∂/∂log α / α
    # is 0 / 0 there); elsewhere it is the reference's
    dalpha, dalpha_ref = g[4], g_ref[4]
    torch.testing.assert_close(dalpha[:, 5], torch.zeros_like(dalpha[:, 5]))
    keep = torch.ones(dalpha.shape[1], dtype=torch.bool)
    keep[5] = False
    torch.testing.assert_close(dalpha[:, keep], dalpha_ref[:, keep], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("value_beta", [True, False])
@pytest.mark.parametrize("objective", ["l2", "dot"])
def test_the_titans_order_is_exact_at_any_decay(objective, value_beta, calls, monkeypatch):
    """``weight_decay`` runs as the gated rule with β = b / α and values α v (linear attention, b = 0,
    needs neither), or, with ``value_beta``, β = b / α for the keys and the values written with b
    itself (no pass scaling them). Written with log α, the gradient of the gate's pre-activation
    stays at float32 rounding down to α = 0 (as 1/α² terms it would be inf below α ≈ 1e-19)."""
    monkeypatch.setattr(dispatch, "takes_value_beta", lambda device: value_beta)
    seen = []
    real = kernel_module.chunk_delta_rule

    def spy(*args, **kwargs):
        seen.append(kwargs.get("value_beta") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "chunk_delta_rule", spy)
    la_calls = _count_calls(monkeypatch, _la_module(), "chunk_linear_attention")
    spec = load_level({**LEVELS["gd_l2_weight_decay"], "objective": {"kind": objective}})
    k, v, q, lr, alpha, s0 = _data(4)
    alpha = alpha.clone()
    alpha[:, 5], alpha[:, 6], alpha[:, 40] = 1e-6, 1e-20, 0.0
    z = torch.logit(alpha.double().clamp(1e-300, 1 - 1e-7)).float()
    leaves = [x.clone().requires_grad_() for x in (k, v, q, lr, z, s0)]
    outs = {}
    for form in ("triton", "reference"):
        state = {"memory.w0": leaves[5], "position": torch.zeros((), dtype=torch.int64, device=DEVICE)}
        y, st = run_level(spec, keys=leaves[0], values=leaves[1], queries=leaves[2], lr=leaves[3],
                          retention=torch.sigmoid(leaves[4]), state=state, form=form)
        loss = (y * torch.linspace(-1, 1, y.shape[-1], device=DEVICE)).sum() + st["memory.w0"].square().sum()
        outs[form] = (y, st["memory.w0"], torch.autograd.grad(loss, leaves))
    assert la_calls["n"] + len(seen) == 1 and seen == ([value_beta] if objective == "l2" else [])
    (y, m, g), (y_ref, m_ref, g_ref) = outs["triton"], outs["reference"]
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m, m_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,read,toward", [
    ("gd_l2_weight_decay", "before_write", True), ("dgd_l2_proximal_weight_decay", "before_write", True)])
def test_the_titans_order_with_the_values_scaled_in_pytorch(name, read, toward, calls, monkeypatch):
    """The path CUDA takes until the value-strength kernels' GPU check: the values scaled by α in
    PyTorch, with a read before the write, retention toward ``W_0`` and streaming."""
    monkeypatch.setattr(dispatch, "takes_value_beta", lambda device: False)
    test_reads_before_the_write_and_retention_toward_the_initial_state(name, read, toward, calls, monkeypatch)


def _variant(name, read, toward):
    level = dict(LEVELS[name]) if name in LEVELS else {**LEVELS["deltanet"], "objective": {"kind": "dot"}}
    if name == "linear_attention_decay":
        level["retention"] = {"kind": "decay", "gate": {"act": "sigmoid"}}
    if name == "gla":  # a decay per key channel
        level["retention"] = {"kind": "decay", "gate": {"act": "sigmoid", "per": "channel"}}
    if name in ("kda", "dgd_l2_proximal_channel"):  # the delta rule with a decay per key channel
        level = {**LEVELS["gated_deltanet" if name == "kda" else "dgd_l2"],
                 "retention": {"kind": "decay", "gate": {"act": "sigmoid", "per": "channel"}}}
        if name != "kda":
            level["optimizer"] = {**level["optimizer"], "form": "proximal"}
    level["read"] = read
    if toward:
        level["retention"] = {**level["retention"], "toward": "initial"}
    return level


# (level, read, retention toward the initial state): the rewrites around both linear kernels
VARIANTS = [
    ("deltanet", "before_write", False),
    ("gated_deltanet", "before_write", False),
    ("gated_deltanet", "after_write", True),
    ("gated_deltanet", "before_write", True),
    ("gd_l2_weight_decay", "before_write", True),
    ("dgd_l2", "after_write", True),
    ("dgd_l2_proximal_weight_decay", "before_write", True),
    ("linear_attention", "before_write", False),
    ("linear_attention_decay", "before_write", True),
    ("linear_attention_decay", "after_write", True),
    ("gla", "after_write", False),
    ("gla", "before_write", True),
    ("kda", "after_write", False),
    ("kda", "before_write", True),
    ("dgd_l2_proximal_channel", "after_write", True),
]


@pytest.mark.parametrize("name,read,toward", VARIANTS)
def test_reads_before_the_write_and_retention_toward_the_initial_state(name, read, toward, calls, monkeypatch):
    """A read before the write (the queries moved one token earlier) and retention toward ``W_0``
    (the rule of the deviation ``W − W_0``) run the kernels, and equal the per-token reference on
    outputs, final state and the gradients of every input, ``W_0`` included; two streamed segments
    (the second starts inside a chunk) equal one call."""
    la_calls = _count_calls(monkeypatch, _la_module(), "chunk_linear_attention")
    spec = load_level(_variant(name, read, toward))
    rates = spec.retention is not None
    assert dispatch.why_no_online_kernel(spec) is None or dispatch.why_no_online_linear_attention(spec) is None
    assert level_form(spec, device=DEVICE) == "triton"
    k, v, q, lr, alpha, s0 = _data(6, t=45)
    if name in ("gla", "kda", "dgd_l2_proximal_channel"):  # a decay per key channel
        gen = torch.Generator().manual_seed(8)
        alpha = (0.3 + 0.7 * torch.rand(*k.shape, generator=gen)).to(DEVICE)
    w0 = 0.3 * torch.randn(s0.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    leaves = [x.clone().requires_grad_() for x in (k, v, q, lr, alpha, s0, w0)]
    weights = torch.linspace(-1, 1, v.shape[-1], device=DEVICE)

    def run(form, lo=0, hi=45, state=None):
        if state is None:
            state = {"memory.w0": leaves[5], "position": torch.zeros((), dtype=torch.int64, device=DEVICE)}
            if toward:
                state["origin.memory.w0"] = leaves[6]
        return run_level(spec, keys=leaves[0][:, lo:hi], values=leaves[1][:, lo:hi], queries=leaves[2][:, lo:hi],
                         lr=leaves[3][:, lo:hi], retention=leaves[4][:, lo:hi] if rates else None, state=state,
                         form=form)

    outs = {}
    for form in ("triton", "reference"):
        y, st = run(form)
        loss = (y * weights).sum() + st["memory.w0"].square().sum()
        outs[form] = (y, st, torch.autograd.grad(loss, leaves, allow_unused=True))
    assert calls["n"] + la_calls["n"] == 1
    (y, st, g), (y_ref, st_ref, g_ref) = outs["triton"], outs["reference"]
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st["memory.w0"], st_ref["memory.w0"], rtol=1e-4, atol=1e-4)
    if toward:
        assert st["origin.memory.w0"] is leaves[6]
    for i, (a, b) in enumerate(zip(g, g_ref)):
        if b is None:  # the retention of a level without one, W_0 of a level not decaying toward it
            assert a is None, i
            continue
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=f"gradient {i}")
    with torch.no_grad():
        y1, st1 = run("triton", 0, 21)
        y2, st2 = run("triton", 21, 45, st1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st2["memory.w0"], st_ref["memory.w0"].detach(), rtol=1e-4, atol=1e-4)


def test_the_titans_order_in_float16_runs_the_kernel_in_float32(calls):
    """float16's range is too short for β / α and α v (α v underflows below α ≈ 6e-5, the kernel's
    dv' overflows 65504): with float16 streams the values and the kernel work in float32, and the
    outputs come back in float16."""
    spec = load_level(LEVELS["gd_l2_weight_decay"])
    k, v, q, lr, alpha, s0 = _data(5, t=32)
    alpha = alpha.clone()
    alpha[:, 5] = 1e-6
    z = torch.logit(alpha.double().clamp(1e-300, 1 - 1e-7)).float()
    outs = {}
    for form, dt in (("triton", torch.float16), ("reference", torch.float64)):
        leaves = [x.to(dt if i < 3 else (torch.float32 if dt != torch.float64 else dt)).clone().requires_grad_()
                  for i, x in enumerate((k, v, q, lr, z, s0))]
        state = {"memory.w0": leaves[5], "position": torch.zeros((), dtype=torch.int64, device=DEVICE)}
        y, st = run_level(spec, keys=leaves[0], values=leaves[1], queries=leaves[2], lr=leaves[3],
                          retention=torch.sigmoid(leaves[4]), state=state, form=form)
        loss = (y.double() * torch.linspace(-1, 1, y.shape[-1], dtype=torch.float64, device=DEVICE)).sum() \
            + st["memory.w0"].double().square().sum()
        outs[form] = (y, torch.autograd.grad(loss, leaves))
    (y, g), (y_ref, g_ref) = outs["triton"], outs["reference"]
    assert calls["n"] == 1 and y.dtype == torch.float16
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2)


def _la_module():
    from nlgraph.compilers.kernels import linear_attention

    return linear_attention


def test_uncovered_levels_and_chunks_keep_the_pytorch_form(calls):
    k, v, q, lr, alpha, s0 = _data(3, t=20)
    # linear attention (b = 0) is the linear-attention kernel's (below), not the delta rule's
    la = load_level({**LEVELS["deltanet"], "objective": {"kind": "dot"}})
    assert dispatch.why_no_online_kernel(la) is not None and dispatch.why_no_online_linear_attention(la) is None
    la_form = "triton" if DEVICE == "cpu" or dispatch.LINEAR_ATTENTION_ON_GPU else "chunked"
    assert level_form(la, device=DEVICE) == la_form
    y, _ = _run(la, la_form, k, v, q, lr, alpha, s0, False)
    y_ref, _ = _run(la, "reference", k, v, q, lr, alpha, s0, False)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    # (momentum runs the online recurrence kernel: tests/compilers/test_kernels_recurrence.py)
    uncovered = {
        # W (diag(α) − b x xᵀ): not a delta rule once α differs between channels
        "per-channel gate in Titans' order": {
            **LEVELS["gd_l2_weight_decay"],
            "retention": {"kind": "weight_decay", "gate": {"act": "sigmoid", "per": "channel"}}},
    }
    alpha_ch = (0.6 + 0.4 * torch.rand(*k.shape, generator=torch.Generator().manual_seed(2))).to(DEVICE)
    for what, level in uncovered.items():
        spec = load_level(level)
        assert dispatch.why_no_online_kernel(spec) is not None, what
        assert level_form(spec, device=DEVICE) == "chunked", what
        # asked for by name (a plan made for another level or target), triton hands over to chunked
        assert level_form(spec, "triton", device=DEVICE) == "chunked", what
        y, _ = _run(spec, "triton", k, v, q, lr, alpha_ch, s0, True)
        y_ref, _ = _run(spec, "reference", k, v, q, lr, alpha_ch, s0, True)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    # a retention gate that can be negative (tanh): the linear kernels' log α would clamp it silently;
    # the delta-rule kernel is not called (asserted below)
    for act in ("tanh", "identity", "silu"):
        spec = load_level({**LEVELS["gated_deltanet"], "retention": {"kind": "decay", "gate": {"act": act}}})
        assert "can be ≤ 0" in dispatch.why_no_online_kernel(spec), act  # (the recurrence kernel takes α as is)
        la = load_level({**LEVELS["deltanet"], "objective": {"kind": "dot"},
                         "retention": {"kind": "decay", "gate": {"act": act}}})
        assert "can be ≤ 0" in dispatch.why_no_online_linear_attention(la), act
    negative = -0.5 * alpha
    y, _ = _run(spec, "triton", k, v, q, lr, negative, s0, True)
    y_ref, _ = _run(spec, "reference", k, v, q, lr, negative, s0, True)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    # a per-channel tensor given to a per-head spec in Titans' order: the PyTorch form, not a crash
    spec = load_level(LEVELS["gd_l2_weight_decay"])
    y, _ = _run(spec, "triton", k, v, q, lr, alpha_ch, s0, True)
    y_ref, _ = _run(spec, "reference", k, v, q, lr, alpha_ch, s0, True)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    # the chunked form of a level the kernel covers is the PyTorch code: a per-level A/B switch
    _run(load_level(LEVELS["deltanet"]), "chunked", k, v, q, lr, alpha, s0, False)
    assert calls["n"] == 0
    _run(load_level(LEVELS["deltanet"]), "triton", k, v, q, lr, alpha, s0, False)
    assert calls["n"] == 1
    # inside the triton form, a chunk size the kernel does not take runs the PyTorch code
    state = {"memory.w0": s0, "position": torch.zeros((), dtype=torch.int64, device=DEVICE)}
    run_level(load_level(LEVELS["deltanet"]), keys=k, values=v, queries=q, lr=lr, state=state, form="triton",
              chunk_size=8)
    assert calls["n"] == 1
    # float64 is no kernel's: `auto` takes chunked, and `triton` by name (a plan's) hands over to it
    k64, v64, q64, lr64 = (x.double() for x in (k, v, q, lr))
    assert level_form(LEVELS["deltanet"], device=DEVICE, dtype=torch.float64) == "chunked"
    y64, _ = run_level(load_level(LEVELS["deltanet"]), keys=k64, values=v64, queries=q64, lr=lr64, form="triton")
    assert calls["n"] == 1 and y64.dtype == torch.float64
    if _INTERPRET:  # the interpreter gets bfloat16 wrong, so bf16 CPU tensors stay in PyTorch
        half = [x.bfloat16() for x in (k, v, q, lr)]
        y, _ = run_level(load_level(LEVELS["deltanet"]), keys=half[0], values=half[1], queries=half[2],
                         lr=half[3], form="triton")
        assert calls["n"] == 1 and y.dtype == torch.bfloat16


def _tiny_model(name, *more):
    overrides = ["model.vocab=64", "vars.d_model=32", "vars.heads=2", "vars.layers=1", *more]
    torch.manual_seed(0)
    return build(name, overrides=overrides, device=DEVICE)


def _with_and_without_kernels(model, tokens):
    """Logits and parameter gradients ``{mode: (logits, grads)}`` with the kernels (``MODE``) and
    with them off (the PyTorch path the plan falls back to)."""
    results = {}
    for mode in (MODE, "off"):
        dispatch.set_kernels(mode)
        model.zero_grad()
        logits = model(tokens)
        logits.logsumexp(-1).mean().backward()
        results[mode] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None})
    return results


def _assert_same(results, min_grads):
    """The kernels' logits and gradients equal the PyTorch path's; returns the kernels' logits."""
    (lk, gk), (lp, gp) = results[MODE], results["off"]
    torch.testing.assert_close(lk, lp, rtol=1e-4, atol=1e-4)
    assert gk.keys() == gp.keys() and len(gk) > min_grads
    for n in gk:
        torch.testing.assert_close(gk[n], gp[n], rtol=1e-3, atol=1e-4, msg=n)
    return lk


def _streamed(model, tokens, bounds):
    """The logits of ``tokens`` fed to ``model.stream`` in the pieces ``[(start, end), ...]``, with the
    kernels on."""
    dispatch.set_kernels(MODE)
    pieces, state = [], None
    with torch.no_grad():
        for start, end in bounds:
            out, state = model.stream(tokens[:, start:end], state)
            pieces.append(out)
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("name", ["gated_deltanet", "deltanet", "equiv/gated_deltanet_rule"])
def test_models_equal_the_pytorch_path_and_stream(name, calls):
    model = _tiny_model(name)
    tokens = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = _with_and_without_kernels(model, tokens)
    assert calls["n"] == 1
    lk = _assert_same(results, 10)
    streamed = _streamed(model, tokens, [(0, 45), (45, 70)])
    assert calls["n"] == 3
    torch.testing.assert_close(streamed, lk, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,count,more", [
    ("gated_deltanet", "calls", ("levels.mixer.read=before_write", "levels.mixer.retention.toward=initial")),
    ("retnet", "la_calls", ("levels.mixer.read=before_write", "levels.mixer.retention.toward=initial")),
    ("mamba2", "la_calls", ("levels.mixer.retention.gate.per=channel",)),  # GLA: a decay per key channel
    ("kda", "calls", ()),  # the delta rule with a decay per key channel
    ("kda", "calls", ("levels.mixer.read=before_write", "levels.mixer.retention.toward=initial")),
])
def test_models_reading_before_the_write_toward_the_initial_state_run_the_kernels(name, count, more, request):
    """A library model changed to read before the write with retention toward its initial memory,
    or to decay per key channel, runs the kernel, gives the PyTorch path's logits and gradients, and
    streams like one pass."""
    counter = request.getfixturevalue(count)
    model = _tiny_model(name, *more)
    # on CUDA the per-channel kernel waits for its GPU check: the plan keeps the PyTorch form, and
    # the model must then equal itself with the kernels off without calling the kernel
    runs = not (DEVICE == "cuda" and ((name == "mamba2" and not dispatch.LINEAR_ATTENTION_CHANNEL_ON_GPU)
                                      or (name == "kda" and not dispatch.DELTA_RULE_CHANNEL_ON_GPU)))
    assert model.plan.executions() == {"mixer": "triton" if runs else "chunked"}
    tokens = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = _with_and_without_kernels(model, tokens)
    assert counter["n"] == (1 if runs else 0)
    lk = _assert_same(results, 5)
    torch.testing.assert_close(_streamed(model, tokens, [(0, 45), (45, 70)]), lk, rtol=1e-4, atol=1e-4)
    assert counter["n"] == (3 if runs else 0)


def test_plan_names_the_kernel_and_the_switch_turns_it_off(monkeypatch):
    forms = {lv.node: lv.form for lv in plan("gated_deltanet", device=DEVICE).levels}
    label = "triton" if DEVICE == "cuda" else "triton (interpreted)"
    assert forms["b0.mixer"] == label
    # float64 parameters: the plan keeps the PyTorch form, and forcing the kernel is one clear line
    assert plan("gated_deltanet", device=DEVICE, dtype=torch.float64).executions() == {"mixer": "chunked"}
    with pytest.raises(PlanError, match=r"^forms\.mixer: level 'mixer' cannot run in form 'triton' on "
                                        r"\w+ in float64: .*float64 parameters \(the kernels take") as e:
        plan("gated_deltanet", device=DEVICE, dtype=torch.float64, forms={"mixer": "triton"})
    assert "\n" not in str(e.value)
    monkeypatch.setenv("NLGRAPH_KERNELS", "off")
    dispatch.set_kernels(None)  # reads the environment again
    assert all("triton" not in lv.form for lv in plan("gated_deltanet", device=DEVICE).levels)
    assert "NLGRAPH_KERNELS=off" in dispatch.why_no_kernel(DEVICE)
    monkeypatch.setenv("NLGRAPH_KERNELS", "fast")
    dispatch.set_kernels(None)
    with pytest.raises(NLGraphError, match="NLGRAPH_KERNELS.*auto, off, interpret") as e:
        dispatch.kernel_mode()
    assert "\n" not in str(e.value)
    with pytest.raises(NLGraphError, match="set_kernels"):
        dispatch.set_kernels("on")


def test_a_moved_model_is_planned_again_for_its_parameters(calls):
    """``.double()`` / ``.float()`` (like ``.cuda()`` / ``.cpu()``) choose the forms again for the
    parameters' new device and dtype: float64 runs the PyTorch form, float32 the kernel again."""
    model = _tiny_model("gated_deltanet")
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    assert model.plan.executions() == {"mixer": "triton"} and model.plan.dtype == torch.float32
    with torch.no_grad():
        ref = model(tokens)
    assert calls["n"] == 1
    model.double()
    assert model.plan.executions() == {"mixer": "chunked"} and model.plan.dtype == torch.float64
    assert {m.form for m in model.modules() if hasattr(m, "plan_key")} == {"chunked"}
    with torch.no_grad():
        out = model(tokens)
    assert calls["n"] == 1 and out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)
    model.float()
    assert model.plan.executions() == {"mixer": "triton"}
    with torch.no_grad():
        model(tokens)
    assert calls["n"] == 2


def test_a_forced_form_is_kept_when_the_model_moves():
    model = build("gated_deltanet", overrides=["model.vocab=64", "vars.d_model=32", "vars.heads=2", "vars.layers=1"],
                  device=DEVICE, forms={"mixer": "chunked"})
    assert model.plan.executions() == {"mixer": "chunked"} and model.plan.forced == (("mixer", "chunked"),)
    model.double().float()
    assert model.plan.executions() == {"mixer": "chunked"}
    # a forced triton form cannot run in float64: the float64 plan takes chunked, and going back to
    # float32 restores the forced form
    forced = build("gated_deltanet", overrides=["model.vocab=64", "vars.d_model=32", "vars.heads=2",
                                                "vars.layers=1"], device=DEVICE, forms={"mixer": "triton"})
    forced.double()
    assert forced.plan.executions() == {"mixer": "chunked"} and forced.plan.forced == (("mixer", "triton"),)
    forced.float()
    assert forced.plan.executions() == {"mixer": "triton"}


@pytest.fixture
def la_calls(monkeypatch):
    """How many times the linear-attention kernel ran."""
    from nlgraph.compilers.kernels import linear_attention as la_module

    return _count_calls(monkeypatch, la_module, "chunk_linear_attention")


@pytest.mark.parametrize("name", ["retnet", "mamba2", "linear_attention", "equiv/linear_attention_kind"])
def test_linear_attention_models_equal_the_pytorch_path_and_stream(name, la_calls):
    """RetNet (constant decay and rate), Mamba2 (data-dependent both) and plain linear attention run
    the linear-attention kernel where the plan gives it (the interpreter, or CUDA) and give the PyTorch path's logits and gradients, and stream in segments."""
    runs = DEVICE == "cpu" or dispatch.LINEAR_ATTENTION_ON_GPU
    model = _tiny_model(name)
    assert model.plan.executions() == {"mixer": "triton" if runs else "chunked"}
    tokens = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = _with_and_without_kernels(model, tokens)
    assert la_calls["n"] == (1 if runs else 0)
    lk = _assert_same(results, 5)
    torch.testing.assert_close(_streamed(model, tokens, [(0, 45), (45, 70)]), lk, rtol=1e-4, atol=1e-4)


def test_linear_attention_on_cuda_follows_its_switch(monkeypatch):
    """A CUDA plan gives linear-attention levels the kernel while ``LINEAR_ATTENTION_ON_GPU`` is on
    (since benchmarks/linear_attention_kernel.py passed on the H200); switched off, it keeps the
    PyTorch form and forcing the kernel says why in one line. A normalised closed form never takes
    the kernel (it has no running normaliser)."""
    normalised = plan("equiv/linear_attention_kind", overrides=["levels.mixer.normalize=true"], device=DEVICE)
    assert normalised.executions() == {"mixer": "chunked"}
    assert dispatch.LINEAR_ATTENTION_ON_GPU
    assert plan("retnet", device="cuda").executions() == {"mixer": "triton"}
    monkeypatch.setattr(dispatch, "LINEAR_ATTENTION_ON_GPU", False)
    assert plan("retnet", device="cuda").executions() == {"mixer": "chunked"}
    with pytest.raises(PlanError, match="switched off on CUDA") as e:
        plan("retnet", device="cuda", forms={"mixer": "triton"})
    assert "\n" not in str(e.value)


def test_a_per_channel_decay_on_cuda_follows_its_own_switch(monkeypatch):
    """GLA's per-channel kernels run on CUDA while ``LINEAR_ATTENTION_CHANNEL_ON_GPU`` is on (the
    default since their GPU check passed); switched off, a CUDA plan keeps the PyTorch form and
    forcing the kernel says why."""
    gla = ["levels.mixer.retention.gate.per=channel"]
    assert plan("mamba2", overrides=gla, device=DEVICE).executions() == {
        "mixer": "triton" if DEVICE == "cpu" or dispatch.LINEAR_ATTENTION_CHANNEL_ON_GPU else "chunked"}
    monkeypatch.setattr(dispatch, "LINEAR_ATTENTION_CHANNEL_ON_GPU", False)
    assert plan("mamba2", overrides=gla, device="cuda").executions() == {"mixer": "chunked"}
    assert plan("mamba2", device="cuda").executions() == {"mixer": "triton"}  # per head: on
    with pytest.raises(PlanError, match="per-channel decay: its Triton kernel is switched off"):
        plan("mamba2", overrides=gla, device="cuda", forms={"mixer": "triton"})
    monkeypatch.setattr(dispatch, "LINEAR_ATTENTION_CHANNEL_ON_GPU", True)
    assert plan("mamba2", overrides=gla, device="cuda").executions() == {"mixer": "triton"}


def test_a_per_channel_delta_rule_on_cuda_follows_its_own_switch(monkeypatch):
    """The per-channel delta-rule kernels (KDA's) run on CUDA while ``DELTA_RULE_CHANNEL_ON_GPU`` is
    on (the default since their GPU check passed); switched off, a CUDA plan keeps the PyTorch form
    for ``kda`` and forcing the kernel says why in one line."""
    monkeypatch.setattr(dispatch, "DELTA_RULE_CHANNEL_ON_GPU", False)
    assert plan("kda", device="cuda").executions() == {"mixer": "chunked"}
    assert plan("gated_deltanet", device="cuda").executions() == {"mixer": "triton"}  # per head: on
    with pytest.raises(PlanError, match="per-channel decay: its Triton kernel is switched off") as e:
        plan("kda", device="cuda", forms={"mixer": "triton"})
    assert "\n" not in str(e.value)
    monkeypatch.setattr(dispatch, "DELTA_RULE_CHANNEL_ON_GPU", True)
    assert plan("kda", device="cuda").executions() == {"mixer": "triton"}


def test_the_per_channel_kernels_are_on_for_cuda_up_to_keys_128_wide():
    """On by default since their checks passed on the H200, for the key widths checked there (up to
    128): wider keys keep the PyTorch form on CUDA, and forcing the kernel says why (the interpreter
    on CPU has no such limit)."""
    assert dispatch.DELTA_RULE_CHANNEL_ON_GPU and dispatch.LINEAR_ATTENTION_CHANNEL_ON_GPU
    gla = ["levels.mixer.retention.gate.per=channel"]
    for name, extra in (("kda", []), ("mamba2", gla)):
        assert plan(name, overrides=["vars.d_model=512", "vars.heads=4", *extra],
                    device="cuda").executions() == {"mixer": "triton"}  # keys 128 wide
        wide = ["vars.d_model=512", "vars.heads=2", *extra]  # 256
        assert plan(name, overrides=wide, device="cuda").executions() == {"mixer": "chunked"}
        if DEVICE == "cpu":
            assert plan(name, overrides=wide, device="cpu").executions() == {"mixer": "triton"}
        with pytest.raises(PlanError, match="checked on CUDA for key widths up to 128, not 256") as e:
            plan(name, overrides=wide, device="cuda", forms={"mixer": "triton"})
        assert "\n" not in str(e.value)


@pytest.fixture
def mlp_calls(monkeypatch):
    """How many times Titans' MLP-memory kernel ran."""
    from nlgraph.compilers.kernels import mlp_memory as mlp_module

    return _count_calls(monkeypatch, mlp_module, "chunk_mlp_memory")


@pytest.mark.parametrize("name", ["titans", "titans_mal", "titans_mac", "titans_mag"])
def test_titans_models_equal_the_pytorch_path_and_stream(name, mlp_calls):
    """Titans' four variants run the MLP-memory kernel where the plan gives it (the interpreter;
    CUDA once its GPU check has passed) and give the PyTorch path's logits and gradients. A sequence
    that ends inside a chunk keeps that chunk's start as its anchor, so streaming in segments (the
    second starts inside a chunk and runs the PyTorch form) equals one pass."""
    runs = DEVICE == "cpu" or dispatch.MLP_MEMORY_ON_GPU
    # on CUDA one head of 32 (the kernel refuses 16-wide tiles there: two heads of 16 would plan chunked)
    model = _tiny_model(name, *(("vars.heads=1",) if DEVICE == "cuda" else ()))
    assert model.plan.executions()["memory"] == ("triton" if runs else "chunked")
    tokens = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = _with_and_without_kernels(model, tokens)
    assert (mlp_calls["n"] > 0) == runs
    lk = _assert_same(results, 5)
    torch.testing.assert_close(_streamed(model, tokens, [(0, 45), (45, 70)]), lk, rtol=1e-4, atol=1e-4)
    # a prompt shorter than a chunk, then one token at a time across a chunk boundary: the anchor of
    # a run that ends inside its first chunk is that chunk's start
    bounds = [(0, 5), (5, 16), *((i, i + 1) for i in range(16, 20)), (20, 70)]
    torch.testing.assert_close(_streamed(model, tokens, bounds), lk, rtol=1e-4, atol=1e-4)


def test_mlp_memory_runs_on_cuda_unless_switched_off(monkeypatch):
    """CUDA plans give Titans' memory the kernel (it passed its GPU check); switched off
    (``NLGRAPH_MLP_MEMORY_GPU=0``), a CUDA plan keeps the PyTorch form and forcing the kernel says
    why in one line; levels the kernel does not compute (HOPE's self-modifying memory, TTT's) never
    take it."""
    from nlgraph.compilers.kernels.dispatch import why_no_mlp_memory_kernel
    from nlgraph.spec.loader import load_spec

    assert why_no_mlp_memory_kernel(load_spec("titans").levels["memory"]) is None
    assert why_no_mlp_memory_kernel(load_spec("hope").levels["titans"]) is not None
    assert why_no_mlp_memory_kernel(load_spec("ttt_mlp").levels["ttt"]) is not None
    monkeypatch.setattr(dispatch, "MLP_MEMORY_ON_GPU", True)
    assert plan("titans", device="cuda").executions() == {"memory": "triton"}
    monkeypatch.setattr(dispatch, "MLP_MEMORY_ON_GPU", False)
    assert plan("titans", device="cuda").executions() == {"memory": "chunked"}
    with pytest.raises(PlanError, match="switched off on CUDA") as e:
        plan("titans", device="cuda", forms={"memory": "triton"})
    assert "\n" not in str(e.value)


def test_mlp_memory_refuses_cuda_tiles_it_fails_at():
    """The kernel's ``[C, D]`` tile past ``MAX_CUDA_TILE`` failed on the H200 (chunk 64 at D = 128):
    the rule the wrapper (raising it on CUDA) and the dispatcher (leaving such a level to the PyTorch
    form) apply says what to take instead, in one line."""
    from nlgraph.compilers.kernels.mlp_memory import MAX_CUDA_TILE, why_not_on_cuda

    assert MAX_CUDA_TILE == 4096  # the largest tile checked on the H200 in float32 and bfloat16
    for chunk, d in ((16, 64), (32, 64), (64, 64), (16, 128), (32, 128)):
        assert why_not_on_cuda(chunk, d) is None
    for chunk, d in ((128, 64), (64, 128)):
        why = why_not_on_cuda(chunk, d)
        assert why is not None and "chunk ≤ 32 at head dim 128" in why and "\n" not in why
    assert why_not_on_cuda(32, 100) is None and why_not_on_cuda(64, 100) is not None  # D rounds up to 128
    assert "head dim 256" in why_not_on_cuda(16, 256) and "head dim 200" in why_not_on_cuda(8, 200)
    assert why_not_on_cuda(16, 64, 32) is None and "take 16 or 32" in why_not_on_cuda(16, 64, 64)
    # heads narrower than 32 (16-wide tiles): the delta-rule kernels' faulted there on an H100
    assert why_not_on_cuda(16, 24) is None and "16-wide tile" in why_not_on_cuda(16, 16) and "16-wide tile" in why_not_on_cuda(8, 8)


def test_the_plan_keeps_the_pytorch_form_for_a_tile_the_kernel_refuses_on_cuda(monkeypatch):
    """The plan knows each level's head width, so a Titans memory whose chunk × head dim the kernel
    refuses on CUDA is planned ``chunked`` there, with the reason among the declined forms, rather
    than planned ``triton`` and falling back at run time."""
    monkeypatch.setattr(dispatch, "MLP_MEMORY_ON_GPU", True)
    wide = ["vars.d_model=1024", "vars.heads=8"]  # head dim 128
    p = plan("titans", [*wide, "levels.memory.gradient_point.chunk=64"], device="cuda")
    assert p.executions() == {"memory": "chunked"}
    ((key, form, why),) = p.declined()
    assert (key, form) == ("memory", "triton") and "chunk ≤ 32 at head dim 128" in why
    assert plan("titans", [*wide, "levels.memory.gradient_point.chunk=32"], device="cuda").executions() == {
        "memory": "triton"}
    assert plan("titans", [*wide, "levels.memory.gradient_point.chunk=64"], device="cpu").executions() == {
        "memory": "triton"}  # the rule is CUDA's


def test_run_level_asks_for_the_form_at_its_keys_head_width(monkeypatch):
    """``run_level`` hands the registry its keys' width per head, so a CUDA run and the plan apply
    the same tile rule; the memory form refuses a refused tile on CUDA at that width."""
    import nlgraph.runtime as runtime
    from nlgraph.compilers.kernels.forms import why_not_memory
    from nlgraph.spec.loader import load_spec

    monkeypatch.setattr(dispatch, "MLP_MEMORY_ON_GPU", True)
    level = load_spec("titans", ["vars.heads=2", "levels.memory.gradient_point.chunk=64"]).levels["memory"]
    assert why_not_memory(level, "cuda", torch.float32, head_dim=64) is None
    assert "chunk ≤ 32 at head dim 128" in why_not_memory(level, "cuda", torch.float32, head_dim=128)
    on_cpu = why_not_memory(level, "cpu", torch.float32, head_dim=128)
    # the rule is CUDA's (a GPU machine without the interpreter runs no kernel on CPU at all)
    assert on_cpu is None if DEVICE == "cpu" else "chunk ≤" not in on_cpu
    seen = []
    real = runtime._select
    monkeypatch.setattr(runtime, "_select", lambda *a, **kw: seen.append(kw.get("head_dim")) or real(*a, **kw))
    from nlgraph.compilers.kernels.mlp_memory import random_inputs

    (q, k, v), (lr, alpha, mu), (w0, w1, s0, s1) = (tuple(x.float() for x in xs) for xs in
                                                    random_inputs(1, 40, 2, 8, 16, seed=3))
    state = {"memory.w0": w0, "memory.w1": w1, "optimizer.memory.momentum.w0": s0,
             "optimizer.memory.momentum.w1": s1}
    runtime.run_level(level, keys=k, values=v, queries=q, state=state, lr=lr, retention=alpha, momentum=mu,
                      form="chunked")
    assert seen == [8]


def test_cuda_switches_read_their_environment_overrides(monkeypatch):
    """``NLGRAPH_*_GPU`` turns a kernel's CUDA switch on or off for a process (a GPU check or timing
    before the default changes); anything else keeps the default."""
    for value, default, expected in (("1", False, True), ("on", False, True), ("0", True, False),
                                     ("off", True, False), ("", False, False), ("maybe", True, True)):
        monkeypatch.setenv("NLGRAPH_TEST_SWITCH", value)
        assert dispatch._switch("NLGRAPH_TEST_SWITCH", default) is expected, value


def test_float32_keys_wider_than_128_keep_the_pytorch_form():
    """Compiled for sm_90, the per-head kernels' float32 state kernels at a key width of 256 ask for
    more shared memory than an H100 has (``dispatch.FLOAT32_MAX_KEY``), so float32 keys wider than
    128 run the PyTorch form; 16-bit keys take the kernels up to ``MAX_HEAD_DIM``."""
    wide, narrow = torch.zeros(1, 64, 1, 256), torch.zeros(1, 64, 1, 128)
    v = torch.zeros(1, 64, 1, 64)
    assert not dispatch._fits(wide, v, 64)
    assert dispatch._fits(narrow, v, 64) == (dispatch.why_no_kernel(narrow.device) is None)
    assert dispatch._fits(wide.half(), v.half(), 64) == (dispatch.why_no_kernel(wide.device) is None)
