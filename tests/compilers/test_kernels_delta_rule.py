"""The Triton chunked (gated) delta rule equals nlgraph's token-by-token reference.

``nlgraph.compilers.kernels.chunk_delta_rule`` (forward and backward in Triton) is checked against
the ``reference`` form of the ``delta_rule`` level (``compilers/delta_rule.py``) run in float64:
outputs, final state and the gradients of every input (q, k, v, β, the log decay g and the initial
state), with a partial last chunk, with and without decay, initial state and final state. Streaming
(the final state fed back as the next call's initial state) equals one call, and the op traces under
``torch.compile(fullgraph=True)``.

Without CUDA the kernels run in Triton's interpreter: ``TRITON_INTERPRET`` must be set before triton
is first imported, so this module sets it around that import only (and restores it), leaving the rest
of the process as it was. With CUDA the same checks run the compiled kernels.
"""


import pytest
import torch
import torch.nn.functional as F

from triton_interp import INTERPRET as _INTERPRET  # noqa: E402  (sets up triton first)
from triton_interp import channel_offsets  # noqa: E402, F401  (a fixture)
from triton_interp import interpreter_while_testing  # noqa: E402, F401  (the module fixture)

from nlgraph.compilers.delta_rule import delta_rule_reference  # noqa: E402
from nlgraph.compilers.kernels import _delta_rule_triton, chunk_delta_rule  # noqa: E402
from nlgraph.errors import NLGraphError  # noqa: E402
from nlgraph.spec.schema import DeltaRuleSpec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("interpreter_while_testing")


def _inputs(b, t, h, dk, dv, *, gated, with_h0, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {
        "q": rnd(b, t, h, dk),
        "k": F.normalize(rnd(b, t, h, dk), dim=-1),  # DeltaNet's unit keys
        "v": rnd(b, t, h, dv),
        "beta": torch.rand(b, t, h, generator=gen, dtype=torch.float64),
    }
    if gated:
        x["g"] = F.logsigmoid(rnd(b, t, h) + 2.0)  # α = sigmoid(z) ∈ (0, 1), mostly near 1
    if with_h0:
        x["h0"] = rnd(b, h, dk, dv)
    return x


def _reference(x, scale):
    """nlgraph's delta_rule level, token by token, in float64: ``memory = hᵀ``, ``decay = exp(g)``."""
    b, _, h, dk = x["q"].shape
    dv = x["v"].shape[-1]
    memory = x["h0"].transpose(-1, -2) if "h0" in x else x["q"].new_zeros(b, h, dv, dk)
    y, state = delta_rule_reference(
        DeltaRuleSpec(kind="delta_rule"), keys=x["k"], values=x["v"], queries=x["q"], beta=x["beta"],
        decay=x["g"].exp() if "g" in x else None,
        state={"memory": memory, "position": torch.zeros((), dtype=torch.int64)})
    return y * scale, state["memory"].transpose(-1, -2)


def _kernel(x, scale, chunk, final):
    return chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x.get("g"), initial_state=x.get("h0"),
                            output_final_state=final, scale=scale, chunk=chunk)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "b, t, h, dk, dv, chunk, gated, with_h0, final",
    [
        (2, 37, 2, 16, 32, 16, True, True, True),    # gated, 3 chunks, last one partial
        (1, 45, 2, 32, 16, 32, False, False, False),  # plain delta rule, no state in or out
        (1, 21, 2, 24, 20, 16, True, False, True),    # gated from zeros, head dims not powers of 2
        (1, 19, 2, 16, 16, 16, False, True, False),   # plain, initial state, output only
        (1, 70, 1, 16, 16, 64, True, True, True),     # chunk 64: four 16-row blocks in the inverse
        (1, 20, 1, 80, 16, 16, True, True, True),     # Dk in two blocks of 64 (partial sums of dg)
    ],
)
def test_matches_reference_values_and_gradients(b, t, h, dk, dv, chunk, gated, with_h0, final):
    scale = 0.75
    x64 = _inputs(b, t, h, dk, dv, gated=gated, with_h0=with_h0, seed=t)
    ref = {n: a.clone().requires_grad_() for n, a in x64.items()}
    got = {n: a.float().to(DEVICE).requires_grad_() for n, a in x64.items()}
    y_ref, s_ref = _reference(ref, scale)
    o, ht = _kernel(got, scale, chunk, final)
    assert o.shape == (b, t, h, dv) and o.dtype == torch.float32
    assert _rel(o.cpu(), y_ref.detach()) < 1e-5
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    loss_ref = (y_ref * do).sum()
    loss = (o * do.float().to(DEVICE)).sum()
    if final:
        assert ht.shape == (b, h, dk, dv) and ht.dtype == torch.float32
        assert _rel(ht.cpu(), s_ref.detach()) < 1e-5
        dht = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
        loss_ref = loss_ref + (s_ref * dht).sum()
        loss = loss + (ht * dht.float().to(DEVICE)).sum()
    else:
        assert ht is None
    loss_ref.backward()
    loss.backward()
    for name in x64:
        assert _rel(got[name].grad.cpu(), ref[name].grad) < 2e-5, name


