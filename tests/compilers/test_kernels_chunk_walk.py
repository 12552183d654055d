"""The mini-batch chunk's DGD recurrence walked in Triton equals its PyTorch loop, the loop equals the
chunked engine's triangular solve, and HOPE run through the kernel equals HOPE's chunked form.

``nlgraph.compilers.kernels.chunk_walk.chunk_walk`` (forward and backward in Triton) is checked
against ``chunk_walk.loop`` run in float64: reads before and after the write (of every row, or of
one slot's rows), the end state and momentum, and the gradients of all nine inputs, with and without
momentum and retention, widths that are not powers of two, several row blocks, and chunks longer
than the backward's checkpoint stride. The loop is checked against ``compilers/chunked.py``'s ``solve_chunk`` (the engine every
chunked form runs). Whole HOPE models (its five stacked DGD memories, retention toward the initial
state, momentum, rolling reads) planned for the kernel equal the ``chunked`` form on logits and every
parameter gradient, eager and under ``torch.compile``. Without CUDA the kernels run in Triton's
interpreter.
"""

import pytest
import torch

from triton_interp import INTERPRET as _INTERPRET  # noqa: E402  (sets up triton first)
from triton_interp import interpreter_while_testing  # noqa: E402, F401  (the module fixture)
from triton_interp import rel as _rel  # noqa: E402
from triton_interp import set_interpret as _set_interpret  # noqa: E402

from nlgraph.compilers import chunked  # noqa: E402
from nlgraph.compilers.kernels import chunk_walk as walk_module  # noqa: E402
from nlgraph.compilers.kernels import dispatch  # noqa: E402
from nlgraph.compilers.kernels.chunk_walk import chunk_walk, loop  # noqa: E402
from nlgraph.errors import NLGraphError  # noqa: E402
from nlgraph.lower import build  # noqa: E402
from nlgraph.runtime import level_form  # noqa: E402
from nlgraph.spec.loader import load_spec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("interpreter_while_testing")


def _args(nn, n, o, i, mom, decay, read, seed=0, readers=None):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return 0.3 * torch.randn(*s, generator=g, dtype=torch.float64)

    def u(*s):
        return torch.rand(*s, generator=g, dtype=torch.float64)

    return dict(w0=r(nn, o, i), s0=r(nn, o, i) if mom else None, x=r(nn, n, i), erase=r(nn, n, i), b=u(nn, n),
                f=r(nn, n, o), alpha=0.5 + 0.5 * u(nn, n) if decay else None, mu=u(nn, n) if mom else None,
                u=r(readers or nn, n, i) if read != "none" else None)


@pytest.mark.parametrize("nn, n, o, i, mom, decay, read, rows", [
    (2, 20, 24, 20, True, True, "before", None),    # everything; widths not powers of two; two checkpoints
    (3, 33, 40, 17, False, True, "after", None),    # no momentum; three checkpoint blocks, the last of one token
    (1, 16, 8, 65, True, False, "none", None),      # a bias column (65), one block exactly
    (2, 5, 130, 40, True, True, "after", None),     # several row blocks (130 rows), a chunk below the stride
    (5, 18, 24, 12, True, True, "before", (2, 4)),  # only rows 2 and 3 read (one slot of a stack)
])
def test_chunk_walk_equals_the_loop(nn, n, o, i, mom, decay, read, rows):
    args = _args(nn, n, o, i, mom, decay, read, readers=None if rows is None else rows[1] - rows[0])
    names = [k for k, v in args.items() if v is not None]
    ref_in = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in args.items()}
    ref = loop(**ref_in, read=read, rows=rows)
    gen = torch.Generator().manual_seed(9)
    cots = [None if t is None else torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ref]
    ref_grads = torch.autograd.grad(sum((t * c).sum() for t, c in zip(ref, cots) if t is not None),
                                    [ref_in[k] for k in names])
    leaves = {k: (v.float().to(DEVICE).requires_grad_() if v is not None else None) for k, v in args.items()}
    out = chunk_walk(**leaves, read=read, rows=rows)
    assert [t is None for t in out] == [t is None for t in ref]
    for a, r in zip(out, ref):
        if r is not None:
            assert a.dtype == torch.float32 and _rel(a, r) < 1e-5
    grads = torch.autograd.grad(sum((t * c.to(DEVICE).float()).sum() for t, c in zip(out, cots) if t is not None),
                                [leaves[k] for k in names])
    for k, a, r in zip(names, grads, ref_grads):
        assert a.dtype == torch.float32 and _rel(a, r) < 1e-5, k


