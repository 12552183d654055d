"""The parallel first compile (``compilers/kernels/_load.py: precompile``): each Triton op hands it
a dry run of each pass, and that dry run records every kernel the pass launches, launching none.

The compile itself (Triton's ``AsyncCompileMode`` in threads) needs a GPU and is checked there by
``benchmarks/compile_check.py`` (docs/benchmarks.md); here the kernels run in Triton's interpreter,
where ``precompile`` does nothing, so the tests capture the dry runs the ops pass it and record them.
"""

import pytest
import torch

from triton_interp import interpreter_while_testing  # noqa: E402, F401  (sets up triton; the fixture)

from nlgraph.compilers.kernels import _load, delta_rule, linear_attention, mlp_memory, short_conv  # noqa: E402
from nlgraph.compilers.kernels import chunk_delta_rule, chunk_linear_attention  # noqa: E402
from nlgraph.compilers.kernels.mlp_memory import chunk_mlp_memory, random_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpreter_while_testing")


@pytest.fixture
def dry_runs(monkeypatch):
    """The (key, dry run) pairs the ops hand ``precompile`` while the test runs them."""
    seen: list = []
    for mod in (delta_rule, linear_attention, mlp_memory, short_conv):
        monkeypatch.setattr(mod, "precompile", lambda key, run: seen.append((key, run)))
    return seen


def _recorded(seen) -> dict:
    return {key[1]: [name for name, *_ in _load._record(run)] for key, run in seen}


def _qkv(b=1, t=40, h=2, d=16, grad=True):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, t, h, d, generator=gen).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("decay", [None, "head", "channel"])
def test_delta_rule_passes_record_their_kernels(dry_runs, decay):
    q, k, v = _qkv()
    beta = torch.rand(1, 40, 2).requires_grad_()
    g = {None: None, "head": -torch.rand(1, 40, 2), "channel": -torch.rand(1, 40, 2, 16)}[decay]
    o, _ = chunk_delta_rule(q, k, v, beta, g=g, output_final_state=True, scale=1.0, chunk=16)
    o.square().sum().backward()
    got = _recorded(dry_runs)
    if decay == "channel":  # its own kernels, beside the per-head recurrences and LA's output kernel
        assert got["fwd"] == ["prepare", "state_fwd", "output_channel"]
        assert got["bwd"] == ["prepare", "state_fwd", "dv_local", "state_bwd", "grads"]
    else:
        assert got["fwd"] == ["prepare", "state_fwd", "output"]
        assert got["bwd"] == ["prepare", "state_fwd", "dv_local", "state_bwd", "qkw_bwd", "wy_bwd"]


@pytest.mark.parametrize("decay", [None, "channel"])
def test_linear_attention_passes_record_their_kernels(dry_runs, decay):
    q, k, v = _qkv()
    g = None if decay is None else -torch.rand(1, 40, 2, 16)
    o, _ = chunk_linear_attention(q, k, v, g=g, output_final_state=True, scale=1.0, chunk=16)
    o.square().sum().backward()
    got = _recorded(dry_runs)
    assert got["fwd"] == ["state_fwd", "output" if decay is None else "output_channel"]
    assert got["bwd"] == ["state_fwd", "state_bwd", "grads" if decay is None else "grads_channel"]


@pytest.mark.parametrize("checkpoint", [1, 2])
def test_mlp_memory_passes_record_their_kernels(dry_runs, checkpoint):
    (q, k, v), gates, state = random_inputs(1, 40, 2, 16, 32, seed=0)
    leaves = [x.float().requires_grad_() for x in (q, k, v, *gates, *state)]
    o, _ = chunk_mlp_memory(*leaves[:6], tuple(leaves[6:]), chunk=16, checkpoint=checkpoint)
    o.square().sum().backward()
    got = _recorded(dry_runs)
    assert got["fwd"] == ["fwd"]
    # every chunk's start kept: the backward kernel alone; checkpoints: each segment forward again
    assert got["bwd"] == (["bwd"] if checkpoint == 1 else ["fwd", "bwd", "fwd", "bwd"])


