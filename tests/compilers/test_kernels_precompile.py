"""The parallel first compile (``compilers/kernels/_load.py: precompile``): each Triton op hands it
a dry run of each pass, and that dry run records every kernel the pass launches, launching none.

The compile itself (Triton's ``AsyncCompileMode`` in threads) needs a GPU and is checked there by
``benchmarks/compile_check.py`` (docs/benchmarks.md); here the kernels run in Triton's interpreter,
where ``precompile`` does nothing, so the tests capture the dry runs the ops pass it and record them.
"""

import pytest
import torch

from triton_interp import interpreter_while_testing  # noqa: E402, F401  (sets up triton; the fixture)

from nlgraph.compilers.kernels import _load, short_conv  # noqa: E402
from nlgraph.compilers.kernels import chunk_delta_rule, chunk_linear_attention  # noqa: E402
from nlgraph.compilers.kernels.mlp_memory import chunk_mlp_memory, random_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpreter_while_testing")

# on a GPU machine the kernels run there (the interpreter only runs without CUDA), at a head width
# the CUDA kernels are checked at (the MLP memory's wrapper refuses 16-wide tiles on CUDA)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = 32 if DEVICE == "cuda" else 16


@pytest.fixture
def dry_runs(monkeypatch):
    """The (key, dry run) pairs the ops hand ``precompile`` while the test runs them."""
    seen: list = []
    monkeypatch.setattr(_load, "precompile", lambda key, run, device: seen.append((key, run)))
    return seen


def _recorded(seen) -> dict:
    """Each pass's launches (a pass seen twice must record the same ones)."""
    out: dict = {}
    for key, run in seen:
        names = [name for name, *_ in _load._record(run)]
        assert out.setdefault(key[1], names) == names
    return out


def _qkv(b=1, t=40, h=2, d=D, grad=True):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, t, h, d, generator=gen).to(DEVICE).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("decay", [None, "head", "channel"])
def test_delta_rule_passes_record_their_kernels(dry_runs, decay):
    q, k, v = _qkv()
    beta = torch.rand(1, 40, 2, device=DEVICE).requires_grad_()
    g = {None: None, "head": -torch.rand(1, 40, 2, device=DEVICE),
         "channel": -torch.rand(1, 40, 2, D, device=DEVICE)}[decay]
    o, _ = chunk_delta_rule(q, k, v, beta, g=g, output_final_state=True, scale=1.0, chunk=16)
    o.square().sum().backward()
    got = _recorded(dry_runs)
    if decay == "channel":  # its own kernels, beside the per-head recurrences and LA's output kernel
        # (and LA's chunk-local cumulative sums of the decays, forward and reverse)
        assert got["fwd"] == ["chunk_cumsum", "prepare", "state_fwd", "output_channel"]
        assert got["bwd"] == ["prepare", "state_fwd", "dv_local", "state_bwd", "grads", "chunk_cumsum"]
    else:
        assert got["fwd"] == ["prepare", "state_fwd", "output"]
        assert got["bwd"] == ["prepare", "state_fwd", "dv_local", "state_bwd", "qkw_bwd", "wy_bwd"]


@pytest.mark.parametrize("decay", [None, "channel"])
def test_linear_attention_passes_record_their_kernels(dry_runs, decay):
    q, k, v = _qkv()
    g = None if decay is None else -torch.rand(1, 40, 2, D, device=DEVICE)
    o, _ = chunk_linear_attention(q, k, v, g=g, output_final_state=True, scale=1.0, chunk=16)
    o.square().sum().backward()
    got = _recorded(dry_runs)
    if decay is None:
        assert got["fwd"] == ["state_fwd", "output"]
        assert got["bwd"] == ["state_fwd", "state_bwd", "grads"]
    else:
        assert got["fwd"] == ["chunk_cumsum", "state_fwd", "output_channel"]
        assert got["bwd"] == ["state_fwd", "state_bwd", "grads_channel", "chunk_cumsum"]


@pytest.mark.parametrize("checkpoint", [1, 2])
@pytest.mark.parametrize("split", [0, 1])
def test_mlp_memory_passes_record_their_kernels(dry_runs, checkpoint, split):
    (q, k, v), gates, state = random_inputs(1, 40, 2, D, 32, seed=0)
    leaves = [x.float().to(DEVICE).requires_grad_() for x in (q, k, v, *gates, *state)]
    o, _ = chunk_mlp_memory(*leaves[:6], tuple(leaves[6:]), chunk=16, checkpoint=checkpoint, split=split)
    o.square().sum().backward()
    got = _recorded(dry_runs)
    if split == 0:
        assert got["fwd"] == ["fwd"]
        # every chunk's start kept: the backward kernel alone; checkpoints: each segment forward again
        assert got["bwd"] == (["bwd"] if checkpoint == 1 else ["fwd", "bwd", "fwd", "bwd"])
        return
    # one launch per chunk, one kernel: each loop of launches records its first (the backward's
    # checkpoint segments [2, 3) and [0, 2) each run forward again, then backward)
    assert got["fwd"] == ["fwd_step"]
    assert got["bwd"] == (["bwd_step"] if checkpoint == 1 else ["fwd_step", "bwd_step", "fwd_step", "bwd_step"])


@pytest.mark.parametrize("with_state", [False, True])
def test_short_conv_passes_record_their_kernels(dry_runs, with_state):
    x = torch.randn(2, 20, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 4, device=DEVICE, requires_grad=True)
    s = torch.randn(2, 3, 8, device=DEVICE) if with_state else None
    short_conv.short_conv(x, w, s, "silu").square().sum().backward()
    assert _recorded(dry_runs) == {"fwd": ["fwd"], "bwd": ["da", "dx"]}


