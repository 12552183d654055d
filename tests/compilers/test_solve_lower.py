"""The Triton unit-triangular solve equals ``torch.linalg.solve_triangular`` (float64 reference).

``nlgraph.compilers.kernels.solve_lower.solve_unit_lower(a, r, transpose)``: values for ``a⁻¹ r``
and ``a⁻ᵀ r`` at sizes that are and are not multiples of its 16-row blocks and of its column block,
with ``a`` broadcast over leading and trailing batch dims (read in place) and over a middle one
(copied), only ``a``'s strict lower triangle read; first- and second-order gradients against
PyTorch's own solve; the op under ``torch.compile(fullgraph=True)`` with its backward; and a HOPE
model through ``NLGRAPH_CHUNK_SOLVE=kernel`` equal to the default solve. Without CUDA the kernel
runs in Triton's interpreter.
"""

import pytest
import torch

from triton_interp import kernels_on  # noqa: E402,F401  (sets up triton first; the fixture below)

from nlgraph.compilers.kernels import dispatch  # noqa: E402
from nlgraph.compilers.kernels.solve_lower import solve_unit_lower  # noqa: E402
from nlgraph.errors import NLGraphError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("kernels_on")


def _system(a_batch, r_batch, n, o, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # well conditioned, as a chunk's erase system is at small write strengths; the upper triangle
    # and diagonal hold garbage the solve must not read
    a = torch.randn(*a_batch, n, n, generator=gen, dtype=torch.float64) * (0.5 / n ** 0.5)
    a = a + torch.triu(torch.full((n, n), 7.0, dtype=torch.float64))
    r = torch.randn(*r_batch, n, o, generator=gen, dtype=torch.float64)
    return a, r


def _reference(a, r, transpose):
    n = a.shape[-1]
    unit = a.tril(-1) + torch.eye(n, dtype=a.dtype)
    return torch.linalg.solve_triangular(unit.mT if transpose else unit, r, upper=transpose, unitriangular=True)


def _rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


@pytest.mark.parametrize("n, o, a_batch, r_batch", [
    (16, 16, (), ()),            # one block
    (40, 5, (3,), (3,)),         # rows and columns short of their blocks
    (64, 70, (1, 2), (5, 1, 2)),  # a broadcast over a leading dim (the model's first call), two column blocks
    (33, 1, (5, 1, 1), (5, 1, 2)),  # a broadcast over a trailing dim
    (20, 3, (5, 1, 2), (5, 3, 2)),  # a broadcast over a middle dim: expanded and copied
    (24, 4, (2,), (1,)),         # the right-hand side broadcast
])
@pytest.mark.parametrize("transpose", [False, True])
def test_the_solve_equals_solve_triangular(n, o, a_batch, r_batch, transpose):
    a, r = _system(a_batch, r_batch, n, o)
    got = solve_unit_lower(a.float().to(DEVICE), r.float().to(DEVICE), transpose)
    want = _reference(a, r, transpose)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert _rel(got.cpu(), want) < 2e-6


def test_the_solve_takes_half_precision_operands_and_strided_ones():
    a, r = _system((2,), (2,), 32, 8)
    want = _reference(a.half().double(), r.half().double(), False)
    got = solve_unit_lower(a.half().to(DEVICE), r.half().to(DEVICE))
    assert got.dtype == torch.float32 and _rel(got.cpu(), want) < 2e-6
    # a transposed view and a right-hand side with columns not contiguous
    at = a.float().mT.contiguous().mT
    rt = r.float().mT.contiguous().mT
    assert _rel(solve_unit_lower(at.to(DEVICE), rt.to(DEVICE), True).cpu(), _reference(a, r, True)) < 2e-6


def test_the_gradients_are_those_of_solve_triangular_to_second_order():
    a, r = _system((2,), (2,), 24, 6, seed=1)
    gen = torch.Generator().manual_seed(2)
    dy = torch.randn(2, 24, 6, generator=gen, dtype=torch.float64)
    for transpose in (False, True):
        grads = []
        for fn, dtype, dev in ((solve_unit_lower, torch.float32, DEVICE), (_reference, torch.float64, "cpu")):
            aa = a.to(dtype).to(dev).requires_grad_()
            rr = r.to(dtype).to(dev).requires_grad_()
            y = fn(aa, rr, transpose)
            ga, gr = torch.autograd.grad((y * dy.to(dtype).to(dev)).sum(), (aa, rr), create_graph=True)
            # the reference's ∂a carries the (unread) diagonal and upper triangle: compare the strict lower
            ga = ga.tril(-1)
            gga, ggr = torch.autograd.grad((ga ** 2).sum() + (gr ** 2).sum(), (aa, rr))
            grads.append([t.detach().cpu() for t in (ga, gr, gga.tril(-1), ggr)])
        for got, want in zip(*grads):
            assert _rel(got, want) < 1e-5


def test_the_solve_compiles_whole_with_its_backward():
    a, r = _system((2,), (2,), 32, 8)
    a, r = a.float().to(DEVICE), r.float().to(DEVICE)

    def f(a, r):
        return solve_unit_lower(a, r).square().sum() + solve_unit_lower(a, r, True).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (a, r)]
    ref = [t.clone().requires_grad_() for t in (a, r)]
    compiled(*args).backward()
    f(*ref).backward()
    for x, y in zip(args, ref):
        assert _rel(x.grad.cpu(), y.grad.cpu()) < 1e-6