@pytest.mark.parametrize("with_state", [False, True])
def test_short_conv_passes_record_their_kernels(dry_runs, with_state):
    x = torch.randn(2, 20, 8, requires_grad=True)
    w = torch.randn(8, 4, requires_grad=True)
    s = torch.randn(2, 3, 8) if with_state else None
    short_conv.short_conv(x, w, s, "silu").square().sum().backward()
    assert _recorded(dry_runs) == {"fwd": ["fwd"], "bwd": ["da", "dx"]}


def test_dry_runs_leave_the_results_alone(dry_runs):
    """Running the captured dry runs (as precompile does before the real pass) changes nothing."""
    q, k, v = _qkv()
    beta = torch.rand(1, 40, 2)
    first, _ = chunk_delta_rule(q, k, v, beta, scale=1.0, chunk=16)
    _recorded(dry_runs)
    again, _ = chunk_delta_rule(q, k, v, beta, scale=1.0, chunk=16)
    assert torch.equal(first, again)


def test_call_key_follows_dtypes_shapes_and_flags():
    a = torch.zeros(2, 3)
    assert _load.call_key("op", "fwd", (a, None, 1.0, True)) == ("op", "fwd", (torch.float32, "cpu", (2, 3)), None,
                                                                  1.0, True)
    assert _load.call_key("op", "fwd", (a,)) != _load.call_key("op", "fwd", (a.half(),))
    assert _load.call_key("op", "fwd", (a,)) != _load.call_key("op", "fwd", (torch.zeros(2, 4),))


class _FakeKernel:
    def __init__(self, calls, fail=False):
        self.calls, self.fail = calls, fail

    def warmup(self, *args, grid, **kwargs):
        from triton.runtime import _async_compile

        if self.fail:
            raise RuntimeError("no compiler")
        self.calls.append((args, kwargs, _async_compile.active_mode.get() is not None))


def test_precompile_warms_every_recorded_kernel_once_per_key(monkeypatch):
    from types import SimpleNamespace

    from nlgraph.compilers.kernels import _load

    monkeypatch.setattr(_load.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_load.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_load, "_DONE", set())
    monkeypatch.setattr(_load, "PRECOMPILE_LOG", [])
    calls: list = []
    mod = SimpleNamespace(INTERPRETED=True, kernels=lambda: SimpleNamespace(a=_FakeKernel(calls),
                                                                            b=_FakeKernel(calls)))
    x = torch.zeros(1)

    def dry_run():
        kn = _load.load_kernels(lambda: mod, x, "op", "test")
        kn.a[(1,)](x, 3, K=16)
        kn.b[(2,)](x, 4, K=32)

    _load.precompile(("k", 1), dry_run)
    _load.precompile(("k", 1), dry_run)  # the same key: nothing more
    assert calls == [((x, 3), {"K": 16}, True), ((x, 4), {"K": 32}, True)]
    assert _load.PRECOMPILE_LOG[0]["launches"] == ["a", "b"] and len(_load.PRECOMPILE_LOG) == 1
    # outside a dry run the namespace is the module's own
    assert isinstance(_load.load_kernels(lambda: mod, x, "op", "test").a, _FakeKernel)
    # a failing compile is one warning, logged, and the key is not tried again
    mod.kernels = lambda: SimpleNamespace(a=_FakeKernel(calls, fail=True), b=_FakeKernel(calls))
    with pytest.warns(RuntimeWarning, match="compile at their launches"):
        _load.precompile(("k", 2), dry_run)
    assert "no compiler" in _load.PRECOMPILE_LOG[-1]["error"]
    _load.precompile(("k", 2), dry_run)
    assert len(_load.PRECOMPILE_LOG) == 2
    # switched off, or during CUDA-graph capture: nothing
    monkeypatch.setattr(_load, "PRECOMPILE", False)
    _load.precompile(("k", 3), dry_run)
    monkeypatch.setattr(_load, "PRECOMPILE", True)
    monkeypatch.setattr(_load.torch.cuda, "is_current_stream_capturing", lambda: True)
    _load.precompile(("k", 4), dry_run)
    assert len(_load.PRECOMPILE_LOG) == 2
