"""The online form's state recurrence in Triton equals its PyTorch loop, and levels routed to it equal
the per-token reference.

``nlgraph.compilers.kernels.recurrence.online_recurrence`` (forward and backward in Triton) is checked
against ``recurrence.loop`` run in float64: every chunk's start state, ``E``, the final state, and the
gradients of all ten inputs, with and without momentum and the state terms ``P1`` / ``P2``, state
widths that are not powers of two and several row blocks. Linear levels that neither the delta-rule
nor the linear-attention kernel takes (momentum, DGD with momentum) run the ``triton`` form through
it and equal the per-token reference on outputs, final state and gradients; the op traces under
``torch.compile(fullgraph=True)``. Without CUDA the kernels run in Triton's interpreter.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_interp import INTERPRET as _INTERPRET  # noqa: E402  (sets up triton first)
from triton_interp import interpreter_while_testing  # noqa: E402, F401  (the module fixture)
from triton_interp import rel as _rel  # noqa: E402
from triton_interp import set_interpret as _set_interpret  # noqa: E402

from nlgraph.compilers.kernels import dispatch  # noqa: E402
from nlgraph.compilers.kernels import recurrence as rec_module  # noqa: E402
from nlgraph.compilers.kernels.recurrence import loop, online_recurrence  # noqa: E402
from nlgraph.runtime import level_form, run_level  # noqa: E402
from nlgraph.spec.loader import load_level  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("interpreter_while_testing")


def _args(b, h, c, n, o, i, mom, p1, p2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return 0.3 * torch.randn(*s, generator=g, dtype=torch.float64)

    def u(*s):
        return torch.rand(*s, generator=g, dtype=torch.float64)

    return dict(w0=r(b, h, o, i), s0=r(b, h, o, i) if mom else None, u=r(b, h, c, n, o), xt=r(b, h, c, n, i),
                ge=0.5 + 0.5 * u(b, h, c), p1=r(b, h, c, n, i) if p1 else None, yt=r(b, h, c, n, i) if mom else None,
                ze=r(b, h, c) if mom else None, ye=u(b, h, c) if mom else None,
                p2=r(b, h, c, n, i) if mom and p2 else None)


@pytest.mark.parametrize("b, h, c, n, o, i, mom, p1, p2", [
    (1, 2, 3, 16, 24, 20, True, True, True),    # everything, widths not powers of two
    (2, 1, 4, 32, 64, 64, True, False, False),  # momentum, an update that does not read the state
    (1, 1, 3, 16, 40, 16, False, True, False),  # two row blocks of 32 (O = 40)
    (1, 2, 2, 64, 16, 32, False, False, False),
])
def test_online_recurrence_equals_the_loop(b, h, c, n, o, i, mom, p1, p2):
    args = _args(b, h, c, n, o, i, mom, p1, p2)
    names = [k for k, v in args.items() if v is not None]
    ref_leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in args.items()}
    ref = loop(**ref_leaves)
    gen = torch.Generator().manual_seed(9)
    cots = [None if t is None else torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ref]
    ref_grads = torch.autograd.grad(sum((t * ct).sum() for t, ct in zip(ref, cots) if t is not None),
                                    [ref_leaves[k] for k in names])
    leaves = {k: (v.detach().float().to(DEVICE).requires_grad_() if v is not None else None) for k, v in args.items()}
    out = online_recurrence(**leaves)
    assert all((a is None) == (r is None) for a, r in zip(out, ref))
    for a, r in zip(out, ref):
        if r is not None:
            assert a.dtype == torch.float32 and _rel(a, r) < 1e-5
    grads = torch.autograd.grad(sum((t * ct.to(DEVICE).float()).sum() for t, ct in zip(out, cots) if t is not None),
                                [leaves[k] for k in names])
    for k, a, r in zip(names, grads, ref_grads):
        assert _rel(a, r) < 1e-5, k


def test_online_recurrence_traces_under_compile_fullgraph():
    args = {k: (v.float().to(DEVICE).requires_grad_() if v is not None else None)
            for k, v in _args(1, 1, 3, 16, 16, 16, True, True, True).items()}

    def f(**kw):
        ws, ss, es, wt, st = online_recurrence(**kw)
        return ws.square().sum() + ss.sum() + es.square().sum() + wt.sum() + st.square().sum()

    keys = [k for k, v in args.items() if v is not None]
    eager = torch.autograd.grad(f(**args), [args[k] for k in keys])
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(**args), [args[k] for k in keys])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


LEVELS = {
    "momentum_weight_decay": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
                              "optimizer": {"kind": "momentum", "lr": {"act": "sigmoid"}, "momentum": {"act": "sigmoid"}},
                              "retention": {"kind": "weight_decay", "gate": {"act": "sigmoid"}}, "frequency": 1},
    "dgd_momentum_toward_initial": {
        "memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
        "optimizer": {"kind": "dgd", "form": "proximal", "lr": {"act": "sigmoid"}, "momentum": {"act": "sigmoid"}},
        "retention": {"kind": "decay", "gate": {"act": "sigmoid"}, "toward": "initial"}, "read": "before_write",
        "frequency": 1},
    "dot_momentum": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "dot"},
                     "optimizer": {"kind": "momentum", "lr": {"act": "sigmoid"}, "momentum": {"act": "sigmoid"}},
                     "frequency": 1},
}


@pytest.fixture
def rec_calls(monkeypatch):
    old = _set_interpret("1") if _INTERPRET else None
    dispatch.set_kernels("interpret" if _INTERPRET else "auto")
    monkeypatch.setattr(dispatch, "ONLINE_RECURRENCE_ON_GPU", True)
    count = {"n": 0}
    real = rec_module.online_recurrence

    def spy(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(rec_module, "online_recurrence", spy)
    yield count
    dispatch.set_kernels(None)
    if _INTERPRET:
        _set_interpret(old)


@pytest.mark.parametrize("reads", ["pytorch", "kernel"])
@pytest.mark.parametrize("name", sorted(LEVELS))
def test_levels_without_a_kernel_of_their_own_run_the_recurrence_kernel(name, reads, rec_calls, monkeypatch):
    """70 tokens in chunks of 16: four full chunks through the kernel and a partial one in PyTorch;
    outputs, final state and every gradient (gates, initial memory and momentum) equal the reference,
    with the reads, the chunk systems and the transfer products in PyTorch or in their own kernels
    (``NLGRAPH_RECURRENCE_READS``, ``NLGRAPH_RECURRENCE_PREPARE``, ``NLGRAPH_RECURRENCE_GATES``)."""
    for switch in ("READS", "PREPARE", "GATES"):
        monkeypatch.setattr(rec_module, switch, reads)
    read_calls, prepare_calls, gate_calls = [], [], []
    real_reads, real_prepare, real_gates = rec_module.online_reads, rec_module.online_prepare, rec_module.online_gates

    def gates_spy(*a, **k):
        gate_calls.append(1)
        return real_gates(*a, **k)

    monkeypatch.setattr(rec_module, "online_gates", gates_spy)

    def reads_spy(*a, **k):
        read_calls.append(1)
        return real_reads(*a, **k)

    def prepare_spy(*a, **k):
        prepare_calls.append(1)
        return real_prepare(*a, **k)

    monkeypatch.setattr(rec_module, "online_reads", reads_spy)
    monkeypatch.setattr(rec_module, "online_prepare", prepare_spy)
    spec = load_level(LEVELS[name])
    assert dispatch.why_no_online_kernel(spec) is not None and dispatch.why_no_online_linear_attention(spec) is not None
    assert level_form(spec, device=DEVICE) == "triton"
    g = torch.Generator().manual_seed(3)
    b, t, h, d = 2, 70, 2, 8

    def rnd(*s):
        return torch.randn(*s, generator=g).to(DEVICE)

    x = dict(keys=torch.nn.functional.normalize(rnd(b, t, h, d), dim=-1), values=rnd(b, t, h, d),
             queries=rnd(b, t, h, d), lr=torch.rand(b, t, h, generator=g).to(DEVICE),
             momentum=torch.rand(b, t, h, generator=g).to(DEVICE))
    if spec.retention is not None:
        x["retention"] = (0.5 + 0.5 * torch.rand(b, t, h, generator=g)).to(DEVICE)
    s0 = {"memory.w0": 0.3 * rnd(b, h, d, d), "optimizer.memory.momentum.w0": 0.1 * rnd(b, h, d, d),
          "position": torch.zeros((), dtype=torch.int64, device=DEVICE)}
    results = {}
    for form in ("triton", "reference"):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        state = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in s0.items()}
        y, st = run_level(spec, form=form, chunk_size=16, state=state, **leaves)
        loss = (y * torch.linspace(-1, 1, d, device=DEVICE)).sum() + st["memory.w0"].square().sum() \
            + st["optimizer.memory.momentum.w0"].sum()
        flat = list(leaves.values()) + [state["memory.w0"], state["optimizer.memory.momentum.w0"]]
        results[form] = (y, st, torch.autograd.grad(loss, flat))
    assert rec_calls["n"] == 1
    assert len(read_calls) == (1 if reads == "kernel" else 0)
    # the dot objective's update does not read the state: no system to solve
    assert len(prepare_calls) == (1 if reads == "kernel" and spec.objective.kind != "dot" else 0)
    assert len(gate_calls) == (1 if reads == "kernel" else 0)  # every level here has momentum
    (y, st, gr), (y_ref, st_ref, gr_ref) = results["triton"], results["reference"]
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for k in ("memory.w0", "optimizer.memory.momentum.w0"):
        torch.testing.assert_close(st[k], st_ref[k], rtol=1e-4, atol=1e-4)
    for a, r in zip(gr, gr_ref):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-4)


def test_the_recurrence_kernel_on_cuda_follows_its_switch(monkeypatch):
    """On on CUDA by default since its bfloat16 timing on an H100 (3–5x the PyTorch form);
    ``NLGRAPH_ONLINE_RECURRENCE_GPU=0`` keeps the PyTorch form."""
    spec = load_level(LEVELS["momentum_weight_decay"])
    if "NLGRAPH_ONLINE_RECURRENCE_GPU" not in os.environ:
        assert dispatch.ONLINE_RECURRENCE_ON_GPU is True
    monkeypatch.setattr(dispatch, "ONLINE_RECURRENCE_ON_GPU", False)
    assert level_form(spec, device="cuda") == "chunked"
    monkeypatch.setattr(dispatch, "ONLINE_RECURRENCE_ON_GPU", True)
    assert level_form(spec, device="cuda") == "triton"


def test_online_recurrence_refuses_what_it_cannot_take(rec_calls):
    """float64 operands (the loop's) and sizes past the kernel's are one clear error each; the plan
    keeps the PyTorch form for keys wider than the kernel holds."""
    from nlgraph.errors import NLGraphError

    args = _args(1, 1, 2, 16, 16, 16, False, True, False)
    with pytest.raises(NLGraphError, match="online_recurrence: .*float64|online_recurrence: .*one dtype"):
        online_recurrence(**{k: v.to(DEVICE) if v is not None else None for k, v in args.items()})
    args = {k: v.float().to(DEVICE) if v is not None else None for k, v in _args(1, 1, 2, 8, 16, 16, False, True, False).items()}
    with pytest.raises(NLGraphError, match="chunk 8"):
        online_recurrence(**args)
    spec = load_level(LEVELS["momentum_weight_decay"])
    assert level_form(spec, device=DEVICE, head_dim=dispatch.RECURRENCE_MAX_KEY) == "triton"
    assert level_form(spec, device=DEVICE, head_dim=dispatch.RECURRENCE_MAX_KEY + 32) == "chunked"


def test_the_recurrence_takes_its_float32_products_from_the_switch(monkeypatch):
    """Forward and backward launch with ``_load.products``' mode (``NLGRAPH_FP32_PRODUCTS``;
    ``tf32x3`` unset, since its H100 check), and equal the loop under either (the interpreter
    multiplies in float32 whatever the mode)."""
    from nlgraph.compilers.kernels import _load, recurrence

    for mode, want in ((None, "tf32x3"), ("ieee", "ieee"), ("tf32x3", "tf32x3")):
        seen = []

        def spy(dtype, unset="ieee"):
            seen.append(_load.products(dtype, unset))
            return seen[-1]

        monkeypatch.setattr(_load, "FP32_PRODUCTS", mode)
        monkeypatch.setattr(recurrence, "products", spy)
        args = _args(1, 1, 2, 16, 24, 20, True, True, True)
        leaves = {k: (v.float().to(DEVICE).requires_grad_() if v is not None else None) for k, v in args.items()}
        ref = loop(**args)
        out = online_recurrence(**leaves)
        sum(t.sum() for t in out if t is not None).backward()
        assert seen == [want, want]  # the forward's launch, then the backward's
        assert all(_rel(a.detach(), r) < 1e-5 for a, r in zip(out, ref) if r is not None)



def _against_the_loop(args: dict, out_limit: float, grad_limit: float, seed: int = 2, **kernel) -> tuple:
    """The kernel on ``args`` (float32 on DEVICE, ``kernel``: its keyword options) against the float64
    loop: every output within ``out_limit`` and every input's gradient (through random cotangents)
    within ``grad_limit``, relative. Returns the kernel's outputs."""
    names = [k for k, v in args.items() if v is not None]
    ref_in = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in args.items()}
    ref = loop(**ref_in)
    mine = {k: (v.float().to(DEVICE).requires_grad_() if v is not None else None) for k, v in args.items()}
    out = online_recurrence(**mine, **kernel)
    for a, r in zip(out, ref):
        if r is not None:
            assert _rel(a.detach().double().cpu(), r.detach()) < out_limit
    gen = torch.Generator().manual_seed(seed)
    cots = [None if t is None else torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ref]
    want = torch.autograd.grad(sum((t * c).sum() for t, c in zip(ref, cots) if t is not None), [ref_in[k] for k in names])
    got = torch.autograd.grad(sum((t.float() * c.to(DEVICE).float()).sum() for t, c in zip(out, cots) if t is not None),
                              [mine[k] for k in names])
    for name, a, r in zip(names, got, want):
        assert _rel(a.double().cpu(), r) < grad_limit, name
    return out


