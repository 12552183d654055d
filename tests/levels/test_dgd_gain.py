"""DGD's ``inner_errors: gain`` (``DgdSpec.inner_errors``): each layer of a deep memory takes its
error divided by ``max(1, ρ)``, ``ρ = ‖J δ‖² / ‖δ‖²`` the gain of the read along the layer's error.

Why it exists: with gradients at a chunk's start, the step of an inner layer is bounded by its input
only (the proximal η′), while the layers above it amplify its error by ``J``. Linearised over one
chunk, the inner layer's pre-activation moves as ``h ← (1 − c) h − c Jᵀ J h + …`` (``c`` the chunk's
share of the step), stable only while ``c (1 + λ_max(JᵀJ)) < 2``. HOPE's memories whose second layer
grew past that (the α memory of a trained model) blew up geometrically from chunk to chunk
(docs/hope_stability.md, "Chunk-start gradients and the memory's gain"). Checked here: the two
forms agree, layers reached without gain keep their error bit for bit, and a memory with a large
second layer diverges with raw errors and stays bounded with ``gain``.
"""

import pytest
import torch

from nlgraph.levels.memories import apply_layer, build_memory, gain_normalized, gain_scales
from nlgraph.levels.run import init_state
from nlgraph.runtime import run_level
from nlgraph.spec.loader import load_spec
from nlgraph.spec.schema import MlpMemorySpec, ResidualMlpMemorySpec

HOPE = ["vars.d_model=16", "vars.heads=2", "vars.chunk=4"]


def _level(errors: str):
    return load_spec("hope", [*HOPE, f"levels.titans.optimizer.inner_errors={errors}"]).levels["titans"]


def _state(level, seed: int, gain: float = 1.0, dtype=torch.float64):
    """A fresh state of the HOPE level (B=2, D=8 per head), the α memory's second layer × ``gain``."""
    gen = torch.Generator().manual_seed(seed)
    st = init_state(level, batch=2, d_key=8, d_value=8, dtype=dtype, generator=gen)
    for key in [k for k in st if k.endswith(".w1") and "alpha" in k and "momentum" not in k]:
        st[key] = st[key] * gain
    return st


def _inputs(seed: int, t: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, t, 2, 8, generator=gen, dtype=dtype)
    q = torch.nn.functional.normalize(torch.randn(2, t, 2, 8, generator=gen, dtype=dtype), dim=-1)
    return x, q


MU = 0.12  # the spec's momentum gate starts near sigmoid(−2)


def _mu(x):
    return torch.full(x.shape[:3], MU, dtype=x.dtype)


def test_dgd_spec_defaults_to_the_papers_errors():
    assert _level("raw").optimizer.inner_errors == "raw"
    assert load_spec("hope").levels["titans"].optimizer.inner_errors == "gain"


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_equals_reference_with_gain_normalised_errors(seed):
    level = _level("gain")
    x, q = _inputs(seed, 13)  # a partial last chunk
    leaves = [x.clone().requires_grad_(), q.clone().requires_grad_()]
    outs = {}
    for form in ("reference", "chunked"):
        y, st = run_level(level, keys=leaves[0], values=leaves[0], queries=leaves[1], momentum=_mu(x),
                          state=_state(level, seed, gain=3.0), form=form)
        loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum() + sum(
            v.square().sum() for k, v in st.items() if k.startswith(("memory.", "adaptive.")))
        outs[form] = (y, st, torch.autograd.grad(loss, leaves))
    (y_ref, st_ref, g_ref), (y, st, g) = outs["reference"], outs["chunked"]
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    for k, v in st_ref.items():
        if v.is_floating_point():
            torch.testing.assert_close(st[k], v, rtol=1e-9, atol=1e-10, msg=k)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("form", ["reference", "chunked"])
def test_the_outer_gradient_is_the_levels_own_gradient_through_the_gain(form):
    """The gradient with respect to the inputs and the initial memories equals a central finite
    difference of the level's output along a random direction: the outer gradient goes through ρ.
    Holding ρ constant there (an earlier version) gave a backward through time that is not the
    level's: a 4-layer HOPE at T=2048 then had first-step gradient norms of 5e2–1e8."""
    level = _level("gain")
    x, q = _inputs(4, 10)
    start = _state(level, 4, gain=3.0)
    mems = sorted(k for k, v in start.items() if k.startswith(("memory.", "adaptive.")) and v.is_floating_point())
    gen = torch.Generator().manual_seed(9)
    wts = torch.randn(2, 10, 2, 8, generator=gen, dtype=torch.float64)
    dirs = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (x, q, *(start[k] for k in mems))]

    def f(xx, qq, *ms):
        st = {**start, **dict(zip(mems, ms))}
        y, end = run_level(level, keys=xx, values=xx, queries=qq, momentum=_mu(xx), state=st, form=form)
        return (y * wts).sum() + sum((end[k] * 0.1).square().sum() for k in mems)

    leaves = [t.clone().requires_grad_() for t in (x, q, *(start[k] for k in mems))]
    grads = torch.autograd.grad(f(*leaves), leaves)
    analytic = sum((g * d).sum() for g, d in zip(grads, dirs))
    eps = 1e-6
    with torch.no_grad():
        plus = f(*(t + eps * d for t, d in zip((x, q, *(start[k] for k in mems)), dirs)))
        minus = f(*(t - eps * d for t, d in zip((x, q, *(start[k] for k in mems)), dirs)))
    numeric = (plus - minus) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-20), (torch.float32, 1e-22), (torch.bfloat16, 1e-20),
                                         (torch.float16, 1e-3), (torch.float32, 0.0)])