@pytest.mark.parametrize("b, t, h, dk, dv, chunk, gated, dtype, lowp", [
    (2, 37, 2, 16, 32, 16, True, torch.float32, "2"),    # gated, partial last chunk
    (1, 45, 2, 24, 20, 32, False, torch.float32, "2"),   # plain, head dims not powers of 2
    (1, 70, 1, 16, 16, 64, True, torch.float32, "2"),    # chunk 64
    (1, 20, 1, 80, 96, 16, True, torch.float32, "2"),    # two K blocks and two V blocks
    # the 16-bit backward at every NLGRAPH_WY_LOWP; float16: the interpreter gets bfloat16 wrong
    *[(1, 40, 2, 32, 32, 16, True, torch.float16, lowp) for lowp in ("0", "1", "2")],
])
def test_a_write_strength_of_the_values_own_matches_the_token_loop(b, t, h, dk, dv, chunk, gated, dtype, lowp,
                                                                   monkeypatch):
    """``value_beta`` (Titans' order: β = b / α for the keys, β_v = b for the values): outputs,
    final state and every gradient, ``value_beta``'s included, against the float64 token loop."""
    from nlgraph.compilers.kernels.delta_rule import token_loop

    monkeypatch.setenv("NLGRAPH_WY_LOWP", lowp)
    x64 = _inputs(b, t, h, dk, dv, gated=gated, with_h0=True, seed=t + 5)
    x64["value_beta"] = torch.rand(b, t, h, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    ref = {n: a.clone().requires_grad_() for n, a in x64.items()}
    got = {n: a.to(DEVICE, dtype if n in ("q", "k", "v") else torch.float32).requires_grad_() for n, a in x64.items()}
    y_ref, s_ref = token_loop(ref["q"], ref["k"], ref["v"], ref["beta"], ref.get("g"), ref["h0"], 0.5,
                              value_beta=ref["value_beta"])
    o, ht = chunk_delta_rule(got["q"], got["k"], got["v"], got["beta"], g=got.get("g"), initial_state=got["h0"],
                             output_final_state=True, scale=0.5, chunk=chunk, value_beta=got["value_beta"])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert _rel(o.float().cpu(), y_ref.detach()) < tol
    assert _rel(ht.cpu(), s_ref.detach()) < tol
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
    ((y_ref * do).sum() + (s_ref * dht).sum()).backward()
    ((o.float() * do.float().to(DEVICE)).sum() + (ht * dht.float().to(DEVICE)).sum()).backward()
    for name in x64:
        assert _rel(got[name].grad.float().cpu(), ref[name].grad) < 2 * tol, name


def test_a_write_strength_of_the_values_own_traces_fullgraph_and_is_refused_per_channel():
    """The op with ``value_beta`` traces under ``torch.compile(fullgraph=True)`` with the eager
    gradients; a decay per key channel with it is one clear error."""
    x = {n: a.float().to(DEVICE) for n, a in _inputs(1, 24, 2, 16, 16, gated=True, with_h0=True, seed=6).items()}
    x["value_beta"] = torch.rand(1, 24, 2, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    leaves = {n: a.clone().requires_grad_() for n, a in x.items()}

    def f(q, k, v, beta, g, h0, value_beta):
        o, ht = chunk_delta_rule(q, k, v, beta, g=g, initial_state=h0, output_final_state=True, scale=1.0,
                                 chunk=16, value_beta=value_beta)
        return o.square().sum() + ht.sum()

    names = ["q", "k", "v", "beta", "g", "h0", "value_beta"]
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*[leaves[n] for n in names]),
                              [leaves[n] for n in names])
    want = torch.autograd.grad(f(*[leaves[n] for n in names]), [leaves[n] for n in names])
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(NLGraphError, match="decay per key channel") as err:
        chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"][..., None].expand(1, 24, 2, 16),
                         chunk=16, value_beta=x["value_beta"])
    assert err.value.path == "chunk_delta_rule.value_beta"


def test_a_write_strength_of_the_values_own_is_values_scaled():
    """β_v v written with β equals the plain rule on the values β_v v / β."""
    x = {n: a.float().to(DEVICE) for n, a in _inputs(1, 33, 2, 16, 16, gated=True, with_h0=False, seed=3).items()}
    bv = torch.rand(1, 33, 2, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    x["beta"] = x["beta"] * 0.9 + 0.1
    o, ht = chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], output_final_state=True, scale=1.0,
                             chunk=16, value_beta=bv)
    o2, ht2 = chunk_delta_rule(x["q"], x["k"], x["v"] * (bv / x["beta"])[..., None], x["beta"], g=x["g"],
                               output_final_state=True, scale=1.0, chunk=16)
    assert _rel(o.cpu(), o2.cpu().double()) < 1e-5 and _rel(ht.cpu(), ht2.cpu().double()) < 1e-5


def test_streaming_continues_from_the_final_state():
    """Two calls, the first's final state as the second's initial state, equal one call."""
    x = {n: a.float().to(DEVICE) for n, a in _inputs(1, 40, 2, 16, 16, gated=True, with_h0=True, seed=3).items()}
    o, ht = _kernel(x, 1.0, 16, True)
    first = {n: a[:, :23] if a.dim() > 2 and n != "h0" else a for n, a in x.items()}
    o1, h1 = _kernel(first, 1.0, 16, True)
    second = {n: a[:, 23:] if a.dim() > 2 and n != "h0" else a for n, a in x.items()}
    second["h0"] = h1
    o2, h2 = _kernel(second, 1.0, 16, True)
    assert _rel(torch.cat([o1, o2], 1).cpu(), o.double().cpu()) < 1e-6
    assert _rel(h2.cpu(), ht.double().cpu()) < 1e-6