def _level_under_autocast(monkeypatch, seed: int, record) -> tuple[list, dict]:
    """A momentum level (32 tokens, chunks of 16) run by the ``triton`` form under float16 autocast
    (bfloat16's stand-in: the interpreter multiplies bfloat16 wrongly) and by its float32 reference:
    ``(what record(kwargs) gave at each kernel call, {form: (output, keys' gradient)})``."""
    seen = []
    real = rec_module.online_recurrence

    def spy(*a, **k):
        seen.append(record(k))
        return real(*a, **k)

    monkeypatch.setattr(rec_module, "online_recurrence", spy)
    spec = load_level(LEVELS["momentum_weight_decay"])
    g = torch.Generator().manual_seed(seed)
    b, t, h, d = 1, 32, 2, 16

    def rnd(*s):
        return torch.randn(*s, generator=g).to(DEVICE)

    x = dict(keys=torch.nn.functional.normalize(rnd(b, t, h, d), dim=-1), values=rnd(b, t, h, d),
             queries=rnd(b, t, h, d), lr=torch.rand(b, t, h, generator=g).to(DEVICE),
             momentum=torch.rand(b, t, h, generator=g).to(DEVICE),
             retention=(0.5 + 0.5 * torch.rand(b, t, h, generator=g)).to(DEVICE))
    outs = {}
    for form in ("triton", "reference"):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=form == "triton"):
            y, _ = run_level(spec, form=form, chunk_size=16, **leaves)
        (gk,) = torch.autograd.grad((y.float() * torch.linspace(-1, 1, d, device=DEVICE)).sum(), [leaves["keys"]])
        outs[form] = (y.float(), gk)
    return seen, outs


