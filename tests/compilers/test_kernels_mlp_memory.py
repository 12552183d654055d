"""Titans' mini-batch MLP memory in Triton equals a token-by-token loop and nlgraph's level.

``nlgraph.compilers.kernels.mlp_memory.chunk_mlp_memory`` is checked against the float64 token loop
(chunk-start gradients of ``½‖W1 σ(W0 k) − v‖²``, momentum, weight decay, read after the write):
outputs, the final weights and momentum, and the gradients of every input (q, k, v, the three gates
and the four state matrices), with partial last chunks, head and hidden widths that are not powers
of two or not multiples of the hidden block, and in bfloat16; then against ``run_level`` on
``specs/titans.yaml``'s memory level, which is what makes it that level's function; the op traces
under ``torch.compile(fullgraph=True)``. Both kernel layouts: one program per (batch, head)
walking every chunk (``split=0``), and one launch per chunk with the hidden units split over
programs (``split`` ≥ 1 hidden blocks each, sums across programs added with atomics). Without CUDA
the kernels run in Triton's interpreter.
"""

import pytest
import torch

from triton_interp import INTERPRET as _INTERPRET  # noqa: E402  (sets up triton first)
from triton_interp import interpreter_while_testing  # noqa: E402, F401  (the module fixture)
from triton_interp import rel as _rel  # noqa: E402

from nlgraph.compilers.kernels.mlp_memory import chunk_mlp_memory, random_inputs, token_loop  # noqa: E402
from nlgraph.errors import NLGraphError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("interpreter_while_testing")


def _inputs(b, t, h, d, f, seed):
    # on a GPU the kernel leaves heads of 16 or fewer to the PyTorch form (mlp_memory.why_not_on_cuda):
    # there the narrow cases run at 24, still not a power of two, in the 32-wide tile
    return random_inputs(b, t, h, d if DEVICE == "cpu" or d > 16 else 24, f, seed)


def _run(qkv, gates, state, dtype, **kw):
    dev = [x.to(DEVICE, dtype) for x in qkv]
    return chunk_mlp_memory(*dev, *(g.to(DEVICE, torch.float32) for g in gates),
                            tuple(s.to(DEVICE, torch.float32) for s in state), **kw)


# the layouts: one program per (batch, head); one launch per chunk, one hidden block per program
# (the tests below take hidden blocks of 16, so that every head has two programs or more)
SPLITS = pytest.mark.parametrize("split", [0, 1])


@pytest.mark.parametrize("b,t,h,d,f,chunk,block_f,split", [
    *[(*shape, split) for shape in [
        (1, 16, 1, 16, 32, 16, 16),     # one full chunk
        (2, 37, 2, 8, 24, 16, 16),      # partial last chunk; F not a multiple of the block
        (1, 70, 2, 20, 64, 32, 32),     # D not a power of two, chunk 32
        (1, 64, 1, 16, 40, 64, 32),     # chunk 64
    ] for split in (0, 1)],
    (2, 37, 2, 8, 40, 16, 16, 2),       # two blocks a program, the last program's second one empty
    (1, 40, 2, 16, 32, 16, 16, 9),      # more blocks a program than the memory has: two
])
def test_forward_equals_the_token_loop(b, t, h, d, f, chunk, block_f, split):
    qkv, gates, state = _inputs(b, t, h, d, f, seed=t + d)
    o_ref, s_ref = token_loop(*qkv, *gates, state, chunk)
    o, s = _run(qkv, gates, state, torch.float32, chunk=chunk, block_f=block_f, split=split)
    assert o.dtype == torch.float32 and all(x.dtype == torch.float32 for x in s)
    assert _rel(o, o_ref) < 1e-5
    for got, want in zip(s, s_ref):
        assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("b,t,h,d,f,chunk,block_f,split", [
    (1, 16, 1, 16, 32, 16, 16, 0),
    (2, 37, 2, 8, 24, 16, 16, 0),
    (1, 70, 2, 20, 64, 32, 32, 0),
    (1, 150, 1, 16, 40, 64, 32, 0),   # chunk 64, partial last chunk
    (1, 5, 2, 8, 16, 16, 16, 0),      # shorter than one chunk
    (1, 16, 1, 16, 32, 16, 16, 1),
    (2, 37, 2, 8, 24, 16, 16, 1),
    (1, 70, 2, 20, 64, 32, 32, 1),
    (1, 150, 1, 16, 40, 64, 32, 1),
    (1, 5, 2, 8, 16, 16, 16, 1),
    (2, 37, 2, 8, 40, 16, 16, 2),     # two blocks a program, the last program's second block empty
])
def test_gradients_equal_the_token_loop(b, t, h, d, f, chunk, block_f, split):
    """Every input's gradient, the final state's included (the backward kernel walks the chunks in
    reverse, second order through the chunk-start gradients; PyTorch differentiates the gates'
    transfer products)."""
    qkv, gates, state = _inputs(b, t, h, d, f, seed=t + d)
    leaves = [x.clone().requires_grad_() for x in (*qkv, *gates, *state)]
    o_ref, s_ref = token_loop(*leaves[:6], tuple(leaves[6:]), chunk)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    ds = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in s_ref]
    want = torch.autograd.grad((o_ref * do).sum() + sum((x * y).sum() for x, y in zip(s_ref, ds)), leaves)
    mine = [x.detach().to(DEVICE, torch.float32).requires_grad_() for x in leaves]
    o, s = chunk_mlp_memory(*mine[:6], tuple(mine[6:]), chunk=chunk, block_f=block_f, split=split)
    loss = (o * do.to(o)).sum() + sum((x * y.to(x)).sum() for x, y in zip(s, ds))
    got = torch.autograd.grad(loss, mine)
    names = ["q", "k", "v", "eta", "alpha", "mu", "W0", "W1", "S0", "S1"]
    errors = {n: _rel(a, w) for n, a, w in zip(names, got, want)}
    assert max(errors.values()) < 1e-5, errors