def test_compiles_fullgraph_and_matches_eager():
    x = {n: a.float().to(DEVICE) for n, a in _inputs(1, 20, 2, 16, 16, gated=True, with_h0=True, seed=5).items()}

    def f(q, k, v, beta, g, h0):
        o, ht = chunk_delta_rule(q, k, v, beta, g=g, initial_state=h0, output_final_state=True, scale=1.0,
                                 chunk=16)
        return o.square().sum() + ht.sum()

    args = [x[n] for n in ("q", "k", "v", "beta", "g", "h0")]
    eager = [a.clone().requires_grad_() for a in args]
    f(*eager).backward()
    traced = [a.clone().requires_grad_() for a in args]
    # aot_eager traces the graph (fullgraph: no break around the custom op) without a C++ toolchain
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    torch.compile(f, fullgraph=True, backend=backend)(*traced).backward()
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_empty_sequence_returns_the_initial_state():
    x = {n: a.float().to(DEVICE) for n, a in _inputs(1, 0, 2, 16, 16, gated=True, with_h0=True, seed=7).items()}
    o, ht = _kernel(x, 1.0, 16, True)
    assert o.shape == (1, 0, 2, 16)
    torch.testing.assert_close(ht, x["h0"])


@pytest.mark.parametrize("arg, change, words", [
    ("q", lambda x: x.update(q=x["q"][..., :8]), "chunk_delta_rule.k"),
    ("beta", lambda x: x.update(beta=x["beta"][:, :, :1]), "chunk_delta_rule.beta"),
    ("h0", lambda x: x.update(h0=x["h0"].transpose(-1, -2)[..., :8]), "chunk_delta_rule.initial_state"),
])
def test_bad_arguments_name_the_argument(arg, change, words):
    x = {n: a.float() for n, a in _inputs(1, 8, 2, 16, 16, gated=True, with_h0=True, seed=9).items()}
    change(x)
    with pytest.raises(NLGraphError) as err:
        _kernel(x, 1.0, 16, False)
    assert err.value.path == words and "\n" not in err.value.render()


def test_bad_chunk_is_a_one_line_error():
    x = {n: a.float() for n, a in _inputs(1, 8, 2, 16, 16, gated=False, with_h0=False, seed=9).items()}
    with pytest.raises(NLGraphError, match="16, 32 or 64"):
        _kernel(x, 1.0, 48, False)


def _half_grads(lowp: str, monkeypatch) -> tuple[dict, dict]:
    """(float16 kernel's gradients, float64 reference's) with NLGRAPH_WY_LOWP = ``lowp``."""
    monkeypatch.setenv("NLGRAPH_WY_LOWP", lowp)
    b, t, h, dk, dv, chunk = 1, 40, 2, 32, 32, 16
    x64 = _inputs(b, t, h, dk, dv, gated=True, with_h0=True, seed=3)
    ref = {n: a.clone().requires_grad_() for n, a in x64.items()}
    dtypes = {"g": torch.float32, "h0": torch.float32}
    # float16: the interpreter runs it (it gets bfloat16 wrong); the GPU check covers bf16
    got = {n: a.to(DEVICE, dtypes.get(n, torch.float16)).requires_grad_() for n, a in x64.items()}
    y_ref, _ = _reference(ref, 1.0)
    o, _ = _kernel(got, 1.0, chunk, False)
    do = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y_ref * do).sum().backward()
    (o.float() * do.float().to(DEVICE)).sum().backward()
    return {n: got[n].grad.float().cpu() for n in x64}, {n: ref[n].grad for n in x64}


def test_half_backward_in_the_input_dtype_stays_as_close_as_the_default(monkeypatch):
    # NLGRAPH_WY_LOWP moves _wy_bwd's products onto 16-bit operands (as fla's WY backward does):
    # every level must reach the kernel (k's gradient changes) and keep each gradient within twice
    # the default's error against float64
    base, ref = _half_grads("0", monkeypatch)
    for lowp in ("1", "2"):
        got, _ = _half_grads(lowp, monkeypatch)
        assert not torch.equal(got["k"], base["k"]), f"NLGRAPH_WY_LOWP={lowp} changed nothing"
        for name in ref:
            assert _rel(got[name], ref[name]) <= 2 * _rel(base[name], ref[name]) + 1e-6, (lowp, name)


def test_wy_lowp_rejects_a_bad_setting(monkeypatch):
    from nlgraph.compilers.kernels.delta_rule import _wy_lowp

    monkeypatch.setenv("NLGRAPH_WY_LOWP", "3")
    with pytest.raises(ValueError, match="NLGRAPH_WY_LOWP"):
        _wy_lowp(torch.bfloat16)
    assert _wy_lowp(torch.float32) == 0
    monkeypatch.delenv("NLGRAPH_WY_LOWP")
    assert _wy_lowp(torch.bfloat16) == 2  # the default: fastest on the H200 (docs/benchmarks.md)
    assert _wy_lowp(torch.float32) == 0