@pytest.mark.parametrize("mode", ["wide", "input"])
def test_the_recurrence_operands_under_autocast_follow_the_switch(mode, rec_calls, monkeypatch):
    """Under autocast the kernel's ``[n, ·]`` operands are float32 (``wide``, the solve's dtype) or
    autocast's 16-bit dtype (``input``, ``NLGRAPH_RECURRENCE_PRODUCTS``); either way the level equals
    its float32 reference within the 16-bit rounding."""
    from nlgraph.compilers.kernels import recurrence

    monkeypatch.setattr(recurrence, "PRODUCTS", mode)
    seen, outs = _level_under_autocast(monkeypatch, 5, lambda k: k["xt"].dtype)
    assert seen == [torch.float16 if mode == "input" else torch.float32]
    # 6.4e-4 / 6.6e-4 measured either way: autocast's other products dominate the rounding
    assert _rel(outs["triton"][0], outs["reference"][0]) < 5e-3
    assert _rel(outs["triton"][1], outs["reference"][1]) < 5e-3


@pytest.mark.parametrize("sums", ["atomic", "rows"])
def test_the_backward_sums_over_row_blocks_either_way(sums, monkeypatch):
    """Three row blocks (O = 72): the per-chunk inputs' gradients added by every block's program into
    one buffer (``atomic``) or written per block and summed after (``rows``) equal the loop's; under
    deterministic algorithms ``atomic`` takes ``rows``; an unknown value is one clear error."""
    from nlgraph.compilers.kernels import recurrence
    from nlgraph.errors import NLGraphError

    monkeypatch.setattr(recurrence, "SUMS", sums)
    _against_the_loop(_args(1, 2, 3, 16, 72, 24, True, True, True, seed=4), 1e-5, 1e-5)
    assert recurrence._atomic_sums(3) is (sums == "atomic")
    assert recurrence._atomic_sums(1) is False  # one row block: nothing to sum
    torch.use_deterministic_algorithms(True)
    try:
        assert recurrence._atomic_sums(3) is False
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(recurrence, "SUMS", "trees")
    with pytest.raises(NLGraphError, match="NLGRAPH_RECURRENCE_SUMS"):
        recurrence._atomic_sums(3)