@SPLITS
@pytest.mark.parametrize("checkpoint", [2, 3, 8])
def test_checkpointed_backward_equals_keeping_every_state(checkpoint, split):
    """Keeping every ``checkpoint``-th chunk-start state and running each segment forward again in
    the backward gives the gradients of keeping them all (7 chunks: segments that do not divide)."""
    qkv, gates, state = _inputs(1, 106, 2, 8, 24, seed=7)

    def grads(ck):
        leaves = [x.to(DEVICE, torch.float32).requires_grad_() for x in (*qkv, *gates, *state)]
        o, s = chunk_mlp_memory(*leaves[:6], tuple(leaves[6:]), chunk=16, checkpoint=ck, split=split,
                                block_f=16)
        return torch.autograd.grad(o.square().sum() + sum(x.sum() for x in s), leaves)

    for got, want in zip(grads(checkpoint), grads(1)):
        assert _rel(got, want) < 1e-6


def test_without_gradients_no_graph_is_built():
    qkv, gates, state = _inputs(1, 32, 1, 16, 32, seed=2)
    with torch.no_grad():
        o, _ = _run(qkv, gates, state, torch.float32)
    assert o.grad_fn is None


def test_traces_under_fullgraph_compile():
    """The ops have fake implementations: a compiled caller traces them without a graph break."""
    qkv, gates, state = _inputs(1, 32, 1, 16, 32, seed=4)
    mine = [x.to(DEVICE, torch.float32).requires_grad_() for x in (*qkv, *gates)]
    st = tuple(x.to(DEVICE, torch.float32) for x in state)

    def f(q, k, v, eta, alpha, mu):
        return chunk_mlp_memory(q, k, v, eta, alpha, mu, st)[0].square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*mine), mine)
    want = torch.autograd.grad(f(*mine), mine)
    for a, w in zip(got, want):
        assert _rel(a, w) < 1e-6


@SPLITS
def test_read_before_the_write_equals_the_token_loop(split):
    """``read: before_write`` reads the state after the previous token (outputs and gradients)."""
    qkv, gates, state = _inputs(2, 37, 2, 8, 24, seed=9)
    leaves = [x.clone().requires_grad_() for x in (*qkv, *gates, *state)]
    o_ref, s_ref = token_loop(*leaves[:6], tuple(leaves[6:]), 16, read="before_write")
    want = torch.autograd.grad(o_ref.square().sum() + sum(x.sum() for x in s_ref), leaves)
    mine = [x.detach().to(DEVICE, torch.float32).requires_grad_() for x in leaves]
    o, s = chunk_mlp_memory(*mine[:6], tuple(mine[6:]), read="before_write", split=split, block_f=16)
    assert _rel(o, o_ref) < 1e-5
    got = torch.autograd.grad(o.square().sum() + sum(x.sum() for x in s), mine)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5