def test_fp32_products_reach_every_kernel_and_stay_exact(monkeypatch):
    """``NLGRAPH_FP32_PRODUCTS`` is the float32 ``input_precision`` of the delta rule's and linear
    attention's kernels (and the online recurrence's: all from ``_load.products``), not of Titans'
    MLP memory, whose backward spills more with ``tf32x3``. Unset, the per-head delta rule and linear
    attention (with or without a per-channel decay) take ``tf32x3`` (checked on an H100) and the
    per-channel delta rule ``ieee`` (its float32 backward ran out of shared memory with ``tf32x3``). The delta rule under ``tf32x3`` equals
    float64 (the interpreter multiplies in float32 whatever the mode: the three TF32 products'
    rounding is the GPU check's), and a value that is no mode is one error naming the variable."""
    from nlgraph.compilers.kernels import _load, delta_rule, linear_attention, mlp_memory

    q = torch.zeros(1, 8, 1, 16)
    monkeypatch.setattr(_load, "FP32_PRODUCTS", None)
    assert delta_rule._plan(q, q, 16)["PREC"] == delta_rule._plan(q, q, 16)["SPREC"] == "tf32x3"
    assert delta_rule._plan(q, q, 16, channel=True)["PREC"] == "ieee"
    assert linear_attention._plan(q, q, 16)["PREC"] == "tf32x3"
    assert linear_attention._plan(torch.zeros(1, 8, 1, 256), q, 16)["PREC"] == "ieee"
    monkeypatch.setattr(_load, "FP32_PRODUCTS", "ieee")
    assert delta_rule._plan(q, q, 16)["PREC"] == linear_attention._plan(q, q, 16)["PREC"] == "ieee"
    monkeypatch.setattr(_load, "FP32_PRODUCTS", "tf32x3")
    assert delta_rule._plan(q, q, 16, channel=True)["PREC"] == "tf32x3"
    wide = torch.zeros(1, 8, 1, 256)  # past the H100's shared memory with tf32x3 (its GPU check)
    assert delta_rule._plan(wide, q, 16, channel=True)["PREC"] == "ieee"
    assert linear_attention._plan(wide, q, 16)["PREC"] == "ieee"  # compiled for sm_90: the same
    assert delta_rule._plan(wide, q, 16)["PREC"] == "ieee"  # one rule, in _load.products
    assert linear_attention._plan(q, q, 16)["PREC"] == "tf32x3"
    assert mlp_memory._launch(q, 64, 16, 16, 4)["PREC"] == "ieee"
    assert delta_rule._plan(q.half(), q.half(), 16)["PREC"] == "tf32"  # 16-bit operands: unchanged
    x64 = _inputs(1, 37, 2, 16, 32, gated=True, with_h0=True, seed=5)
    ref = {n: a.clone().requires_grad_() for n, a in x64.items()}
    got = {n: a.float().to(DEVICE).requires_grad_() for n, a in x64.items()}
    y_ref, s_ref = _reference(ref, 0.75)
    o, ht = _kernel(got, 0.75, 16, True)
    assert _rel(o.cpu(), y_ref.detach()) < 1e-5 and _rel(ht.cpu(), s_ref.detach()) < 1e-5
    ((y_ref ** 2).sum() + s_ref.sum()).backward()
    ((o ** 2).sum() + ht.sum()).backward()
    for name in x64:
        assert _rel(got[name].grad.cpu(), ref[name].grad) < 2e-5, name
    monkeypatch.setattr(_load, "FP32_PRODUCTS", "tf32")
    with pytest.raises(NLGraphError, match="NLGRAPH_FP32_PRODUCTS"):
        delta_rule._plan(q, q, 16)


# --------------------------------------------------------------------------- a decay per key channel


def _channel_inputs(b, t, h, dk, dv, *, strength, with_h0, seed):
    x = _inputs(b, t, h, dk, dv, gated=False, with_h0=with_h0, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    # log decays per key channel, from ~0 to −strength a token (e^−8 a token drives a chunk of 64 far
    # past float32's e^−88, where a factorised (K e^b)(K e^−b)ᵀ would overflow)
    x["g"] = -strength * torch.rand(b, t, h, dk, generator=gen, dtype=torch.float64)
    return x


@pytest.fixture
def every_chunk(monkeypatch):
    """The per-channel kernels at the chunk a test asks for: a model's calls run
    ``_load.CHANNEL_CHUNK`` (32), but the kernels are written, and kept exact, for 16, 32 and 64."""
    from nlgraph.compilers.kernels import _load

    monkeypatch.setattr(_load, "CHANNEL_CHUNK", None)


def test_the_per_channel_kernels_run_their_own_chunk(monkeypatch):
    """Whatever chunk the caller asks for, a per-channel decay runs ``_load.CHANNEL_CHUNK`` = 32 (what
    the GPU checks passed at; the function does not depend on the chunk), bit for bit the same
    results; a per-head decay runs the chunk asked for."""
    from nlgraph.compilers.kernels import _load
    from nlgraph.compilers.kernels import delta_rule as module

    assert _load.CHANNEL_CHUNK == 32
    ran, original = [], module._fwd_op
    monkeypatch.setattr(module, "_fwd_op", lambda *a: ran.append(a[7]) or original(*a))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 1, 16, generator=gen).to(DEVICE) for _ in range(3))
    k = F.normalize(k, dim=-1)
    beta, g = torch.rand(1, 40, 1, generator=gen).to(DEVICE), -torch.rand(1, 40, 1, 16, generator=gen).to(DEVICE)
    outs = [chunk_delta_rule(q, k, v, beta, g, scale=1.0, chunk=c)[0] for c in (16, 64, 32)]
    chunk_delta_rule(q, k, v, beta, g[..., 0].contiguous(), scale=1.0, chunk=16)
    assert ran == [32, 32, 32, 16]
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