@pytest.mark.parametrize("rows, stages", [("16", "1"), ("64", "2")])
def test_the_rows_a_program_holds_follow_the_switch(rows, stages, monkeypatch):
    """``NLGRAPH_RECURRENCE_ROWS`` / ``_STAGES``: at 16 and 64 rows a program (O = 72: five and two
    row blocks) and either pipeline depth the kernel still equals the loop, forward and backward; an
    unknown value is one clear error."""
    from nlgraph.compilers.kernels import recurrence
    from nlgraph.errors import NLGraphError

    monkeypatch.setattr(recurrence, "ROWS", rows)
    monkeypatch.setattr(recurrence, "STAGES", stages)
    assert recurrence._stages() == int(stages)
    assert recurrence._blocks(72, 24) == (int(rows), 32)
    _against_the_loop(_args(1, 1, 2, 16, 72, 24, True, True, True, seed=6), 1e-5, 1e-5)
    monkeypatch.setattr(recurrence, "ROWS", "48")
    with pytest.raises(NLGraphError, match="NLGRAPH_RECURRENCE_ROWS"):
        recurrence._blocks(72, 24)
    monkeypatch.setattr(recurrence, "STAGES", "3")
    with pytest.raises(NLGraphError, match="NLGRAPH_RECURRENCE_STAGES"):
        recurrence._stages()