def test_dry_runs_leave_the_results_alone(dry_runs):
    """Running the captured dry runs (as precompile does before the real pass) changes nothing."""
    q, k, v = _qkv()
    beta = torch.rand(1, 40, 2, device=DEVICE)
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


class _FailsInThePool:
    """A kernel whose compile, handed to the pool, fails there (a ptxas error, say)."""

    def warmup(self, *args, grid, **kwargs):
        from triton.runtime import _async_compile

        def compile_fn():
            raise RuntimeError("ptxas failed")

        _async_compile.active_mode.get().submit(("bad", id(self)), compile_fn, lambda kernel: None)


CUDA = torch.device("cuda")  # only its type is read: nothing runs on a GPU here


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(_load.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_load, "_DONE", set())
    monkeypatch.setattr(_load, "PRECOMPILE_LOG", [])


def _dry_run(mod, x):
    def run():
        kn = _load.load_kernels(lambda: mod, x, "op", "test")
        kn.a[(1,)](x, 3, K=16)
        kn.b[(2,)](x, 4, K=32)
    return run


def test_precompile_warms_every_recorded_kernel_once_per_key(fresh_log, monkeypatch):
    from types import SimpleNamespace

    calls: list = []
    mod = SimpleNamespace(INTERPRETED=True, kernels=lambda: SimpleNamespace(a=_FakeKernel(calls),
                                                                            b=_FakeKernel(calls)))
    x = torch.zeros(4)
    dry_run = _dry_run(mod, x)
    _load.precompile(("k", 1), dry_run, CUDA)
    _load.precompile(("k", 1), dry_run, CUDA)  # the same key: nothing more
    assert [(len(a), a[1], kw, pool) for a, kw, pool in calls] == [(2, 3, {"K": 16}, True), (2, 4, {"K": 32}, True)]
    # a tensor is recorded as what Triton specializes on, not kept alive
    arg = calls[0][0][0]
    assert not isinstance(arg, torch.Tensor)
    assert (arg.dtype, arg.device, arg.data_ptr(), arg.element_size()) == (x.dtype, x.device, x.data_ptr(), 4)
    assert _load.PRECOMPILE_LOG[0]["launches"] == ["a", "b"] and len(_load.PRECOMPILE_LOG) == 1
    # outside a dry run the namespace is the module's own
    assert isinstance(_load.load_kernels(lambda: mod, x, "op", "test").a, _FakeKernel)
    # a warm-up that raises is one warning, logged, and the key is not tried again
    mod.kernels = lambda: SimpleNamespace(a=_FakeKernel(calls, fail=True), b=_FakeKernel(calls))
    with pytest.warns(RuntimeWarning, match="compile at their launches"):
        _load.precompile(("k", 2), dry_run, CUDA)
    assert "no compiler" in _load.PRECOMPILE_LOG[-1]["error"]
    _load.precompile(("k", 2), dry_run, CUDA)
    assert len(_load.PRECOMPILE_LOG) == 2
    # switched off, off CUDA, or during CUDA-graph capture: nothing
    monkeypatch.setattr(_load, "PRECOMPILE", False)
    _load.precompile(("k", 3), dry_run, CUDA)
    monkeypatch.setattr(_load, "PRECOMPILE", True)
    _load.precompile(("k", 4), dry_run, torch.device("cpu"))
    monkeypatch.setattr(_load.torch.cuda, "is_current_stream_capturing", lambda: True)
    _load.precompile(("k", 5), dry_run, CUDA)
    assert len(_load.PRECOMPILE_LOG) == 2


def test_a_compile_failing_in_the_pool_leaves_later_compiles_alone(fresh_log):
    """Triton leaves its asynchronous mode set when a pool compile fails: precompile clears it, so
    the next precompile (and every later compile in the thread) works, and nothing is warned."""
    from types import SimpleNamespace

    from triton.runtime import _async_compile

    calls: list = []
    mod = SimpleNamespace(INTERPRETED=True, kernels=lambda: SimpleNamespace(a=_FailsInThePool(),
                                                                            b=_FakeKernel(calls)))
    x = torch.zeros(4)
    _load.precompile(("p", 1), _dry_run(mod, x), CUDA)
    assert _async_compile.active_mode.get() is None
    assert "error" not in _load.PRECOMPILE_LOG[-1] and len(calls) == 1
    mod.kernels = lambda: SimpleNamespace(a=_FakeKernel(calls), b=_FakeKernel(calls))
    _load.precompile(("p", 2), _dry_run(mod, x), CUDA)
    assert len(calls) == 3 and "error" not in _load.PRECOMPILE_LOG[-1]


def test_a_dry_run_that_raises_is_left_to_the_real_call(fresh_log):
    def dry_run():
        raise ValueError("bad input")

    _load.precompile(("d", 1), dry_run, CUDA)  # no warning (warnings are errors here), no entry
    assert _load.PRECOMPILE_LOG == []


def test_the_precompile_and_autotune_switches_read_the_shared_words(monkeypatch):
    for value, want in (("off", False), ("yes", True), ("FALSE", False), ("", True), ("maybe", True)):
        monkeypatch.setenv("NLGRAPH_X", value)
        assert _load.switch("NLGRAPH_X", True) is want, value