@pytest.mark.parametrize("prefetch, stride, tile", [(False, 16, 2048), (True, 4, 64)])
def test_prefetch_and_checkpoint_stride_leave_the_maths(monkeypatch, prefetch, stride, tile):
    """The tuning switches (``NLGRAPH_WALK_PREFETCH``, ``NLGRAPH_WALK_CHECKPOINT``, the tile) change
    only the order of loads, how much of a chunk the backward walks again and how many row blocks
    share the rows: the same reads, end state and gradients, at a chunk of several checkpoint blocks
    with a short last one; a bad value is one error naming the variable."""
    monkeypatch.setattr(walk_module, "PREFETCH", prefetch)
    monkeypatch.setattr(walk_module, "CHECKPOINT", stride)
    monkeypatch.setattr(walk_module, "TILE", tile)  # 12 rows of 16: one row block, or four
    args = _args(2, 19, 12, 10, True, True, "before", seed=3)
    ref_in = {k: v.clone().requires_grad_() for k, v in args.items()}
    ref = loop(**ref_in, read="before")
    leaves = {k: v.float().to(DEVICE).requires_grad_() for k, v in args.items()}
    out = chunk_walk(**leaves, read="before")
    for a, r in zip(out, ref):
        assert _rel(a, r) < 1e-5
    ref_g = torch.autograd.grad(sum((t * (j + 1)).sum() for j, t in enumerate(ref)), list(ref_in.values()))
    got_g = torch.autograd.grad(sum((t * (j + 1)).sum() for j, t in enumerate(out)), list(leaves.values()))
    for k, a, r in zip(args, got_g, ref_g):
        assert _rel(a, r) < 1e-5, k
    for name, bad in [("NLGRAPH_WALK_CHECKPOINT", "6"), ("NLGRAPH_WALK_PREFETCH", "yes"), ("NLGRAPH_WALK_TILE", "0")]:
        with monkeypatch.context() as env:
            env.setenv(name, bad)
            with pytest.raises(NLGraphError, match=name):
                walk_module._settings()


@pytest.mark.parametrize("mom, decay, before", [(True, True, True), (False, False, False), (True, False, False)])
def test_the_loop_is_the_chunked_engine(mom, decay, before):
    """``loop`` reads and ends where ``solve_chunk`` (the transfer products and the triangular solve)
    does, so the kernel computes the chunked forms' maths."""
    a = _args(3, 12, 6, 5, mom, decay, "before")
    # the engine's gates are [..., n] per leading index, its transfer products built by chunked.transfer
    g = chunked.transfer(a["alpha"], False) if decay else chunked._no_decay(12, (3,), a["x"])
    y = chunked.transfer(a["mu"], False) if mom else None
    sol = chunked.solve_chunk(a["w0"], a["s0"], a["x"], a["erase"], a["b"], a["f"], g, y, False)
    reads, w, s = loop(**a | {"read": "before" if before else "after"})
    torch.testing.assert_close(reads, sol.read(a["u"], before))
    w_ref, s_ref = sol.end()
    torch.testing.assert_close(w, w_ref)
    if mom:
        torch.testing.assert_close(s, s_ref)


