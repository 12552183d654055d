"""The Triton short convolution equals PyTorch's depthwise ``conv1d`` (with the stream's activation).

``nlgraph.compilers.kernels.short_conv`` (forward and backward in Triton, float32 accumulation) is
checked against ``F.conv1d`` on ``cat(state, x)`` in float64: outputs and the gradients of the input,
the weight and the state, with and without a state, SiLU or identity, a token block cut short and a
sequence shorter than the kernel, with the backward's ``da`` stored in the 16-bit input dtype (the
default) and in float32. A ``Stream`` fed in segments gives one pass's output through the
kernel, a model's logits and gradients match the PyTorch path, and the op traces under
``torch.compile(fullgraph=True)``. Without CUDA the kernels run in Triton's interpreter.
"""

import pytest
import torch
import torch.nn.functional as F

from triton_interp import INTERPRET as _INTERPRET  # noqa: E402  (sets up triton first)
from triton_interp import kernels_on  # noqa: E402,F401  (the fixture below)

from nlgraph.compilers.kernels import dispatch  # noqa: E402
from nlgraph.compilers.kernels.short_conv import short_conv  # noqa: E402
from nlgraph.errors import NLGraphError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# training's dtype; Triton's interpreter computes bfloat16 wrongly (numpy has none), so float16 on CPU
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16


pytestmark = pytest.mark.usefixtures("kernels_on")


def _reference(x, w, s, act):
    b, _, c = x.shape
    if s is None:
        s = x.new_zeros(b, w.shape[1] - 1, c)
    y = F.conv1d(torch.cat([s, x], 1).transpose(1, 2), w.unsqueeze(1), groups=c).transpose(1, 2)
    return F.silu(y) if act == "silu" else y


