"""The Triton short convolution equals PyTorch's depthwise ``conv1d`` (with the stream's activation).

``nlgraph.compilers.kernels.short_conv`` (forward and backward in Triton, float32 accumulation) is
checked against ``F.conv1d`` on ``cat(state, x)`` in float64: outputs and the gradients of the input,
the weight and the state, with and without a state, SiLU or identity, a token block cut short and a
sequence shorter than the kernel, through both backwards (``NLGRAPH_CONV_BWD``: split and fused). A ``Stream`` fed in segments gives one pass's output through the
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


@pytest.mark.parametrize("b, t, c, k, act, with_state, dtype, tol", [
    (2, 37, 24, 4, "silu", True, torch.float32, 1e-5),     # partial token block, a state
    (1, 130, 70, 4, "identity", False, torch.float32, 1e-5),  # two token blocks, partial channel block
    (2, 2, 8, 4, "silu", True, torch.float32, 1e-5),       # shorter than the kernel: reads the state
    (3, 65, 16, 2, "silu", False, torch.float16, 2e-3),
    (2, 130, 96, 4, "silu", True, LOW, 1e-2),
])
@pytest.mark.parametrize("bwd", ["split", "fused"])
def test_short_conv_equals_conv1d(b, t, c, k, act, with_state, dtype, tol, bwd, monkeypatch):
    from nlgraph.compilers.kernels import short_conv as op

    monkeypatch.setattr(op, "CONV_BWD", bwd)
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


def test_short_conv_errors_name_the_argument():
    x = torch.randn(1, 8, 4, device=DEVICE)
    with pytest.raises(NLGraphError, match="short_conv.act"):
        short_conv(x, torch.randn(4, 4, device=DEVICE), None, "relu")
    with pytest.raises(NLGraphError, match="short_conv.state"):
        short_conv(x, torch.randn(4, 4, device=DEVICE), torch.randn(1, 2, 4, device=DEVICE))


def test_stream_runs_the_kernel_and_streams_in_segments(monkeypatch):
    """A Stream with a conv and SiLU takes the kernel (a spy counts it), equals the PyTorch path,
    and two segments chained through the state equal one pass."""
    from nlgraph.compilers.kernels import short_conv as mod
    from nlgraph.layers import Stream
    from nlgraph.spec.schema import StreamSpec

    calls = {"n": 0}
    real = mod._fwd_op

    def spy(*a):
        calls["n"] += 1
        return real(*a)

    monkeypatch.setattr(mod, "_fwd_op", spy)
    torch.manual_seed(0)
    stream = Stream(StreamSpec(conv=4, feature_map="silu", norm="l2"), 12, 2, 4).to(DEVICE)
    x = torch.randn(2, 21, 12, device=DEVICE)
    y, _ = stream(x)
    assert calls["n"] == 1
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

    def f(x, w):
        return short_conv(x, w, None, "silu").square().sum()

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
    assert len(rows) == 2 and all(r["ok"] for r in rows), rows
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
    monkeypatch.setattr(mod, "reference", lambda x, w, s, silu: real(x, w.roll(1, dims=1), s, silu))
    assert not any(r["ok"] for r in mod.run_checks(DEVICE, None, (torch.float32,)))


def test_a_bad_backward_choice_is_one_clear_error(monkeypatch):
    from nlgraph.compilers.kernels import short_conv as op

    monkeypatch.setattr(op, "CONV_BWD", "fast")
    x = torch.randn(1, 8, 4, device=DEVICE)
    with pytest.raises(NLGraphError, match="NLGRAPH_CONV_BWD"):
        short_conv(x, torch.randn(4, 4, device=DEVICE))


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