def test_the_chunk_starts_kept_in_16_bits_equal_the_loop_within_their_rounding():
    """``states=float16`` (bfloat16 on a GPU; the interpreter multiplies bfloat16 wrongly): the chunk
    starts come back in 16 bits, the walk, the errors and the final state stay float32, and every
    output and gradient equals the float64 loop within the starts' rounding."""
    args = _args(1, 2, 3, 16, 40, 24, True, True, True, seed=8)
    out = _against_the_loop(args, 2e-3, 5e-3, states=torch.float16)
    assert out[0].dtype == out[1].dtype == torch.float16
    assert out[2].dtype == out[3].dtype == out[4].dtype == torch.float32
    ref_end = loop(**args)[3]
    assert _rel(out[3].detach().double().cpu(), ref_end) < 1e-5  # the walk itself is float32


@pytest.mark.parametrize("mode", ["float32", "input"])
def test_the_chunk_starts_under_autocast_follow_the_switch(mode, rec_calls, monkeypatch):
    """``NLGRAPH_RECURRENCE_STATES``: under autocast the level asks the kernel for its chunk starts in
    float32 or in autocast's 16-bit dtype, and equals its reference within that rounding either way;
    an unknown value is one clear error."""
    from nlgraph.compilers.kernels import recurrence
    from nlgraph.errors import NLGraphError

    monkeypatch.setattr(recurrence, "STATES", mode)
    seen, outs = _level_under_autocast(monkeypatch, 7, lambda k: k.get("states", torch.float32))
    assert seen == [torch.float16 if mode == "input" else torch.float32]
    assert _rel(outs["triton"][0], outs["reference"][0]) < 5e-3
    assert _rel(outs["triton"][1], outs["reference"][1]) < 5e-3
    monkeypatch.setattr(recurrence, "STATES", "bf16")
    with pytest.raises(NLGraphError, match="NLGRAPH_RECURRENCE_STATES"):
        recurrence.states_dtype(torch.device(DEVICE))


@pytest.mark.parametrize("mom,rows", [(True, "0"), (False, "0"), (True, "32"), (False, "32")])
def test_the_reads_kernel_equals_its_products(mom, rows, monkeypatch):
    """``online_reads`` (one program a chunk) against ``diag(a) q Wᵀ + diag(bz) q Sᵀ − (q kᵀ ⊙ M) E``
    in float64: the output and the gradient of every input, at widths that are not powers of two,
    with the state's 40 rows at once and in loop steps of 32 (the second one cut short:
    ``NLGRAPH_RECURRENCE_READS_ROWS``); it traces under ``torch.compile(fullgraph=True)``; sizes it
    cannot take are one clear error."""
    from nlgraph.compilers.kernels import recurrence
    from nlgraph.compilers.kernels.recurrence import online_reads
    from nlgraph.errors import NLGraphError

    monkeypatch.setattr(recurrence, "READS_ROWS", rows)
    assert recurrence._reads_rows(40) == int(rows)

    g = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    b, h, c, n, o, i = 1, 2, 3, 16, 40, 24
    args = dict(q=r(b, h, c, n, i), k=r(b, h, c, n, i), a=r(b, h, c, n), bz=r(b, h, c, n) if mom else None,
                m=torch.tril(r(b, h, c, n, n)), ws=r(b, h, c, o, i), ss=r(b, h, c, o, i) if mom else None,
                es=r(b, h, c, n, o))

    def products(q, k, a, bz, m, ws, ss, es):
        out = a[..., None] * (q @ ws.mT) - ((q @ k.mT) * m) @ es
        return out + bz[..., None] * (q @ ss.mT) if ss is not None else out

    names = [k for k, v in args.items() if v is not None]
    ref_in = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in args.items()}
    ref = products(**ref_in)
    cot = r(*ref.shape)
    want = torch.autograd.grad((ref * cot).sum(), [ref_in[k] for k in names])
    mine = {k: (v.float().to(DEVICE).requires_grad_() if v is not None else None) for k, v in args.items()}
    out = online_reads(**mine)
    assert _rel(out.detach().double().cpu(), ref.detach()) < 1e-5
    got = torch.autograd.grad((out * cot.float().to(DEVICE)).sum(), [mine[k] for k in names])
    for name, a_, r_ in zip(names, got, want):
        assert _rel(a_.double().cpu(), r_) < 1e-5, name
    compiled = torch.compile(lambda **kw: (online_reads(**kw) * cot.float().to(DEVICE)).sum(), fullgraph=True,
                             backend="aot_eager")
    again = torch.autograd.grad(compiled(**mine), [mine[k] for k in names])
    for a_, b_ in zip(got, again):
        torch.testing.assert_close(a_, b_)
    with pytest.raises(NLGraphError, match="chunk 8"):
        online_reads(**{**mine, "q": mine["q"][..., :8, :], "k": mine["k"][..., :8, :]})