# (B, T, H, Dk, Dv, chunk, decay strength, with h0, final state): the per-channel kernels' cases,
# run by both forms of their scores
CHANNEL_CASES = [
    (2, 37, 2, 16, 32, 16, 0.5, True, True),     # 3 chunks, the last one partial
    (1, 45, 2, 24, 20, 32, 1.0, False, True),    # head dims not powers of 2, from zeros
    (1, 70, 1, 16, 16, 64, 8.0, True, True),     # chunk 64, decays to e^−8 a token
    (1, 60, 1, 80, 16, 64, 0.2, True, False),    # Dk past one block of 64; a partial only chunk
    (1, 19, 2, 16, 16, 16, 0.05, True, False),   # nearly no decay, output only
    (2, 64, 2, 24, 80, 32, 1.0, True, True),     # T a multiple of the chunk, two value blocks
    # valid keys decaying past e^-88 before a sub-block whose reference row is past T; strong
    # decays at chunk 32
    (1, 104, 1, 16, 16, 64, 8.0, True, True),
    (1, 64, 1, 16, 16, 32, 8.0, True, True),
]


@pytest.mark.parametrize("b, t, h, dk, dv, chunk, strength, with_h0, final", CHANNEL_CASES)
def test_per_channel_decay_matches_the_token_loop(b, t, h, dk, dv, chunk, strength, with_h0, final,
                                                 every_chunk):
    from nlgraph.compilers.kernels.delta_rule import token_loop

    scale = 0.75
    x64 = _channel_inputs(b, t, h, dk, dv, strength=strength, with_h0=with_h0, seed=t)
    ref = {n: a.clone().requires_grad_() for n, a in x64.items()}
    got = {n: a.float().to(DEVICE).requires_grad_() for n, a in x64.items()}
    y_ref, s_ref = token_loop(ref["q"], ref["k"], ref["v"], ref["beta"], ref["g"], ref.get("h0"), scale)
    o, ht = _kernel(got, scale, chunk, final)
    assert o.shape == (b, t, h, dv) and o.dtype == torch.float32
    assert _rel(o.cpu(), y_ref.detach()) < 1e-5
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    loss_ref, loss = (y_ref * do).sum(), (o * do.float().to(DEVICE)).sum()
    if final:
        assert _rel(ht.cpu(), s_ref.detach()) < 1e-5
        dht = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
        loss_ref = loss_ref + (s_ref * dht).sum()
        loss = loss + (ht * dht.float().to(DEVICE)).sum()
    loss_ref.backward()
    loss.backward()
    for name in x64:
        assert _rel(got[name].grad.cpu(), ref[name].grad) < 2e-5, name


@pytest.mark.parametrize("b, t, h, dk, dv, chunk, strength, with_h0, final", CHANNEL_CASES)
def test_per_channel_offsets_match_the_token_loop(b, t, h, dk, dv, chunk, strength, with_h0, final, every_chunk,
                                                  channel_offsets):
    """The per-channel delta rule with the chunk's own keys scored one offset at a time
    (``NLGRAPH_CHANNEL_TREE=0``; the tree of products is the default), at the same cases: every
    chunk, strong decays, partial chunks."""
    assert channel_offsets
    test_per_channel_decay_matches_the_token_loop(b, t, h, dk, dv, chunk, strength, with_h0, final, every_chunk)


def test_per_channel_decay_of_equal_channels_is_the_per_head_kernel():
    """A decay that is the same on every key channel gives the per-head kernel's results."""
    x = {n: a.float().to(DEVICE) for n, a in _inputs(1, 40, 2, 16, 16, gated=True, with_h0=True, seed=4).items()}
    per_head = {n: a.clone().requires_grad_() for n, a in x.items()}
    per_channel = {n: a.clone().requires_grad_() for n, a in x.items()}
    wide = per_channel["g"][..., None].expand(*x["q"].shape)
    o1, h1 = _kernel(per_head, 1.0, 16, True)
    o2, h2 = chunk_delta_rule(per_channel["q"], per_channel["k"], per_channel["v"], per_channel["beta"], g=wide,
                              initial_state=per_channel["h0"], output_final_state=True, scale=1.0, chunk=16)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2, h1, rtol=1e-5, atol=1e-6)
    (o1.square().sum() + h1.sum()).backward()
    (o2.square().sum() + h2.sum()).backward()
    for name in x:
        torch.testing.assert_close(per_channel[name].grad, per_head[name].grad, rtol=1e-4, atol=1e-5)