def test_chunk_walk_traces_under_compile_fullgraph():
    args = {k: (v.float().to(DEVICE).requires_grad_() if v is not None else None)
            for k, v in _args(2, 9, 12, 10, True, True, "before").items()}

    def f(**kw):
        rd, w, s = chunk_walk(**kw, read="before")
        return rd.square().sum() + w.sum() + s.square().sum()

    keys = [k for k, v in args.items() if v is not None]
    eager = torch.autograd.grad(f(**args), [args[k] for k in keys])
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(**args),
                                   [args[k] for k in keys])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_chunk_walk_refuses_what_it_cannot_take():
    a = {k: (v.to(DEVICE) if v is not None else None) for k, v in _args(1, 4, 4, 4, True, False, "none").items()}
    with pytest.raises(NLGraphError, match="chunk_walk: .*float64"):
        chunk_walk(**a)
    f32 = {k: (v.float() if v is not None else None) for k, v in a.items()}
    with pytest.raises(NLGraphError, match="chunk_walk: momentum needs both"):
        chunk_walk(**f32 | {"mu": None})
    with pytest.raises(NLGraphError, match="chunk_walk: read='before' without queries"):
        chunk_walk(**f32, read="before")
    with pytest.raises(NLGraphError, match="chunk_walk: read must be one of"):
        chunk_walk(**f32, read="later")
    with pytest.raises(NLGraphError, match="the reading rows must lie in the leading axis"):
        chunk_walk(**f32 | {"u": f32["x"]}, read="after", rows=(0, 2))
    wide = _args(1, 2, 4, walk_module.MAX_IN + 1, False, False, "none")
    with pytest.raises(NLGraphError, match=f"rows up to {walk_module.MAX_IN}"):
        chunk_walk(**{k: (v.float().to(DEVICE) if v is not None else None) for k, v in wide.items()})


# --------------------------------------------------------------------------- HOPE through the kernel

#: HOPE at toy widths: 2 heads of 8, Titans chunk 4, the in-context CMS's fastest period 8, so 24
#: tokens are three segments of two chunks each
TINY = ["vars.d_model=16", "vars.heads=2", "vars.layers=1", "vars.chunk=4", "levels.cms.levels.0.frequency=8"]
VARIANTS = {
    "hope": [],
    # no momentum, the erase through a decayed state (decay, toward zero), read after the write
    "no_momentum_decay": ["levels.titans.optimizer.momentum=null", "levels.titans.retention.kind=decay",
                          "levels.titans.retention.toward=zero", "levels.titans.read=after_write"],
    # a chunk of 20 (two checkpoint blocks of the backward), biases in every memory
    "long_chunk_bias": ["vars.chunk=20", "levels.cms.levels.0.frequency=20", "levels.titans.memory.bias=true",
                        "levels.titans.adaptive.k.bias=true"],
}


@pytest.fixture
def walk_on(monkeypatch):
    """The kernels on (interpreted without CUDA), the chunk walk switched on for CUDA."""
    old = _set_interpret("1") if _INTERPRET else None
    dispatch.set_kernels("interpret" if _INTERPRET else "auto")
    monkeypatch.setattr(dispatch, "CHUNK_WALK_ON_GPU", True)
    yield
    dispatch.set_kernels(None)
    if _INTERPRET:
        _set_interpret(old)