def test_the_gains_gradient_stays_finite_for_tiny_errors(dtype, scale):
    """ρ's division backward squares ‖δ‖²: taken of δ itself it overflowed to inf / NaN for a token's
    δ near 1e-20 (float32, bfloat16) or 1e-3 (float16). ρ is taken of δ over its largest entry now."""
    mem = build_memory(ResidualMlpMemorySpec(kind="residual_mlp", hidden="2x"), 8, 8)
    gen = torch.Generator().manual_seed(0)
    params = {"w0": (3 * torch.randn(1, 1, 16, 8, generator=gen)).to(dtype).requires_grad_(),
              "w1": (3 * torch.randn(1, 1, 8, 16, generator=gen)).to(dtype).requires_grad_()}
    x = torch.randn(1, 1, 6, 8, generator=gen).to(dtype)
    deltas = {"w0": (scale * torch.randn(1, 1, 6, 16, generator=gen)).to(dtype).requires_grad_(),
              "w1": (scale * torch.randn(1, 1, 6, 8, generator=gen)).to(dtype).requires_grad_()}
    out = gain_normalized(mem, params, x, deltas)
    (1e3 * out["w0"].float().sum() + out["w1"].float().sum()).backward()
    for name, t in (*params.items(), *(("delta." + k, v) for k, v in deltas.items())):
        assert torch.isfinite(t.grad).all(), name


def test_gain_normalisation_changes_the_level_only_where_the_read_amplifies():
    """Raw and gain-normalised errors give different reads once the α memory amplifies (gain 3), and
    the same with a linear memory, whose one layer reaches the read unchanged (ρ = 1 exactly)."""
    x, q = _inputs(0, 8)
    a, b = (run_level(_level(e), keys=x, values=x, queries=q, momentum=_mu(x), state=_state(_level(e), 0, 3.0), form="chunked")[0]
            for e in ("raw", "gain"))
    assert not torch.allclose(a, b)
    mem = build_memory(MlpMemorySpec(kind="mlp", depth=1), 8, 8)  # one linear layer
    params = {"w0": torch.randn(2, 2, 8, 8, dtype=torch.float64)}
    deltas = {"w0": torch.randn(2, 2, 5, 8, dtype=torch.float64)}
    assert torch.equal(gain_scales(mem, params, torch.randn(2, 2, 5, 8, dtype=torch.float64), deltas)["w0"],
                       torch.ones(2, 2, 5, 1, dtype=torch.float64))


def test_the_last_layer_of_a_residual_memory_keeps_its_error_and_the_first_sees_the_second():
    mem = build_memory(ResidualMlpMemorySpec(kind="residual_mlp", hidden="2x"), 8, 8)
    gen = torch.Generator().manual_seed(0)
    params = {"w0": torch.randn(1, 1, 16, 8, generator=gen, dtype=torch.float64) / 8 ** 0.5,
              "w1": 4.0 * torch.randn(1, 1, 8, 16, generator=gen, dtype=torch.float64) / 4.0}
    x = torch.randn(1, 1, 6, 8, generator=gen, dtype=torch.float64)
    deltas = {"w0": torch.randn(1, 1, 6, 16, generator=gen, dtype=torch.float64),
              "w1": torch.randn(1, 1, 6, 8, generator=gen, dtype=torch.float64)}
    scales = gain_scales(mem, params, x, deltas)
    assert torch.equal(scales["w1"], torch.ones_like(scales["w1"]))  # x + W1 σ(·): J = I for the last layer
    # the first layer's ρ is ‖W1 diag(σ'(h)) δ‖² / ‖δ‖², computed here by hand
    h = x @ params["w0"].transpose(-1, -2)
    act = torch.func.vmap(torch.func.grad(lambda z: torch.nn.functional.gelu(z)))(h.flatten()).view_as(h)
    jd = (act * deltas["w0"]) @ params["w1"].transpose(-1, -2)
    rho = jd.square().sum(-1) / deltas["w0"].square().sum(-1)
    torch.testing.assert_close(scales["w0"].squeeze(-1), rho.clamp_min(1.0))
    assert (rho > 1).any()


def test_an_amplifying_memory_diverges_with_raw_errors_and_stays_bounded_with_gain():
    """HOPE's level with the α memory's second layer scaled by 6: over 256 tokens (64 chunks of 4)
    the raw errors blow the α memory up by orders of magnitude; gain-normalised errors keep every
    memory within a few times its start."""
    x, q = _inputs(3, 256, torch.float32)
    sizes = {}
    for errors in ("raw", "gain"):
        level = _level(errors)
        start = _state(level, 3, 6.0, torch.float32)
        with torch.no_grad():
            _, st = run_level(level, keys=x, values=x, queries=q, momentum=_mu(x), state=dict(start), form="chunked")
        grow = max(float(st[k].abs().max() / start[k].abs().max()) for k in start
                   if k.startswith(("memory.", "adaptive.")) and start[k].abs().max() > 0)
        sizes[errors] = grow if torch.isfinite(torch.tensor(grow)) else float("inf")
    assert sizes["raw"] > 100, sizes
    assert sizes["gain"] < 10, sizes