def test_per_channel_decay_streams_and_compiles_fullgraph():
    x = {n: a.float().to(DEVICE)
         for n, a in _channel_inputs(1, 40, 2, 16, 16, strength=0.5, with_h0=True, seed=3).items()}
    o, ht = _kernel(x, 1.0, 16, True)
    first = {n: a[:, :23] if n != "h0" else a for n, a in x.items()}
    o1, h1 = _kernel(first, 1.0, 16, True)
    second = {n: a[:, 23:] for n, a in x.items() if n != "h0"}
    second["h0"] = h1
    o2, h2 = _kernel(second, 1.0, 16, True)
    assert _rel(torch.cat([o1, o2], 1).cpu(), o.double().cpu()) < 1e-6
    assert _rel(h2.cpu(), ht.double().cpu()) < 1e-6

    def f(q, k, v, beta, g, h0):
        o, ht = chunk_delta_rule(q, k, v, beta, g=g, initial_state=h0, output_final_state=True, scale=1.0, chunk=16)
        return o.square().sum() + ht.sum()

    args = [x[n][:, :20] if n != "h0" else x[n] for n in ("q", "k", "v", "beta", "g", "h0")]
    eager = [a.clone().requires_grad_() for a in args]
    f(*eager).backward()
    traced = [a.clone().requires_grad_() for a in args]
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    torch.compile(f, fullgraph=True, backend=backend)(*traced).backward()
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_a_per_channel_decay_of_the_wrong_width_names_g():
    x = {n: a.float() for n, a in _channel_inputs(1, 8, 2, 16, 16, strength=0.5, with_h0=False, seed=9).items()}
    x["g"] = x["g"][..., :8]
    with pytest.raises(NLGraphError) as err:
        _kernel(x, 1.0, 16, False)
    assert err.value.path == "chunk_delta_rule.g" and "per key channel" in err.value.render()


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_ops_outputs_have_their_fakes_strides(per_channel):
    """``torch.library.opcheck``: the real outputs match the fake implementation (shapes, dtypes and
    strides; inductor trusts the fake's), with B > 1 and T not a multiple of the chunk, where a view
    of a padded buffer once gave ``dg`` other strides than its fake."""
    from nlgraph.compilers.kernels import delta_rule as module

    x = {n: a.float().to(DEVICE) for n, a in
         (_channel_inputs(2, 20, 1, 16, 16, strength=0.5, with_h0=True, seed=11) if per_channel else
          _inputs(2, 20, 1, 16, 16, gated=True, with_h0=True, seed=11)).items()}
    args = (x["q"], x["k"], x["v"], x["beta"], x["g"], x["h0"], 1.0, 16, True)
    torch.library.opcheck(module._fwd_op, args, test_utils=("test_schema", "test_faketensor"))
    o, _, tm, bcum = module._fwd_op(*args)
    bwd = (*args[:6], tm, bcum, torch.randn_like(o), torch.randn_like(x["h0"]), 1.0, 16)
    torch.library.opcheck(module._bwd_op, bwd, test_utils=("test_schema", "test_faketensor"))


class _CudaInput:
    """Stands for a CUDA tensor argument: only its device and element size are read."""

    def __init__(self, element_size, bf16=True):
        self.device = torch.device("cuda", 0)
        self._size = element_size
        self.dtype = {4: torch.float32, 2: torch.bfloat16 if bf16 else torch.float16}[element_size]

    def element_size(self):
        return self._size


def test_sm90_compiles_only_the_config_its_autotuner_chose(monkeypatch):
    import triton  # the interpreter is set up by triton_interp; only Config is used here

    m = _delta_rule_triton
    monkeypatch.setattr(m, "_FULL_TUNING", False)
    monkeypatch.setattr(m, "_WARPS_ENV", None)
    monkeypatch.setattr(m, "_capability", lambda device: (9, 0))
    state = [triton.Config({"BV": bv}, num_warps=w, num_stages=2) for bv in (32, 64) for w in (4, 8)]
    plain = [triton.Config({}, num_warps=w, num_stages=2) for w in (4, 8)]

    def chosen(name, configs, v, size):
        out = m.choose_configs(name, configs, {"k": _CudaInput(size)}, V=v)
        return [(c.kwargs.get("BV"), c.num_warps) for c in out]

    assert chosen("state_fwd", state, 64, 2) == [(32, 4)]
    assert chosen("state_fwd", state, 128, 2) == [(64, 4)]
    assert chosen("state_fwd", state, 128, 4) == [(32, 8)]
    assert chosen("state_bwd", state, 128, 2) == [(64, 8)]
    assert chosen("output", plain, 64, 2) == [(None, 4)]
    # not in the table: every config is timed (float32 output, an unmeasured width)
    assert len(chosen("output", plain, 64, 4)) == 2
    assert len(chosen("state_fwd", state, 96, 2)) == 4
    # another GPU, a CPU tensor, or either variable set: every config
    monkeypatch.setattr(m, "_capability", lambda device: (8, 0))
    assert len(chosen("state_fwd", state, 64, 2)) == 4
    monkeypatch.setattr(m, "_capability", lambda device: (9, 0))
    assert len(m.choose_configs("state_fwd", state, {"k": torch.zeros(1)}, V=64)) == 4
    monkeypatch.setattr(m, "_FULL_TUNING", True)
    assert len(chosen("state_fwd", state, 64, 2)) == 4
    monkeypatch.setattr(m, "_FULL_TUNING", False)
    monkeypatch.setattr(m, "_WARPS_ENV", "8")
    assert len(chosen("state_fwd", state, 64, 2)) == 4
    # the table names configs the kernels offer: each choice is among them
    for (name, _, _), (bv, warps) in m.SM90_CHOICES.items():
        heavy = name in m._HEAVY
        assert warps in ((8,) if heavy else (4, 8)) and (bv in (32, 64) if name in m.STATE_KERNELS else bv is None)