@SPLITS
def test_bfloat16_inputs_stay_within_bf16_error(split):
    """Outputs, state and every gradient with q, k, v in bfloat16 (gates and state float32)."""
    qkv, gates, state = _inputs(1, 48, 2, 16, 32, seed=3)
    leaves = [x.clone().requires_grad_() for x in (*qkv, *gates, *state)]
    o_ref, s_ref = token_loop(*leaves[:6], tuple(leaves[6:]), 16)
    want = torch.autograd.grad(o_ref.square().sum() + sum(x.sum() for x in s_ref), leaves)
    mine = [x.detach().to(DEVICE, torch.bfloat16 if i < 3 else torch.float32).requires_grad_()
            for i, x in enumerate(leaves)]
    o, s = chunk_mlp_memory(*mine[:6], tuple(mine[6:]), split=split, block_f=16)
    assert o.dtype == torch.bfloat16
    assert _rel(o, o_ref) < 2e-2
    for got, w in zip(s, s_ref):
        assert _rel(got, w) < 2e-2
    got = torch.autograd.grad(o.float().square().sum() + sum(x.sum() for x in s), mine)
    assert all(g.dtype == m.dtype for g, m in zip(got, mine))
    for g, w in zip(got, want):
        assert _rel(g, w) < 2e-2


@SPLITS
def test_16_bit_products_stay_within_half_precision_error(split, monkeypatch):
    """With ``NLGRAPH_MLP_PRODUCTS=input`` (the default) a 16-bit run rounds both operands of every
    product to the inputs' dtype (float16 here: the interpreter's bfloat16 is not the GPU's):
    outputs, state and every gradient stay within half precision's error of the float64 loop, and
    differ from the TF32 products' (the switch is live); tiles above 2048 keep TF32."""
    from nlgraph.compilers.kernels import mlp_memory as op

    qkv, gates, state = _inputs(1, 48, 2, 16, 32, seed=4)
    leaves = [x.clone().requires_grad_() for x in (*qkv, *gates, *state)]
    o_ref, s_ref = token_loop(*leaves[:6], tuple(leaves[6:]), 16)
    want = torch.autograd.grad(o_ref.square().sum() + sum(x.sum() for x in s_ref), leaves)
    outs = {}
    for products in ("tf32", "input"):
        monkeypatch.setattr(op, "MLP_PRODUCTS", products)
        mine = [x.detach().to(DEVICE, torch.float16 if i < 3 else torch.float32).requires_grad_()
                for i, x in enumerate(leaves)]
        o, s = chunk_mlp_memory(*mine[:6], tuple(mine[6:]), split=split, block_f=16)
        got = torch.autograd.grad(o.float().square().sum() + sum(x.sum() for x in s), mine)
        assert _rel(o, o_ref) < 1e-2, products
        for g, w in zip((*s, *got), (*s_ref, *want)):
            assert _rel(g, w) < 1e-2, products
        outs[products] = o
    assert not torch.equal(outs["tf32"], outs["input"])
    assert op._precision(torch.bfloat16, 2048) == "bf16" and op._precision(torch.float16, 1024) == "fp16"
    assert op._precision(torch.bfloat16, 4096) == "tf32" and op._precision(torch.float32, 1024) == "ieee"
    assert op._precision(torch.bfloat16, 1024, cuda=False) == "tf32"  # the interpreter's bfloat16 products are wrong


def test_a_bad_products_setting_is_one_clear_error(monkeypatch):
    from nlgraph.compilers.kernels import mlp_memory as op

    monkeypatch.setattr(op, "MLP_PRODUCTS", "int8")
    qkv, gates, state = _inputs(1, 16, 1, 16, 32, seed=1)
    with pytest.raises(NLGraphError, match="input, tf32") as err:
        _run(qkv, gates, state, torch.float16, split=1, block_f=16)
    assert err.value.path == "NLGRAPH_MLP_PRODUCTS"


@SPLITS
def test_streaming_equals_one_call(split):
    """The state after a sequence of whole chunks continues it exactly."""
    qkv, gates, state = _inputs(1, 48, 2, 16, 32, seed=5)
    kw = dict(split=split, block_f=16)
    o, s = _run(qkv, gates, state, torch.float32, **kw)
    first = _run([x[:, :32] for x in qkv], [g[:, :32] for g in gates], state, torch.float32, **kw)
    second = _run([x[:, 32:] for x in qkv], [g[:, 32:] for g in gates], first[1], torch.float32, **kw)
    assert _rel(torch.cat([first[0], second[0]], dim=1), o) < 1e-6
    for got, want in zip(second[1], s):
        assert _rel(got, want) < 1e-6