def test_a_compiled_hope_model_runs_and_equals_eager():
    """Building the model does the jvp's one-time set-up, so ``fullgraph`` compiled blocks never trace it
    (a block that did failed on its first call)."""
    from nlgraph.lower import build

    torch.manual_seed(0)
    model = build(load_spec("hope", ["vars.d_model=32", "vars.heads=2", "vars.layers=1", "vars.chunk=4"]))
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    eager = model(ids)
    model.compile_blocks(backend="aot_eager")
    compiled = model(ids)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


MEMORIES = {
    "mlp, bias, tanh": {"kind": "mlp", "depth": 2, "hidden": 8, "bias": True, "activation": "tanh"},
    "mlp, geglu, depth 3": {"kind": "mlp", "depth": 3, "hidden": 8, "activation": "geglu", "bias": True},
    "residual, layer norm": {"kind": "residual_mlp", "hidden": 8, "norm": "layer"},
    "mlp, relu, no bias": {"kind": "mlp", "depth": 2, "hidden": 8, "activation": "relu"},
}


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_both_forms_agree_on_every_memory_kind_and_a_zero_key(memory):
    """Biases (augmented inputs), gate branches, a normed branch, momentum, and a token whose key is
    exactly 0: the reference takes every layer's error from a probe, as the chunked form does, so
    they agree there too (read off a bias-free layer's gradient δ xᵀ, δ would be lost at x = 0)."""
    spec_dict = {"memory": {**MEMORIES[memory], "heads": 2}, "objective": {"kind": "l2"},
                 "optimizer": {"kind": "dgd", "form": "proximal", "lr": 0.7, "momentum": 0.3, "inner_errors": "gain"},
                 "retention": {"kind": "weight_decay", "gate": {"act": "sigmoid"}}, "gradient_point": {"chunk": 4}}
    from nlgraph.spec.loader import load_level

    spec = load_level(spec_dict)
    gen = torch.Generator().manual_seed(1)
    st = init_state(spec, batch=2, d_key=6, d_value=6, dtype=torch.float64, generator=gen)
    st = {k: (3.0 * v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
              if v.is_floating_point() and "momentum" not in k else v) for k, v in st.items()}
    x, v, q = (torch.randn(2, 11, 2, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    x[:, 3] = 0.0
    alpha = torch.sigmoid(torch.randn(2, 11, 2, generator=gen, dtype=torch.float64))
    outs = {}
    for form in ("reference", "chunked"):
        leaves = [x.clone().requires_grad_(), v.clone().requires_grad_(), q.clone().requires_grad_()]
        y, end = run_level(spec, keys=leaves[0], values=leaves[1], queries=leaves[2], retention=alpha,
                           state=dict(st), form=form)
        loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum() + sum(
            t.square().sum() for t in end.values() if t.is_floating_point())
        outs[form] = (y, torch.autograd.grad(loss, leaves))
    (y_ref, g_ref), (y, g) = outs["reference"], outs["chunked"]
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("spec", [
    MlpMemorySpec(kind="mlp", depth=1), MlpMemorySpec(kind="mlp", depth=3, hidden="2x"),
    MlpMemorySpec(kind="mlp", depth=2, activation="swiglu"), ResidualMlpMemorySpec(kind="residual_mlp", hidden="2x"),
])
def test_the_layer_the_gain_skips_is_one_the_read_passes_through_unchanged(spec):
    """gain_scales takes ρ = 1 without a forward-mode pass for ``Memory.direct``: the pass it skips
    returns the tangent itself there, bit for bit."""
    mem = build_memory(spec, 8, 8)
    gen = torch.Generator().manual_seed(1)
    params = {n: torch.randn(2, 1, *s, generator=gen, dtype=torch.float64) for n, s in mem.shapes().items()}
    x = torch.randn(2, 1, 5, 8, generator=gen, dtype=torch.float64)
    zeros = {layer.weight: torch.zeros(2, 1, 5, layer.d_out, dtype=torch.float64) for layer in mem.layers}
    d = torch.randn(2, 1, 5, 8, generator=gen, dtype=torch.float64)
    tangent = {w: (d if w == mem.direct else z) for w, z in zeros.items()}
    _, jd = torch.func.jvp(lambda p: mem.forward_with(x, lambda layer, h: apply_layer(params, layer, h) + p[layer.weight]),
                           (zeros,), (tangent,))
    assert mem.direct is not None and torch.equal(jd, d)
    normed = build_memory(ResidualMlpMemorySpec(kind="residual_mlp", hidden="2x", norm="layer"), 8, 8)
    assert normed.direct is None  # a norm after the last layer: every layer gets its pass