def test_sm90_bfloat16_heads_take_their_own_configs(monkeypatch):
    """bfloat16 heads of K = V = 64 and 128 run the configs ``SM90_BF16`` names (warps, value blocks,
    pipelining depths), which the kernels offer beside their own; elsewhere (float32, float16, other
    widths, other GPUs) those extra configs are pruned, so nothing else compiles them."""
    import triton

    m = _delta_rule_triton
    monkeypatch.setattr(m, "_FULL_TUNING", False)
    monkeypatch.setattr(m, "_WARPS_ENV", None)
    monkeypatch.setattr(m, "_WARPS", (4, 8))
    monkeypatch.setattr(m, "_capability", lambda device: (9, 0))

    def offered(name):
        return [triton.Config({} if bv is None else {"BV": bv}, num_warps=w, num_stages=n)
                for bv, w, n in m.offered_configs(name)]

    def chosen(name, k, v, size=2, bf16=True, **flags):
        out = m.choose_configs(name, offered(name), {"k": _CudaInput(size, bf16=bf16)}, K=k, V=v, **flags)
        return sorted((c.kwargs.get("BV") or 0, c.num_warps, c.num_stages) for c in out)

    # the kernels' own configs (depth 2) and every table entry, nothing else
    assert m.offered_configs("output") == [(None, 4, 2), (None, 4, 3), (None, 8, 2)]
    assert m.offered_configs("wy_bwd") == [(None, 4, 2), (None, 8, 2)]
    assert m.offered_configs("prepare") == [(None, 2, 2), (None, 2, 3), (None, 4, 2), (None, 8, 2)]
    for row in m.SM90_BF16.values():
        for name, choice in row.items():
            assert (*choice, 2)[:3] in m.offered_configs(name)
    # heads of 64
    assert chosen("prepare", 64, 64) == [(0, 2, 2)]
    assert chosen("wy_bwd", 64, 64) == chosen("qkw_bwd", 64, 64) == [(0, 4, 2)]
    assert chosen("state_bwd", 64, 64) == [(16, 4, 4)] and chosen("state_fwd", 64, 64) == [(32, 4, 4)]
    assert chosen("output", 64, 64) == [(0, 4, 2)]  # not in the row: SM90_CHOICES
    # heads of 128, and KDA's recurrences (a decay per key channel) at that width
    assert chosen("prepare", 128, 128) == [(0, 2, 3)] and chosen("wy_bwd", 128, 128) == [(0, 4, 2)]
    assert chosen("state_fwd", 128, 128) == [(64, 4, 4)] and chosen("output", 128, 128) == [(0, 4, 3)]
    assert chosen("state_bwd", 128, 128) == [(64, 8, 2)]
    assert chosen("state_fwd", 128, 128, GK=True) == [(64, 4, 3)]
    assert chosen("state_bwd", 128, 128, GK=True) == [(32, 4, 3)]
    # KDA at heads of 64, unequal widths, float32, float16: SM90_CHOICES or the kernels' own
    assert chosen("state_fwd", 64, 64, GK=True) == [(32, 4, 2)]
    assert chosen("state_bwd", 64, 64, GK=True) == [(32, 8, 2)]
    assert chosen("prepare", 128, 64) == [(0, 4, 2)] and chosen("wy_bwd", 64, 128) == [(0, 8, 2)]
    assert chosen("state_fwd", 64, 64, size=4) == [(32, 8, 2)] and chosen("wy_bwd", 64, 64, size=4) == [(0, 8, 2)]
    assert chosen("prepare", 64, 64, bf16=False) == [(0, 4, 2)]
    assert chosen("prepare", 64, 64, size=4) == [(0, 4, 2), (0, 8, 2)]
    monkeypatch.setattr(m, "_capability", lambda device: (8, 0))
    assert chosen("prepare", 64, 64) == [(0, 4, 2), (0, 8, 2)] and chosen("wy_bwd", 128, 128) == [(0, 8, 2)]
    # the deeper configs are pruned there too
    assert chosen("output", 128, 128) == [(0, 4, 2), (0, 8, 2)]
    assert chosen("state_fwd", 128, 128) == [(32, 4, 2), (32, 8, 2), (64, 4, 2), (64, 8, 2)]
    assert m.bf16_choice("state_fwd", 128, 128, False) == (64, 4, 4) and m.bf16_choice("output", 64, 64, False) is None
    assert m.bf16_choice("state_fwd", 128, 64, False) is None
    # NLGRAPH_TRITON_AUTOTUNE=1 times every combination: the warps offered, value blocks 16-64, depths 2-4
    monkeypatch.setattr(m, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(m, "_FULL_TUNING", True)
    assert len(m.offered_configs("output")) == 6 and len(m.offered_configs("prepare")) == 9
    assert len(m.offered_configs("state_fwd")) == 18 and len(chosen("state_fwd", 64, 64)) == 18
    # NLGRAPH_TRITON_WARPS replaces the warps, and the table's configs go with them
    monkeypatch.setattr(m, "_FULL_TUNING", False)
    monkeypatch.setattr(m, "_WARPS_ENV", "4")
    monkeypatch.setattr(m, "_WARPS", (4,))
    assert m.offered_configs("prepare") == [(None, 4, 2)]
    assert m.offered_configs("state_fwd") == [(32, 4, 2), (64, 4, 2)]
    assert m.bf16_choice("state_fwd", 128, 128, False) is None


@pytest.mark.parametrize("op,decay,dk", [("delta_rule", "head", 8), ("delta_rule", "channel", 8),
                                         ("delta_rule", None, 8), ("delta_rule", "channel", 24),
                                         ("linear_attention", "head", 8), ("linear_attention", "channel", 8)])
def test_narrow_heads_padded_to_the_cuda_minimum_keep_their_function(op, decay, dk, monkeypatch):
    """Heads narrower than ``_load.MIN_CUDA_HEAD`` are zero-padded to it on CUDA (their 16-wide
    tiles faulted or gave wrong values on an H100). Padded here under the interpreter
    (``PAD_EVERYWHERE``): outputs, final state and every input's gradient equal the float64 token
    loop at keys of 8 (or 24: only the values padded) and values of 6, and the outputs come back at
    the caller's widths."""
    from nlgraph.compilers.kernels import _load, chunk_linear_attention
    from nlgraph.compilers.kernels.delta_rule import token_loop as dr_loop
    from nlgraph.compilers.kernels.linear_attention import token_loop as la_loop

    monkeypatch.setattr(_load, "PAD_EVERYWHERE", True)
    b, t, h, dv = 1, 40, 2, 6
    x64 = _inputs(b, t, h, dk, dv, gated=False, with_h0=True, seed=11)
    assert _load.pad_heads(x64["q"], x64["k"], x64["v"], None, x64["h0"])[0][0].shape[-1] == (32 if dk <= 16 else dk)
    gen = torch.Generator().manual_seed(3)
    if decay == "head":
        x64["g"] = F.logsigmoid(torch.randn(b, t, h, generator=gen, dtype=torch.float64) + 2.0)
    elif decay == "channel":
        x64["g"] = F.logsigmoid(torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64) + 2.0)
    if op == "linear_attention":
        del x64["beta"]
    ref = {n: a.clone().requires_grad_() for n, a in x64.items()}
    got = {n: a.to(DEVICE, torch.float32).requires_grad_() for n, a in x64.items()}
    if op == "delta_rule":
        y_ref, s_ref = dr_loop(ref["q"], ref["k"], ref["v"], ref["beta"], ref.get("g"), ref["h0"], 0.5)
        o, ht = chunk_delta_rule(got["q"], got["k"], got["v"], got["beta"], g=got.get("g"), initial_state=got["h0"],
                                 output_final_state=True, scale=0.5, chunk=16)
    else:
        y_ref, s_ref = la_loop(ref["q"], ref["k"], ref["v"], ref.get("g"), ref["h0"], 0.5)
        o, ht = chunk_linear_attention(got["q"], got["k"], got["v"], got.get("g"), initial_state=got["h0"],
                                       output_final_state=True, scale=0.5, chunk=16)
    assert o.shape == (b, t, h, dv) and ht.shape == (b, h, dk, dv)
    assert _rel(o.cpu(), y_ref.detach()) < 1e-5 and _rel(ht.cpu(), s_ref.detach()) < 1e-5
    do = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
    ((y_ref * do).sum() + (s_ref * dht).sum()).backward()
    ((o * do.float().to(DEVICE)).sum() + (ht * dht.float().to(DEVICE)).sum()).backward()
    for name in x64:
        assert got[name].grad.shape == x64[name].shape
        assert _rel(got[name].grad.cpu(), ref[name].grad) < 2e-5, name
    # unless asked, only CUDA tensors are padded
    monkeypatch.setattr(_load, "PAD_EVERYWHERE", False)
    assert (_load.pad_heads(got["q"], got["k"], got["v"], None, None)[1] is not None) == (DEVICE == "cuda")