def _rel(a, b):
    a, b = a.detach().double(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


_CASES = [
    (2, 37, 24, 4, "silu", True, torch.float32, 1e-5),     # partial token block, a state
    (1, 130, 70, 4, "identity", False, torch.float32, 1e-5),  # two token blocks, partial channel block
    (2, 2, 8, 4, "silu", True, torch.float32, 1e-5),       # shorter than the kernel: reads the state
    (3, 65, 16, 2, "silu", False, torch.float16, 2e-3),
    (2, 130, 96, 4, "silu", True, LOW, 1e-2),
]


# da16: the backward's da in the 16-bit input dtype (the default) or float32; float32 inputs have one way
@pytest.mark.parametrize("b, t, c, k, act, with_state, dtype, tol, da16",
                         [(*case, True) for case in _CASES] + [(*case, False) for case in _CASES[3:]])
def test_short_conv_equals_conv1d(b, t, c, k, act, with_state, dtype, tol, da16, monkeypatch):
    from nlgraph.compilers.kernels import short_conv as op

    monkeypatch.setattr(op, "_DA16", da16)
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(b, t, c, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = torch.randn(c, k, generator=gen).to(DEVICE).requires_grad_()
    s = torch.randn(b, k - 1, c, generator=gen).to(DEVICE, dtype).requires_grad_() if with_state else None
    y = short_conv(x, w, s, act)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    leaves = [x, w] + ([s] if with_state else [])
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [z.detach().double().requires_grad_() for z in leaves]
    yr = _reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_state else None, act)
    ref_grads = torch.autograd.grad(yr, ref_leaves, dy.double())
    assert _rel(y, yr) < tol
    for name, g, gr in zip(("x", "w", "state"), grads, ref_grads):
        assert _rel(g, gr) < tol, name
    assert grads[1].dtype == torch.float32  # the weight's gradient stays in the master dtype


@pytest.mark.parametrize("d, fused", [(32, True), (128, True), (8, True), (48, False), (256, False)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_short_conv_fuses_the_l2_norm(d, fused, dtype, tol, monkeypatch):
    """``l2=D`` divides each head of ``D`` channels by its norm as ``F.normalize(eps=1e-6)`` does,
    outputs and all gradients against float64 — in the kernels when ``D`` is a power of two dividing
    the tile's 128 channels (a spy sees the op get ``D``), after them otherwise — in float32 with a
    head whose inputs are all zero (norm below eps: its gradient is ``dy / eps``, no projection;
    float16 cannot hold that gradient, as PyTorch's own path cannot)."""
    from nlgraph.compilers.kernels import short_conv as op

    seen = []
    real = op._fwd_op
    monkeypatch.setattr(op, "_fwd_op", lambda *a: (seen.append(a[4]), real(*a))[1])
    gen = torch.Generator().manual_seed(d)
    b, t, c, k = 2, 70, {48: 384, 256: 512}.get(d, 256), 4
    x = torch.randn(b, t, c, generator=gen)
    s = torch.randn(b, k - 1, c, generator=gen)
    zero = dtype == torch.float32
    if zero:  # batch 1, head 0: inputs and state all zero -> output and norm 0
        x[1, :, :d] = 0
        s[1, :, :d] = 0
    x, s = x.to(DEVICE, dtype).requires_grad_(), s.to(DEVICE, dtype).requires_grad_()
    w = torch.randn(c, k, generator=gen).to(DEVICE).requires_grad_()
    for act in ("silu", "identity"):
        y = short_conv(x, w, s, act, d)
        dy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
        grads = torch.autograd.grad(y, [x, w, s], dy)
        ref = [z.detach().double().requires_grad_() for z in (x, w, s)]
        yr = F.normalize(_reference(*ref, act).unflatten(-1, (c // d, d)), dim=-1, eps=1e-6).flatten(-2)
        ref_grads = torch.autograd.grad(yr, ref, dy.double())
        assert _rel(y, yr) < tol, act
        for name, g, gr in zip(("x", "w", "state"), grads, ref_grads):
            assert _rel(g, gr) < tol, (act, name)
        if zero:
            assert float(y[1, :, :d].detach().abs().max()) == 0.0
            assert float(grads[0][1, :, :d].abs().max()) > 1e3  # dy / eps reached x through the taps
    assert seen == [d if fused else 0] * 2
    with pytest.raises(NLGraphError, match="does not divide"):
        short_conv(x, w, s, "silu", 7 if c % 7 else 5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_the_weights_gradient_summed_each_way(dtype, tol, monkeypatch):
    """The weight's per-program partial sums laid out ``[programs, C·K]`` or ``[C·K, programs]``, or
    added with atomics (``_DW``), give the same gradients, equal to float64 (several token blocks
    and batches, so there are partial sums to add, and a partial channel block); under
    deterministic algorithms ``atomic`` takes ``rows``, bit for bit."""
    from nlgraph.compilers.kernels import short_conv as op

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 150, 200, generator=gen).to(DEVICE, dtype)
    w = torch.randn(200, 4, generator=gen).to(DEVICE)
    s = torch.randn(3, 3, 200, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(3, 150, 200, generator=gen).to(DEVICE, dtype)
    ref = [z.double().requires_grad_() for z in (x, w, s)]
    ref_grads = torch.autograd.grad(_reference(*ref, "silu"), ref, dy.double())
    def grads_with(layout):
        monkeypatch.setattr(op, "_DW", layout)
        leaves = [z.clone().requires_grad_() for z in (x, w, s)]
        return torch.autograd.grad(short_conv(*leaves, "silu"), leaves, dy)

    got = {}
    for layout in op.DW_LAYOUTS:
        got[layout] = grads_with(layout)
        for name, g, gr in zip(("x", "w", "state"), got[layout], ref_grads):
            assert _rel(g, gr) < tol, (layout, name)
    for layout in ("inner", "atomic"):
        assert _rel(got[layout][1], got["rows"][1].double()) < 1e-6  # dw: only the float32 summation order differs
        torch.testing.assert_close(got[layout][0], got["rows"][0], rtol=0, atol=0)  # dx does not use them
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(grads_with("atomic")[1], got["rows"][1])
    finally:
        torch.use_deterministic_algorithms(before)


def test_the_backward_stores_da_in_the_16_bit_input_dtype(monkeypatch):
    """``_conv_da`` writes ``da`` (read once, by ``_conv_dx``) in the input's 16-bit dtype, float32
    for float32 inputs or with ``_DA16`` off."""
    from nlgraph.compilers.kernels import short_conv as op

    seen = []
    real = op._kernels

    class Spy:
        def __init__(self, kn):
            self.kn = kn

        def __getattr__(self, name):
            kernel = getattr(self.kn, name)
            if name != "dx":
                return kernel

            class Launch:
                def __getitem__(self, grid):
                    def launch(da, *args, **kw):
                        seen.append(da.dtype)
                        return kernel[grid](da, *args, **kw)
                    return launch
            return Launch()

    monkeypatch.setattr(op, "_kernels", lambda x: Spy(real(x)))
    for dtype, da16, want in [(torch.float16, True, torch.float16), (torch.float16, False, torch.float32),
                              (torch.float32, True, torch.float32)]:
        monkeypatch.setattr(op, "_DA16", da16)
        x = torch.randn(1, 20, 8, device=DEVICE, dtype=dtype, requires_grad=True)
        short_conv(x, torch.randn(8, 4, device=DEVICE), None, "silu").sum().backward()
        assert seen.pop() == want, (dtype, da16)


def test_short_conv_errors_name_the_argument():
    x = torch.randn(1, 8, 4, device=DEVICE)
    with pytest.raises(NLGraphError, match="short_conv.act"):
        short_conv(x, torch.randn(4, 4, device=DEVICE), None, "relu")
    with pytest.raises(NLGraphError, match="short_conv.state"):
        short_conv(x, torch.randn(4, 4, device=DEVICE), torch.randn(1, 2, 4, device=DEVICE))


def test_stream_runs_the_kernel_and_streams_in_segments(monkeypatch):
    """A Stream with a conv, SiLU and an L2 norm takes the kernel with the norm fused (a spy counts
    it), equals the PyTorch path, and two segments chained through the state equal one pass."""
    from nlgraph.compilers.kernels import short_conv as mod
    from nlgraph.layers import Stream
    from nlgraph.spec.schema import StreamSpec

    calls = {"n": 0}
    real = mod._fwd_op

    def spy(*a):
        calls["n"] += 1
        calls["l2"] = a[4]
        return real(*a)

    monkeypatch.setattr(mod, "_fwd_op", spy)
    torch.manual_seed(0)
    stream = Stream(StreamSpec(conv=4, feature_map="silu", norm="l2"), 12, 2, 4).to(DEVICE)
    x = torch.randn(2, 21, 12, device=DEVICE)
    y, _ = stream(x)
    assert calls["n"] == 1 and calls["l2"] == 4  # the stream's L2 norm fused, heads of 4
    dispatch.set_kernels("off")
    y_ref, _ = stream(x)
    assert calls["n"] == 1
    dispatch.set_kernels("interpret" if _INTERPRET else "auto")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y1, st = stream(x[:, :2])  # shorter than the kernel: the state is built from zeros and x
    y2, st = stream(x[:, 2:13], st)
    y3, _ = stream(x[:, 13:], st)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y, rtol=1e-5, atol=1e-6)


def test_short_conv_traces_under_compile_fullgraph():
    x = torch.randn(2, 19, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 4, device=DEVICE, requires_grad=True)

    def f(x, w):  # the L2 norm fused over heads of 4 in one call, plain in the other
        return (short_conv(x, w, None, "silu").square().sum()
                + (short_conv(x, w, None, "silu", 4) * torch.arange(8.0, device=x.device)).sum())

    eager = torch.autograd.grad(f(x, w), [x, w])
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x, w), [x, w])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_the_gpu_check_script_passes_and_catches_a_wrong_kernel(monkeypatch):
    """``benchmarks/short_conv_kernel.py``'s checks (what a GPU session runs at each warp count) pass
    on the kernels and fail when the kernels compute something else."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("short_conv_kernel", bench / "short_conv_kernel.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "short_conv_kernel", mod)
    spec.loader.exec_module(mod)
    rows = mod.run_checks(DEVICE, None, (torch.float32,))
    assert len(rows) == 3 and all(r["ok"] for r in rows), rows
    assert all(set(r["errors"]) >= {"y", "dx", "dw"} for r in rows) and "ds" in rows[0]["errors"]
    # at another warp count (the launches rewritten as the GPU session does)
    assert all(r["ok"] and r["warps"] == 8 for r in mod.run_checks(DEVICE, 8, (torch.float32,)))
    # on other tiles (the GPU session's --tiles), the launch's tile restored after
    from nlgraph.compilers.kernels import short_conv as op

    before = (op._BT, op._BC)
    assert all(r["ok"] and r["tile"] == [16, 32] for r in mod.run_checks(DEVICE, None, (torch.float32,), (16, 32)))
    assert (op._BT, op._BC) == before
    with pytest.raises(Exception, match="powers of two"):
        mod.parse_tile("48x64")
    # a reference with its taps rotated by one: every check fails
    real = mod.reference
    monkeypatch.setattr(mod, "reference", lambda x, w, s, silu, l2=None: real(x, w.roll(1, dims=1), s, silu, l2))
    assert not any(r["ok"] for r in mod.run_checks(DEVICE, None, (torch.float32,)))


def test_the_tile_variable_is_parsed_and_a_bad_one_is_one_clear_error(monkeypatch):
    from nlgraph.compilers.kernels import short_conv as op

    assert op._tile(None) == op.DEFAULT_TILE == (64, 128)
    assert op._tile("128x32") == (128, 32) and op._tile("16X512") == (16, 512)
    for bad in ("64", "48x64", "8x64", "1024x16", "256x256", "axb"):
        assert "NLGRAPH_CONV_TILE" in op._tile(bad), bad
    monkeypatch.setattr(op, "_TILE", op._tile("48x64"))
    with pytest.raises(NLGraphError, match="TOKENSxCHANNELS") as err:
        op.short_conv(torch.zeros(1, 4, 8), torch.zeros(8, 4))
    assert err.value.path == "NLGRAPH_CONV_TILE"


def test_a_bad_weight_gradient_layout_is_one_clear_error(monkeypatch):
    from nlgraph.compilers.kernels import short_conv as op

    monkeypatch.setattr(op, "_DW", "fast")
    x = torch.zeros(1, 4, 8, device=DEVICE, requires_grad=True)
    y = op.short_conv(x, torch.zeros(8, 4, device=DEVICE))
    with pytest.raises(NLGraphError, match="rows, inner, atomic") as err:
        y.sum().backward()
    assert err.value.path == "NLGRAPH_CONV_DW"


def test_the_gpu_script_picks_the_fastest_tile_that_passed():
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    spec = importlib.util.spec_from_file_location("short_conv_kernel_pick", bench / "short_conv_kernel.py")
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(bench))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    res = {"checks": [{"tile": [128, 64], "ok": False}, {"tile": [32, 128], "ok": True}, {"tile": None, "ok": True}],
           "tile_timings": [{"tile": [64, 64], "fwd_gpu_ms": 0.02, "bwd_gpu_ms": 0.05},
                            {"tile": [128, 64], "fwd_gpu_ms": 0.01, "bwd_gpu_ms": 0.01},  # fastest, but failed
                            {"tile": [32, 128], "fwd_gpu_ms": 0.015, "bwd_gpu_ms": 0.04},
                            {"tile": [16, 512], "error": "out of resources"}]}
    assert mod.best_tile(res) == "32x128"
    assert mod.best_tile({"checks": [], "tile_timings": []}) == "64x128"  # short_conv.DEFAULT_TILE