def test_it_is_the_titans_memory_level():
    """``run_level`` on specs/titans.yaml's memory level (PyTorch's mini-batch form), given the same
    activated gates and initial state, computes what the kernel computes."""
    from nlgraph.runtime import run_level
    from nlgraph.spec.loader import load_spec

    level = load_spec("titans", ["vars.heads=2"]).levels["memory"]
    # the spec's hidden layer is twice the head: on a GPU the head is 24 (see _inputs), so 48
    d = 8 if DEVICE == "cpu" else 24
    (q, k, v), (lr, alpha, mu), (w0, w1, s0, s1) = _inputs(1, 40, 2, d, 2 * d, seed=11)
    state = {"memory.w0": w0, "memory.w1": w1, "optimizer.memory.momentum.w0": s0,
             "optimizer.memory.momentum.w1": s1}
    y, st = run_level(level, keys=k, values=v, queries=q, lr=lr, retention=alpha, momentum=mu, state=state,
                      form="chunked")
    o, s = _run((q, k, v), (lr, alpha, mu), (w0, w1, s0, s1), torch.float32)
    assert _rel(o, y) < 1e-5
    for got, key in zip(s, ("memory.w0", "memory.w1", "optimizer.memory.momentum.w0",
                            "optimizer.memory.momentum.w1")):
        assert _rel(got, st[key]) < 1e-5


def _level(optimizer: str, read: str):
    from nlgraph.spec.loader import load_level

    gate = {"from": "input", "act": "sigmoid", "per": "head"}
    opt = {"kind": optimizer, "lr": gate}
    if optimizer == "momentum":
        opt["momentum"] = gate
    return load_level({"memory": {"kind": "mlp", "heads": 2, "depth": 2, "hidden": 16, "activation": "silu"},
                       "objective": {"kind": "l2"}, "optimizer": opt,
                       "retention": {"kind": "weight_decay", "gate": gate},
                       "frequency": 1, "gradient_point": {"chunk": 16}, "read": read})


@pytest.mark.parametrize("optimizer,read", [("momentum", "before_write"), ("gd", "after_write"), ("gd", "before_write")])
def test_variants_route_and_equal_the_pytorch_form(optimizer, read, monkeypatch):
    """The kernel also computes the level with a read before the write, and with plain gd (no
    momentum buffer: μ = 0 from zeros); ``run_level``'s ``triton`` form equals its ``chunked`` form
    on outputs and state, both over a sequence that ends inside a chunk."""
    from nlgraph.compilers.kernels import dispatch
    from nlgraph.compilers.kernels import mlp_memory as module
    from nlgraph.runtime import run_level

    calls = {"n": 0}
    real = module.chunk_mlp_memory

    def spy(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "chunk_mlp_memory", spy)
    level = _level(optimizer, read)
    why_no_mlp_memory_kernel = dispatch.why_no_mlp_memory_kernel
    assert why_no_mlp_memory_kernel(level) is None
    (q, k, v), (lr, alpha, mu), (w0, w1, s0, s1) = _inputs(1, 40, 2, 8, 16, seed=13)
    state = {"memory.w0": w0, "memory.w1": w1}
    rates = {"lr": lr, "retention": alpha}
    if optimizer == "momentum":
        state.update({"optimizer.memory.momentum.w0": s0, "optimizer.memory.momentum.w1": s1})
        rates["momentum"] = mu
    y_ref, st_ref = run_level(level, keys=k, values=v, queries=q, state=state, form="chunked", **rates)
    dev = {n: x.to(DEVICE, torch.float32) for n, x in state.items()}
    dispatch.set_kernels("interpret" if _INTERPRET else "auto")
    monkeypatch.setattr(dispatch, "MLP_MEMORY_ON_GPU", True)
    try:
        y, st = run_level(level, keys=k.to(DEVICE).float(), values=v.to(DEVICE).float(),
                          queries=q.to(DEVICE).float(), state=dev, form="triton",
                          **{n: r.to(DEVICE).float() for n, r in rates.items()})
    finally:
        dispatch.set_kernels(None)
    assert calls["n"] == 2  # the full chunks, then the partial one
    assert _rel(y, y_ref) < 1e-5
    assert st.keys() == st_ref.keys()
    for n in st_ref:
        if n != "position":
            assert _rel(st[n], st_ref[n]) < 1e-5, n