def test_the_chunk_solve_reaches_the_kernel_when_compiled(monkeypatch):
    """``NLGRAPH_CHUNK_SOLVE=kernel``: the chunked form's solve (``_solve_lower``, half-precision
    operands solved in float32) traced whole by ``torch.compile`` holds the kernel in its forward and
    backward graphs (the transposed solve) and no other solve, and equals the default solve in
    value and gradients."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from nlgraph.compilers import chunked

    a, r = _system((2,), (3, 2), 32, 8)
    ops = {}

    def keep(name):
        def compiler(gm, _inputs):
            ops[name] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    grads = {}
    for mode in ("triangular", "kernel"):
        monkeypatch.setattr(chunked, "CHUNK_SOLVE", mode)
        torch._dynamo.reset()
        fn = torch.compile(lambda a, r: chunked._solve_lower(a, r).square().sum(), fullgraph=True,
                           backend=aot_autograd(fw_compiler=keep("fwd"), bw_compiler=keep("bwd")))
        args = [t.to(DEVICE, torch.float16).requires_grad_() for t in (a.tril(-1), r)]
        loss = fn(*args)
        loss.backward()
        grads[mode] = [loss.detach()] + [t.grad.tril(-1) if i == 0 else t.grad for i, t in enumerate(args)]
    # the kernel in both graphs (the forward's solve, the backward's transposed one), no other solve
    assert all(any("solve_unit_lower" in t for t in ops[g]) for g in ("fwd", "bwd"))
    assert not any("linalg_solve_triangular" in t for g in ("fwd", "bwd") for t in ops[g])
    for got, want in zip(grads["kernel"], grads["triangular"]):
        assert _rel(got.cpu(), want.cpu()) < 1e-3  # half-precision results and gradients


def test_the_default_takes_the_kernel_on_cuda_only(monkeypatch):
    """``NLGRAPH_CHUNK_SOLVE`` unset (``auto``): float32 solves go to the kernel on CUDA and to
    ``torch.linalg`` on CPU even where the interpreter could run it; ``kernel`` takes it on CPU
    too; a float64 pair stays with ``torch.linalg`` (the kernel is float32)."""
    from nlgraph.compilers import chunked
    from nlgraph.compilers.kernels import solve_lower

    calls = []
    real = solve_lower.solve_unit_lower
    monkeypatch.setattr(solve_lower, "solve_unit_lower", lambda *a: calls.append(1) or real(*a))
    a, r = _system((2,), (2,), 32, 8)
    a, r = a.float().to(DEVICE), r.float().to(DEVICE)
    for mode, want in (("auto", DEVICE == "cuda"), ("kernel", True), ("triangular", False)):
        monkeypatch.setattr(chunked, "CHUNK_SOLVE", mode)
        calls.clear()
        for transpose in (False, True):
            got = chunked._triangular(a.tril(-1) + torch.eye(32, device=DEVICE), r, transpose)
            assert _rel(got.cpu(), _reference(a.double().cpu(), r.double().cpu(), transpose)) < 1e-5
        assert bool(calls) == want, mode
        calls.clear()
        chunked._triangular(a.double().tril(-1), r.double())
        assert not calls, mode


def test_a_wrong_shape_is_one_error():
    with pytest.raises(NLGraphError, match="solve_unit_lower"):
        solve_unit_lower(torch.zeros(3, 4, 5), torch.zeros(3, 5, 2))


def test_hope_through_the_kernel_solve_equals_the_default(monkeypatch):
    """``NLGRAPH_CHUNK_SOLVE=kernel``: a small HOPE with large chunks (chunks of 32 here, the chunk
    walk off as CUDA has it at large chunks) gives the default solve's logits and parameter
    gradients, and its chunk solves ran through the kernel, forward and transposed."""
    from nlgraph import load_spec
    from nlgraph.compilers import chunked
    from nlgraph.compilers.kernels import solve_lower
    from nlgraph.lower import build
    from nlgraph.train.loop import lm_loss

    torch.manual_seed(0)
    model = build(load_spec("hope_large_chunk", ["vars.d_model=32", "vars.heads=2", "vars.layers=1",
                                                 "vars.chunk=32"]), device=torch.device(DEVICE))
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, calls = {}, []
    real = solve_lower._solve_op
    monkeypatch.setattr(solve_lower, "_solve_op", lambda *a: calls.append(a[2]) or real(*a))
    # interpreted, the chunk walk would take HOPE's chunks whatever their size; on CUDA it takes
    # chunks up to 16 only, so large chunks are solved: solve them here too
    monkeypatch.setattr(dispatch, "chunk_walk_for", lambda run: None)
    for mode in ("triangular", "kernel"):
        monkeypatch.setattr(chunked, "CHUNK_SOLVE", mode)
        model.zero_grad()
        logits = model(tokens)
        lm_loss(logits, tokens).backward()
        out[mode] = (logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert False in calls and True in calls  # forward and transposed (backward) solves
    (lt, gt), (lk, gk) = out["triangular"], out["kernel"]
    assert _rel(lk, lt) < 1e-5
    assert max(_rel(b, a) for a, b in zip(gt, gk)) < 1e-4


@pytest.mark.parametrize("rows", ["32", "64"])
@pytest.mark.parametrize("n, o, a_batch, r_batch", [
    (128, 40, (2,), (2,)),         # whole blocks, a column block short
    (70, 5, (1, 2), (3, 1, 2)),    # rows short of their last block, a broadcast over a leading dim
    (16, 8, (), ()),               # a system smaller than the block: one block of 16
])
@pytest.mark.parametrize("transpose", [False, True])
def test_the_solve_by_larger_blocks_equals_solve_triangular(rows, n, o, a_batch, r_batch, transpose, monkeypatch):
    """``NLGRAPH_SOLVE_ROWS`` of 32 and 64: the diagonal blocks through the UT inverse, fewer block
    steps; the same solutions (lower and transposed) as the 16-row walk; an unknown value is one
    clear error."""
    from nlgraph.compilers.kernels import solve_lower

    monkeypatch.setattr(solve_lower, "ROWS", rows)
    a, r = _system(a_batch, r_batch, n, o, seed=3)
    got = solve_unit_lower(a.float().to(DEVICE), r.float().to(DEVICE), transpose)
    assert _rel(got.cpu(), _reference(a, r, transpose)) < 1e-5
    monkeypatch.setattr(solve_lower, "ROWS", "48")
    with pytest.raises(NLGraphError, match="NLGRAPH_SOLVE_ROWS"):
        solve_unit_lower(a.float().to(DEVICE), r.float().to(DEVICE), transpose)