@pytest.mark.parametrize("switch, ask", [("READS", "reads_in_kernel"), ("PREPARE", "prepare_in_kernel")])
def test_the_reads_and_prepare_switches_refuse_an_unknown_value(switch, ask, monkeypatch):
    from nlgraph.errors import NLGraphError

    monkeypatch.setattr(rec_module, switch, "fused")
    with pytest.raises(NLGraphError, match=f"NLGRAPH_RECURRENCE_{switch}"):
        getattr(rec_module, ask)(16, 16, 16)
    monkeypatch.setattr(rec_module, switch, "kernel")
    assert getattr(rec_module, ask)(64, 128, 128) and not getattr(rec_module, ask)(64, 256, 128)


@pytest.mark.parametrize("mom,n,o,i,same", [(True, 16, 40, 24, False), (False, 32, 24, 20, True),
                                            (True, 64, 16, 16, True)])
def test_the_prepare_kernel_equals_the_chunk_solves(mom, n, o, i, same):
    """``online_prepare`` (one program a chunk) against ``compilers.chunked.solve_chunks`` in float64:
    ``P₁``, ``P₂``, ``U`` and the gradient of every input, at widths that are not powers of two, the
    erase its own tensor or the keys themselves (``same``: retention without decay) and chunks of 16,
    32 and 64; it traces under ``torch.compile(fullgraph=True)``; sizes it cannot take are one clear
    error."""
    from nlgraph.compilers.chunked import solve_chunks
    from nlgraph.compilers.kernels.recurrence import online_prepare
    from nlgraph.errors import NLGraphError

    g = torch.Generator().manual_seed(5)

    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    b, h, c = 1, 2, 2
    k = torch.nn.functional.normalize(r(b, h, c, n, i), dim=-1)
    # a transfer mask of products of gates in (0, 1], as Ω is
    mask = torch.rand(b, h, c, n, n, generator=g, dtype=torch.float64)
    args = dict(k=k, erase=k if same else 0.9 * k + 0.1 * r(b, h, c, n, i), coef=torch.rand(b, h, c, n, generator=g,
                dtype=torch.float64), m=mask, g0=0.5 + 0.5 * torch.rand(b, h, c, n, generator=g, dtype=torch.float64),
                z=r(b, h, c, n, scale=0.5) if mom else None, f=r(b, h, c, n, o))
    names = [a for a, v in args.items() if v is not None and not (same and a == "erase")]

    def leaves_of(conv):
        out = {a: (conv(v).requires_grad_() if v is not None else None) for a, v in args.items() if a != "erase"}
        out["erase"] = out["k"] if same else conv(args["erase"]).requires_grad_()
        return out

    ref_in = leaves_of(lambda t: t.clone())
    ref = solve_chunks(ref_in["k"], ref_in["erase"], ref_in["coef"], ref_in["m"], ref_in["g0"], ref_in["z"],
                       ref_in["f"])
    cots = [None if t is None else r(*t.shape) for t in ref]

    def loss(outs):
        return sum((t * ct.to(t.device, t.dtype)).sum() for t, ct in zip(outs, cots) if t is not None)

    want = torch.autograd.grad(loss(ref), [ref_in[a] for a in names])
    mine = leaves_of(lambda t: t.float().to(DEVICE))
    order = ("k", "erase", "coef", "m", "g0", "z", "f")
    out = online_prepare(*(mine[a] for a in order))
    assert (out[1] is None) == (not mom)
    assert out[2].dtype == torch.float32 and out[0].dtype == torch.float32
    for a_, r_ in zip(out, ref):
        if r_ is not None:
            assert _rel(a_.detach().double().cpu(), r_.detach()) < 1e-5
    got = torch.autograd.grad(loss(out), [mine[a] for a in names])
    for name, a_, r_ in zip(names, got, want):
        assert _rel(a_.double().cpu(), r_) < 1e-5, name
    compiled = torch.compile(lambda *xs: loss(online_prepare(*xs)), fullgraph=True, backend="aot_eager")
    again = torch.autograd.grad(compiled(*(mine[a] for a in order)), [mine[a] for a in names])
    for a_, b_ in zip(got, again):
        torch.testing.assert_close(a_, b_)
    with pytest.raises(NLGraphError, match="chunk 8"):
        cut = {a: (v[..., :8, :] if v is not None and v.dim() == 5 else v[..., :8] if v is not None else None)
               for a, v in mine.items()}
        cut["m"] = mine["m"][..., :8, :8]
        online_prepare(*(cut[a] for a in order))