@pytest.fixture
def walk_calls(walk_on, monkeypatch):
    """:func:`walk_on`, counting the wrapper's calls (eager only: a compiled ``scan`` refuses the
    spy's side effect)."""
    count = {"n": 0}
    real = walk_module.chunk_walk

    def spy(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(walk_module, "chunk_walk", spy)
    return count


def _pair(overrides):
    spec = load_spec("hope", TINY + overrides)
    torch.manual_seed(0)
    ref = build(spec, forms={"titans": "chunked"}).to(DEVICE)
    model = build(spec).to(DEVICE)
    model.load_state_dict(ref.state_dict())
    return ref, model


def _walked_step(model, tokens):
    """:func:`_step`, and whether the kernel op ran, forward and backward (seen by the profiler: a
    spy that counts calls would be a side effect inside a compiled ``scan``, which Dynamo refuses)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = _step(model, tokens)
    names = {e.name for e in prof.events()}
    return out, {"nlgraph::chunk_walk_fwd", "nlgraph::chunk_walk_bwd"} <= names


def _step(model, tokens):
    logits = model(tokens)
    (logits.float().logsumexp(-1).mean() + 0.1 * logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", [n if n == "hope" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(VARIANTS)])  # the op-level tests cover the variants
def test_hope_through_the_chunk_walk_equals_the_chunked_form(name, walk_calls):
    ref, model = _pair(VARIANTS[name])
    assert level_form(model.spec.levels["titans"], device=DEVICE) == "triton"
    tokens = torch.randint(0, 256, (2, 24 if name != "long_chunk_bias" else 40),
                           generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y_ref, g_ref = _step(ref, tokens)
    assert walk_calls["n"] == 0
    y, g = _step(model, tokens)
    assert walk_calls["n"] > 0
    assert _rel(y, y_ref) < 1e-5
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-4, k


def test_hope_through_the_chunk_walk_compiles(walk_on):
    """The model's blocks compiled (``fullgraph``, the chunk loop a ``scan``) equal eager chunked."""
    torch._dynamo.reset()  # the blocks' code objects were compiled for the other models of this process
    ref, model = _pair(["levels.cms.levels.0.frequency=24"])  # one segment: six chunks, scanned
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y_ref, g_ref = _step(ref, tokens)
    model.compile_blocks(backend="aot_eager")
    (y, g), ran = _walked_step(model, tokens)
    assert ran
    assert _rel(y, y_ref) < 1e-5
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-4, k


def test_the_plan_gives_hope_the_chunk_walk_where_it_runs(monkeypatch):
    """CUDA plans give the walk chunks up to ``CHUNK_WALK_AUTO_CHUNK`` tokens by default (it trained
    HOPE faster than the triangular solve on an H100 at 16, slower at 256), every chunk with
    ``NLGRAPH_CHUNK_WALK_GPU=1``, none with ``0``, and say why where they keep ``chunked``; a level
    the walk does not take (plain gd) is not handed to it. CPU plans under ``interpret`` walk any chunk."""
    from nlgraph.compilers.kernels.forms import why_not_memory
    from nlgraph.levels.run import periods
    from nlgraph.spec.loader import load_level

    level = load_spec("hope", TINY).levels["titans"]
    large = load_spec("hope_large_chunk", ["vars.d_model=16", "vars.heads=2"]).levels["titans"]
    assert periods(level)[1] <= dispatch.CHUNK_WALK_AUTO_CHUNK < periods(large)[1]
    assert dispatch.why_no_chunk_walk(level) is None and dispatch.why_no_chunk_walk(large) is None
    monkeypatch.setattr(dispatch, "CHUNK_WALK_ON_GPU", None)  # the default
    assert level_form(level, device="cuda") == "triton"
    assert level_form(large, device="cuda") == "chunked"
    assert "gradient chunks of 256 tokens" in dispatch.why_no_chunk_walk_on_cuda(large)
    assert "NLGRAPH_CHUNK_WALK_GPU=1" in why_not_memory(large, device="cuda")
    monkeypatch.setattr(dispatch, "CHUNK_WALK_ON_GPU", False)
    assert level_form(level, device="cuda") == "chunked"
    assert "NLGRAPH_CHUNK_WALK_GPU=0" in dispatch.why_no_chunk_walk_on_cuda(level)
    monkeypatch.setattr(dispatch, "CHUNK_WALK_ON_GPU", True)
    assert level_form(level, device="cuda") == "triton"
    assert level_form(large, device="cuda") == "triton"
    gd = load_level({"memory": {"kind": "mlp", "heads": 2}, "objective": {"kind": "l2"},
                     "optimizer": {"kind": "gd", "lr": 0.1}, "gradient_point": {"chunk": 8}, "frequency": 1})
    assert "gd optimizer" in dispatch.why_no_chunk_walk(gd)


@pytest.mark.parametrize("slot", [0, 2])
@pytest.mark.parametrize("origin, before", [(True, True), (False, False)])
def test_one_slot_reads_inside_the_stacked_walk(slot, origin, before):
    """``_walked`` with ``slot``: every slot's end state and one slot's reads equal ``solve_chunk``
    on the stack, read at that slot (its rows, its ``W_0``), the first layer's input shared."""
    g = torch.Generator().manual_seed(7)

    def r(*s):
        return 0.3 * torch.randn(*s, generator=g).to(DEVICE)

    def uni(*s):
        return torch.rand(*s, generator=g).to(DEVICE)

    S, B, H, n, o, i = 3, 2, 2, 6, 5, 4
    w0, s0, o0 = r(S, B, H, o, i), r(S, B, H, o, i), (r(S, B, H, o, i) if origin else None)
    x = r(B, H, n, i)  # shared by the slots, as the first layer's input
    b, f = uni(S, B, H, n), r(S, B, H, n, o)
    alpha, mu = 0.5 + 0.5 * uni(B, H, n), uni(B, H, n)
    u = r(B, H, n, i)
    sol = chunked.solve_chunk(w0, s0, x, x, b, f, chunked.transfer(alpha, False), chunked.transfer(mu, False), False,
                              o0)
    reads, w, s = chunked._walked(chunk_walk, w0, s0, x, x, b, f, alpha, mu, o0, u=u, before=before, slot=slot)
    w_ref, s_ref = sol.end()
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reads, sol.pick(slot).read(u, before), rtol=1e-5, atol=1e-6)