def test_bad_input_is_one_clear_error():
    qkv, gates, state = _inputs(1, 16, 1, 16, 32, seed=0)
    with pytest.raises(NLGraphError, match="chunk_mlp_memory.eta"):
        _run(qkv, (gates[0][:, :8], *gates[1:]), state, torch.float32)
    with pytest.raises(NLGraphError, match="chunk_mlp_memory.state.W1"):
        _run(qkv, gates, (state[0], state[0], state[2], state[3]), torch.float32)
    with pytest.raises(NLGraphError, match="must each be 16, 32 or 64"):
        _run(qkv, gates, state, torch.float32, chunk=24)
    with pytest.raises(NLGraphError, match="chunk_mlp_memory.checkpoint"):
        _run(qkv, gates, state, torch.float32, checkpoint=0)
    with pytest.raises(NLGraphError, match="chunk_mlp_memory.split"):
        _run(qkv, gates, state, torch.float32, split=-1)


@pytest.mark.parametrize("env,want", [(None, 1), ("0", 0), ("off", 0), ("1", 1)])
def test_the_step_kernels_run_on_cuda_unless_switched_off(env, want):
    """``NLGRAPH_MLP_MEMORY_SPLIT`` (read at import) decides the CUDA layout; the interpreter (CPU)
    always runs the step kernels."""
    import os
    import subprocess
    import sys

    code = ("import torch; from nlgraph.compilers.kernels import mlp_memory as m; "
            "print(m.default_split(torch.device('cuda')), m.default_split(torch.device('cpu')))")
    env_vars = {k: v for k, v in os.environ.items() if k != "NLGRAPH_MLP_MEMORY_SPLIT"}
    if env is not None:
        env_vars["NLGRAPH_MLP_MEMORY_SPLIT"] = env
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env_vars, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [str(want), "1"], out.stderr


def test_deterministic_algorithms_take_the_one_program_kernels():
    """The step kernels add across programs with atomics (run-to-run variation in the last bits):
    under ``torch.use_deterministic_algorithms`` the default is the one-program layout."""
    from nlgraph.compilers.kernels import mlp_memory

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert mlp_memory.default_split(torch.device("cpu")) == 0
        assert mlp_memory.default_split(torch.device("cuda")) == 0
    finally:
        torch.use_deterministic_algorithms(before)


def test_repeated_launches_pass_the_arguments_in_the_kernels_order():
    """After the first launch through the JIT, ``_Repeated`` calls the compiled kernel's launcher
    with every parameter in the kernel's order (compile-time ones included) and the grid padded to
    three sizes; a dry run's recording launch is made once."""
    from types import SimpleNamespace

    from nlgraph.compilers.kernels.mlp_memory import _Repeated

    calls = []

    class Compiled:
        packed_metadata = object()

        def __getitem__(self, grid):
            return lambda *args: calls.append(("direct", grid, args))

    class Kernel:
        params = [SimpleNamespace(name=n) for n in ("x", "y", "i_t", "C0", "C1", "T", "NB")]

        def __getitem__(self, grid):
            def jit(*args, **kwargs):
                calls.append(("jit", grid, args, kwargs))
                return Compiled()
            return jit

    launch = _Repeated(Kernel(), (6, 2), ("X", "Y"), dict(T=40, NB=1, num_warps=4, num_stages=1))
    launch(-1, 0, 3)
    launch(0, 0, 3)
    assert calls[0] == ("jit", (6, 2), ("X", "Y", -1, 0, 3), dict(T=40, NB=1, num_warps=4, num_stages=1))
    assert calls[1] == ("direct", (6, 2, 1), ("X", "Y", 0, 0, 3, 40, 1))

    class Recording:
        recording = True

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append("recorded")

    calls.clear()
    launch = _Repeated(Recording(), (6, 2), ("X",), {})
    for i in range(4):
        launch(i, 0, 3)
    assert calls == ["recorded"]


@pytest.mark.parametrize("t", [48, 50, 7])
def test_coefficients_assign_no_python_number_into_a_tensor(t, monkeypatch):
    """``x[i] = 5`` on a CUDA tensor copies a pageable host tensor, which CUDA-graph capture refuses
    (titans_mag fell back to eager on the H200): the transfer coefficients are built without it.
    The chunks' last rows are C, except the partial last chunk's."""
    from nlgraph.compilers.kernels import mlp_memory

    def refuse(self, *args):
        raise AssertionError("Tensor.__setitem__ called")

    alpha = torch.rand(1, t, 2) * 0.1 + 0.9
    mu = torch.rand(1, t, 2) * 0.5
    monkeypatch.setattr(torch.Tensor, "__setitem__", refuse)
    coef = mlp_memory._coefficients(alpha, mu, t, 16)
    monkeypatch.undo()
    assert all(torch.isfinite(c).all() for c in (coef if isinstance(coef, (tuple, list)) else coef.values()))