def test_the_prepare_kernel_in_16_bits_stays_within_their_rounding():
    """float16 keys and erase (the interpreter's stand-in for bfloat16, which it rounds wrongly):
    ``T`` is rounded to them for the products, as the delta-rule kernels do; ``P₁``, ``P₂``, ``U``
    and the gradients stay within 16-bit rounding of the float64 solves."""
    from nlgraph.compilers.chunked import solve_chunks
    from nlgraph.compilers.kernels.recurrence import online_prepare

    g = torch.Generator().manual_seed(7)
    b, h, c, n, i, o = 1, 2, 2, 32, 32, 32

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    k = torch.nn.functional.normalize(r(b, h, c, n, i), dim=-1)
    args = [k, k * 0.95, torch.rand(b, h, c, n, generator=g, dtype=torch.float64),
            torch.rand(b, h, c, n, n, generator=g, dtype=torch.float64),
            torch.rand(b, h, c, n, generator=g, dtype=torch.float64), 0.5 * r(b, h, c, n), r(b, h, c, n, o)]
    ref_in = [a.clone().requires_grad_() for a in args]
    ref = solve_chunks(*ref_in)
    cots = [r(*t.shape) for t in ref]
    want = torch.autograd.grad(sum((t * ct).sum() for t, ct in zip(ref, cots)), ref_in)
    mine = [(a.half() if j < 2 else a.float()).to(DEVICE).requires_grad_() for j, a in enumerate(args)]
    out = online_prepare(*mine, out=torch.float16)
    assert out[0].dtype == out[1].dtype == torch.float16 and out[2].dtype == torch.float32
    for a_, r_ in zip(out, ref):
        assert _rel(a_.detach().double().cpu(), r_.detach()) < 1e-2
    got = torch.autograd.grad(sum((t.float() * ct.float().to(DEVICE)).sum() for t, ct in zip(out, cots)), mine)
    for j, (a_, r_) in enumerate(zip(got, want)):
        assert a_.dtype == mine[j].dtype
        assert _rel(a_.double().cpu(), r_) < 2e-2, j


@pytest.mark.parametrize("n,after,zero,negative", [(16, True, False, False), (32, False, True, False),
                                                   (64, True, True, False), (16, False, True, True)])