def test_layers_wider_than_the_kernel_keep_the_chunked_solve(walk_calls):
    """A memory layer wider than the kernel's rows (with its bias column) is no error: the level's
    chunks are solved in PyTorch, as before the kernel."""
    spec_over = ["vars.d_model=256", "vars.heads=1", "vars.chunk=2", "levels.cms.levels.0.frequency=2"]
    ref, model = _pair(spec_over)
    assert walk_module.MAX_IN < 512  # the hidden layer's input is 2 × 256 wide
    tokens = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    y_ref, _ = _step(ref, tokens)
    y, _ = _step(model, tokens)
    assert walk_calls["n"] == 0
    torch.testing.assert_close(y, y_ref)
    # the plan says so where it knows the head dim
    level = ref.spec.levels["titans"]
    assert level_form(level, device=DEVICE, head_dim=256) == "chunked"
    assert level_form(level, device=DEVICE, head_dim=64) == "triton"
    assert "wider than the chunk walk's rows" in dispatch.why_chunk_walk_too_wide(level, 256)


@pytest.mark.slow
@pytest.mark.parametrize("period", [8, 64])
def test_hope_through_the_chunk_walk_compiles_with_inductor(period, walk_on):
    """Inductor around the op, as on a GPU (minutes interpreted), chunks of 8 over 64 tokens:
    segments of one chunk each, as the shipped specs' in-context CMS cuts them, or one segment of
    eight chunks, whose loop is a ``scan``."""
    torch._dynamo.reset()  # the blocks' code objects were compiled for the other models of this process
    ref, model = _pair(["vars.chunk=8", f"levels.cms.levels.0.frequency={period}"])
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y_ref, g_ref = _step(ref, tokens)
    model.compile_blocks()
    (y, g), ran = _walked_step(model, tokens)
    assert ran
    assert _rel(y, y_ref) < 1e-5
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-4, k


def test_reads_take_the_autocast_dtype_as_the_chunked_reads_do():
    """Under autocast the chunked form's reads are matmuls in the autocast dtype; the walk's reads
    (float32 from the kernel) are cast to it, so the memory's next layer sees the same dtype."""
    g = torch.Generator().manual_seed(8)
    w0, x, f = (0.3 * torch.randn(*s, generator=g).to(DEVICE) for s in ((2, 3, 4), (2, 5, 4), (2, 5, 3)))
    b = torch.rand(2, 5, generator=g).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        reads, w, _ = chunked._walked(chunk_walk, w0, None, x, x, b, f, None, None, None, u=x)
    assert reads.dtype == torch.bfloat16 and w.dtype == torch.float32
    reads, _, _ = chunked._walked(chunk_walk, w0, None, x, x, b, f, None, None, None, u=x)
    assert reads.dtype == torch.float32


def test_hope_level_through_the_walk_stacks_its_slots_once_per_call(walk_calls, hope_level_copies):
    """The walk's end states are views of its flat ``[S·B·H, o, i]`` outputs: the next chunk (and the
    level's next call) takes them as the stack they are, with no copy kept for the backward
    (``tests/levels/test_chunked.py`` checks the same of the chunked form)."""
    first, second = hope_level_copies("triton", DEVICE)
    assert walk_calls["n"] > 0 and first > 0  # the first call stacks W_0 and M_0 once
    assert second == 0  # four more chunks, and nothing stacked again