@pytest.mark.parametrize("decay", [None, "head", "channel"])
def test_the_state_backward_split_in_two_key_halves_matches_the_token_loop(decay, monkeypatch):
    """``NLGRAPH_STATE_BWD_SPLIT=1``: at keys of 128 ``_state_bwd`` keeps ``dh`` as two 64-row
    accumulators (fla's ``blockdim64`` layout). Outputs, final state and every gradient, the initial
    state's and the final state's included, equal the float64 token loop, without a decay, with one
    per head and with one per key channel; the switch is read at each call."""
    from nlgraph.compilers.kernels import delta_rule as module
    from nlgraph.compilers.kernels.delta_rule import token_loop

    seen = []
    original = module._state_bwd_split
    monkeypatch.setattr(module, "_state_bwd_split", lambda p: seen.append(original(p)) or seen[-1])
    monkeypatch.setenv("NLGRAPH_STATE_BWD_SPLIT", "1")
    b, t, h, dk, dv = 1, 40, 1, 128, 24
    x64 = _inputs(b, t, h, dk, dv, gated=False, with_h0=True, seed=5)
    gen = torch.Generator().manual_seed(7)
    if decay == "head":
        x64["g"] = F.logsigmoid(torch.randn(b, t, h, generator=gen, dtype=torch.float64) + 2.0)
    elif decay == "channel":
        x64["g"] = F.logsigmoid(torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64) + 3.0)
    ref = {n: a.clone().requires_grad_() for n, a in x64.items()}
    got = {n: a.to(DEVICE, torch.float32).requires_grad_() for n, a in x64.items()}
    y_ref, s_ref = token_loop(ref["q"], ref["k"], ref["v"], ref["beta"], ref.get("g"), ref["h0"], 0.5)
    o, ht = chunk_delta_rule(got["q"], got["k"], got["v"], got["beta"], g=got.get("g"), initial_state=got["h0"],
                             output_final_state=True, scale=0.5, chunk=16)
    do = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
    ((y_ref * do).sum() + (s_ref * dht).sum()).backward()
    ((o * do.float().to(DEVICE)).sum() + (ht * dht.float().to(DEVICE)).sum()).backward()
    # on CUDA the first call also precompiles the backward's kernels (run_precompiled): asked twice
    assert seen and all(seen)
    assert _rel(o.detach().cpu(), y_ref.detach()) < 1e-5 and _rel(ht.detach().cpu(), s_ref.detach()) < 1e-5
    for name in x64:
        assert _rel(got[name].grad.cpu(), ref[name].grad) < 2e-5, name
    monkeypatch.setenv("NLGRAPH_STATE_BWD_SPLIT", "0")
    assert original({"KP": 128}) is False
    monkeypatch.setenv("NLGRAPH_STATE_BWD_SPLIT", "1")
    assert original({"KP": 128}) is True and original({"KP": 64}) is False