def test_the_gates_kernel_equals_the_transfer_products(n, after, zero, negative):
    """``online_gates`` (one program a chunk) against ``compilers.chunked.gate_pieces`` of
    ``transfer``'s products in float64: every piece and both factors' gradients, with a read after
    the write or before it, with factors of exactly 0 (products only: no division by a gate) and
    negative ones (a gate through ``tanh`` or ``identity``)."""
    from nlgraph.compilers.chunked import gate_pieces, transfer
    from nlgraph.compilers.kernels.recurrence import online_gates

    g = torch.Generator().manual_seed(n)
    b, h, c = 1, 2, 3
    a = 0.5 + 0.5 * torch.rand(b, h, c, n, generator=g, dtype=torch.float64)
    u = torch.rand(b, h, c, n, generator=g, dtype=torch.float64)
    if negative:
        a, u = 2 * a - 1.5, 2 * u - 1
    if zero:
        a[0, 0, 1, n // 2] = 0.0
        u[0, 1, 0, 3] = 0.0
    ref_in = [a.clone().requires_grad_(), u.clone().requires_grad_()]
    ref = gate_pieces(transfer(ref_in[0], False), transfer(ref_in[1], False), after)
    names = [k for k, v in ref.items() if v is not None]
    cots = {k: torch.randn(ref[k].shape, generator=g, dtype=torch.float64) for k in names}
    want = torch.autograd.grad(sum((ref[k] * cots[k]).sum() for k in names), ref_in)
    mine = [a.float().to(DEVICE).requires_grad_(), u.float().to(DEVICE).requires_grad_()]
    out = online_gates(*mine, after)
    assert sorted(k for k, v in out.items() if v is not None) == sorted(names)
    for k in names:
        assert out[k].dtype == torch.float32 and _rel(out[k].detach().double().cpu(), ref[k].detach()) < 1e-5, k
    got = torch.autograd.grad(sum((out[k] * cots[k].float().to(DEVICE)).sum() for k in names), mine)
    for which, a_, r_ in zip("au", got, want):
        assert torch.isfinite(a_).all() and _rel(a_.double().cpu(), r_) < 1e-5, which
    compiled = torch.compile(lambda x, y: sum((v * cots[k].float().to(DEVICE)).sum()
                                              for k, v in online_gates(x, y, after).items() if v is not None),
                             fullgraph=True, backend="aot_eager")
    for a_, b_ in zip(got, torch.autograd.grad(compiled(*mine), mine)):
        torch.testing.assert_close(a_, b_)


@settings(max_examples=8)
@given(st.integers(0, 2**31 - 1), st.sampled_from([16, 32]), st.integers(1, 3), st.integers(1, 40),
       st.integers(1, 40), st.booleans(), st.booleans(), st.integers(0, 3))
def test_the_gates_and_systems_kernels_chained_equal_pytorch(seed, n, c, i, o, mom, after, zeros):
    """Property: the transfer products' kernel feeding the systems' kernel (as a momentum level runs
    them) equals ``gate_pieces`` feeding ``solve_chunks`` in float64 at drawn chunks, widths, gates
    (some exactly 0) and read order: ``P₁``, ``P₂``, ``U``, the reads' pieces and the gradients of
    the keys, the write strengths, the forcing and both gates."""
    from nlgraph.compilers.chunked import gate_pieces, solve_chunks, transfer
    from nlgraph.compilers.kernels.recurrence import online_gates, online_prepare

    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    b, h = 1, 2
    k = torch.nn.functional.normalize(r(b, h, c, n, i), dim=-1)
    a = 0.6 + 0.4 * torch.rand(b, h, c, n, generator=g, dtype=torch.float64)
    u = torch.rand(b, h, c, n, generator=g, dtype=torch.float64)
    for _ in range(zeros):  # gates of exactly 0 at drawn tokens
        j = int(torch.randint(0, c * n, (1,), generator=g))
        (a if j % 2 else u)[0, j % h, j // n, j % n] = 0.0
    coef, f = torch.rand(b, h, c, n, generator=g, dtype=torch.float64), r(b, h, c, n, o)

    def run(conv, kernels):
        x = [conv(t).requires_grad_() for t in (k, a, u, coef, f)]
        kk, aa, uu, cf, ff = x
        if kernels:
            p = online_gates(aa, uu, after) if mom else gate_pieces(transfer(aa, False), None, after)
            outs = online_prepare(kk, kk, cf, p["omp"], p["gp"], p["zp"], ff)
        else:
            p = gate_pieces(transfer(aa, False), transfer(uu, False) if mom else None, after)
            outs = solve_chunks(kk, kk, cf, p["omp"], p["gp"], p["zp"], ff)
        reads = [p[name] for name in ("om", "ga", "z", "oml", "yend") if p[name] is not None]
        return x, [t for t in (*outs, *reads) if t is not None]

    (x_ref, ref), (x_mine, mine) = run(lambda t: t.clone(), False), run(lambda t: t.float().to(DEVICE), True)
    assert len(ref) == len(mine)
    cots = [r(*t.shape) for t in ref]
    # without momentum nothing reads u
    want = torch.autograd.grad(sum((t * ct).sum() for t, ct in zip(ref, cots)),
                               x_ref if mom else x_ref[:2] + x_ref[3:])
    got = torch.autograd.grad(sum((t * ct.float().to(DEVICE)).sum() for t, ct in zip(mine, cots)),
                              x_mine if mom else x_mine[:2] + x_mine[3:])
    for t, t_ref in zip(mine, ref):
        assert _rel(t.detach().double().cpu(), t_ref.detach()) < 1e-4
    for gr, gr_ref in zip(got, want):
        assert torch.isfinite(gr).all() and _rel(gr.double().cpu(), gr_ref) < 1e-4


def test_the_backward_warps_follow_their_switch(monkeypatch):
    """``NLGRAPH_RECURRENCE_BWD_WARPS``: 4 or 8 warps for the backward; any other value is one clear
    error naming the variable."""
    from nlgraph.errors import NLGraphError

    for w in ("4", "8"):
        monkeypatch.setattr(rec_module, "BWD_WARPS", w)
        assert rec_module._bwd_warps() == int(w)
    monkeypatch.setattr(rec_module, "BWD_WARPS", "6")
    with pytest.raises(NLGraphError, match="NLGRAPH_RECURRENCE_BWD_WARPS"):
        rec_module._bwd_warps()
