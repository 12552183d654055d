"""The Triton chunked linear attention (with an optional decay per head or per key channel) equals a
token-by-token loop.

``nlgraph.compilers.kernels.linear_attention.chunk_linear_attention`` (forward and backward in
Triton) is checked against ``h_t = α_t h_{t−1} + k_t v_tᵀ, o_t = scale · h_tᵀ q_t`` run in float64:
outputs, final state and the gradients of q, k, v, the log decay g and the initial state, with
partial last chunks, several value blocks, with and without decay and initial state, decays per key
channel (GLA's) down to e^−8 a token (a chunk that decays by e^−500, past what a factorised
``(Q e^b)(K e^−b)ᵀ`` could hold in float32); streaming (the
final state fed back) equals one call, and the op traces under ``torch.compile(fullgraph=True)``.
Without CUDA the kernels run in Triton's interpreter.
"""

import pytest
import torch

from triton_interp import INTERPRET as _INTERPRET  # noqa: E402  (sets up triton first)
from triton_interp import channel_offsets  # noqa: E402, F401  (a fixture)
from triton_interp import interpreter_while_testing  # noqa: E402, F401  (the module fixture)
from triton_interp import rel as _rel  # noqa: E402

from nlgraph.compilers.kernels.linear_attention import chunk_linear_attention  # noqa: E402
from nlgraph.compilers.kernels.linear_attention import token_loop as _reference  # noqa: E402
from nlgraph.errors import NLGraphError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("interpreter_while_testing")


def _inputs(b, t, h, dk, dv, gated, with_h0, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
    shape = (b, t, h, dk) if gated in ("channel", "strong") else (b, t, h)
    if gated in ("strong", "strong_head"):
        g = -8.0 * torch.rand(shape, generator=gen, dtype=torch.float64)
    else:
        g = torch.log(0.8 + 0.2 * torch.rand(shape, generator=gen, dtype=torch.float64)) if gated else None
    h0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64) if with_h0 else None
    return q, k, v, g, h0


# (B, T, H, Dk, Dv, decay, with h0, chunk, dtype, limit)
CASES = [
    (2, 70, 2, 8, 6, True, True, 16, torch.float32, 1e-5),      # partial last chunk, all inputs
    (1, 33, 1, 16, 40, False, False, 32, torch.float32, 1e-5),  # plain linear attention
    (1, 100, 2, 32, 100, True, True, 64, torch.float32, 1e-5),  # two value blocks
    (1, 50, 2, 16, 16, True, True, 16, torch.float16, 3e-3),
    (2, 70, 2, 8, 6, "channel", True, 16, torch.float32, 1e-5),   # a decay per key channel (GLA)
    (1, 100, 2, 32, 100, "channel", True, 64, torch.float32, 1e-5),
    (2, 70, 1, 16, 40, "strong", False, 32, torch.float32, 1e-5),  # e^-8 a token, e^-500 over a chunk
    # a partial last chunk that decays past e^-88: its padded rows must not overflow into NaN (they
    # did, in the backward, before they were masked)
    (1, 60, 2, 16, 16, "strong", True, 64, torch.float32, 1e-5),
    (1, 60, 2, 16, 16, "strong_head", True, 64, torch.float32, 1e-5),
    # the last chunk's valid keys decay past e^-88 before a sub-block whose reference row is past T
    # (its keys' factor e^{b_ref − b} would overflow unless masked), and T a multiple of the chunk
    (1, 104, 1, 16, 16, "strong", True, 64, torch.float32, 1e-5),
    (1, 128, 1, 16, 16, "strong", True, 64, torch.float32, 1e-5),
    (1, 50, 2, 16, 16, "channel", True, 32, torch.float16, 3e-3),
    # keys wider than the state recurrences' key block (64): two key blocks, the second partial (with
    # two value blocks; a decay per channel, per head, none)
    (1, 40, 1, 80, 80, "channel", True, 16, torch.float32, 1e-5),
    (1, 40, 1, 72, 24, True, True, 16, torch.float32, 1e-5),
    (1, 40, 1, 72, 24, False, True, 16, torch.float32, 1e-5),
]
CHANNEL_CASES = [c for c in CASES if c[5] in ("channel", "strong")]  # a decay per key channel


@pytest.mark.parametrize("b, t, h, dk, dv, gated, with_h0, chunk, dtype, tol", CASES)
def test_chunk_linear_attention_equals_the_token_loop(b, t, h, dk, dv, gated, with_h0, chunk, dtype, tol,
                                                      monkeypatch):
    from nlgraph.compilers.kernels import _load

    # the per-channel kernels at the chunk each case asks for (a model's calls run CHANNEL_CHUNK, 32)
    monkeypatch.setattr(_load, "CHANNEL_CHUNK", None)
    q, k, v, g, h0 = _inputs(b, t, h, dk, dv, gated, with_h0, seed=t)
    leaves = [x.requires_grad_() for x in (q, k, v, g, h0) if x is not None]
    y_ref, s_ref = _reference(q, k, v, g, h0, 0.5)
    gen = torch.Generator().manual_seed(1)
    do, ds = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64), torch.randn(s_ref.shape, generator=gen,
                                                                                       dtype=torch.float64)
    ref_grads = torch.autograd.grad((y_ref * do).sum() + (s_ref * ds).sum(), leaves)
    ins = [x.detach().to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    extra = [x.detach().to(DEVICE, torch.float32).requires_grad_() if x is not None else None for x in (g, h0)]
    y, s = chunk_linear_attention(*ins, extra[0], extra[1], output_final_state=True, scale=0.5, chunk=chunk)
    assert y.dtype == dtype and s.dtype == torch.float32
    grads = torch.autograd.grad((y.float() * do.to(DEVICE).float()).sum() + (s * ds.to(DEVICE).float()).sum(),
                                ins + [x for x in extra if x is not None])
    assert _rel(y, y_ref) < tol and _rel(s, s_ref) < tol
    names = ["q", "k", "v"] + (["g"] if gated else []) + (["h0"] if with_h0 else [])
    for name, a, r in zip(names, grads, ref_grads):
        assert _rel(a, r) < tol, name


@pytest.mark.parametrize("b, t, h, dk, dv, gated, with_h0, chunk, dtype, tol", CHANNEL_CASES)
def test_per_channel_offsets_equal_the_token_loop(b, t, h, dk, dv, gated, with_h0, chunk, dtype, tol, monkeypatch,
                                                   channel_offsets):
    """The per-channel cases of CASES with the chunk's own keys scored one offset at a time
    (``NLGRAPH_CHANNEL_TREE=0``; the tree of products is the default): exact at decays of e^−8 a
    token (e^−500 over a chunk), partial last chunks, a reference row past T."""
    assert channel_offsets
    test_chunk_linear_attention_equals_the_token_loop(b, t, h, dk, dv, gated, with_h0, chunk, dtype, tol,
                                                      monkeypatch)


@pytest.mark.parametrize("gated", [True, "channel"])
def test_chunk_linear_attention_streams_in_segments(gated):
    q, k, v, g, _ = _inputs(1, 90, 2, 16, 16, gated, False, seed=3)
    dev = [x.to(DEVICE, torch.float32) for x in (q, k, v, g)]
    y, s = chunk_linear_attention(*dev, output_final_state=True, scale=1.0)
    y1, s1 = chunk_linear_attention(*(x[:, :37] for x in dev), output_final_state=True, scale=1.0)
    y2, s2 = chunk_linear_attention(*(x[:, 37:] for x in dev), initial_state=s1, output_final_state=True, scale=1.0)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated", [True, "channel"])
def test_chunk_linear_attention_traces_under_compile_fullgraph(gated):
    q, k, v, g, _ = _inputs(1, 40, 2, 8, 8, gated, False, seed=5)
    ins = [x.to(DEVICE, torch.float32).requires_grad_() for x in (q, k, v, g)]

    def f(q, k, v, g):
        return chunk_linear_attention(q, k, v, g, scale=1.0, chunk=16)[0].square().sum()

    eager = torch.autograd.grad(f(*ins), ins)
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*ins), ins)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_chunk_linear_attention_errors_name_the_argument():
    x = torch.randn(1, 8, 2, 4, device=DEVICE)
    with pytest.raises(NLGraphError, match="chunk_linear_attention.g"):
        chunk_linear_attention(x, x, x, torch.zeros(1, 8, device=DEVICE))
    with pytest.raises(NLGraphError, match="chunk_linear_attention.chunk"):
        chunk_linear_attention(x, x, x, chunk=48)


@pytest.mark.parametrize("gated", [True, "channel"])
def test_the_ops_outputs_have_their_fakes_strides(gated):
    """``torch.library.opcheck``: real outputs match the fake implementation (shapes, dtypes,
    strides; inductor trusts the fake's), with B > 1 and T not a multiple of the chunk, where ``dg``
    was once a view of a padded buffer."""
    from nlgraph.compilers.kernels import linear_attention as module

    q, k, v, g, h0 = (x.float().to(DEVICE) for x in _inputs(2, 20, 1, 16, 16, gated, True, seed=12))
    args = (q, k, v, g, h0, 1.0, 16, True)
    torch.library.opcheck(module._fwd_op, args, test_utils=("test_schema", "test_faketensor"))
    o, _, bcum = module._fwd_op(*args)
    bwd = (q, k, v, bcum, h0, torch.randn_like(o), torch.randn_like(h0), 1.0, 16)
    torch.library.opcheck(module._bwd_op, bwd, test_utils=("test_schema", "test_faketensor"))


def test_the_per_channel_kernels_run_their_own_chunk(monkeypatch):
    """A per-channel decay runs ``_load.CHANNEL_CHUNK`` = 32 whatever chunk is asked for (the same
    results bit for bit); a per-head decay runs the chunk asked for."""
    from nlgraph.compilers.kernels import linear_attention as module

    ran, original = [], module._fwd_op
    monkeypatch.setattr(module, "_fwd_op", lambda *a: ran.append(a[6]) or original(*a))
    q, k, v, g, _ = _inputs(1, 40, 1, 16, 16, "channel", False, seed=3)
    q, k, v, g = (x.float().to(DEVICE) for x in (q, k, v, g))
    outs = [chunk_linear_attention(q, k, v, g, scale=1.0, chunk=c)[0] for c in (16, 64, 32)]
    chunk_linear_attention(q, k, v, g[..., 0].contiguous(), scale=1.0, chunk=64)
    assert ran == [32, 32, 32, 64]
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


def test_plain_warps_launches_the_plain_kernels_at_another_count_and_restores_them():
    """``benchmarks/_launch.py`` (the kernel benchmarks' ``--warps``): inside it the plain kernels take
    the given warps (the interpreter runs them alike), outside they are the kernels again."""
    import importlib.util
    from pathlib import Path

    from nlgraph.compilers.kernels import _linear_attention_triton as kmod

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "_launch.py"
    spec = importlib.util.spec_from_file_location("_launch", path)
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    before = kmod.kernels().grads_channel
    q, k, v, g, _ = _inputs(1, 40, 1, 16, 16, "channel", False, seed=3)
    q, k, v, g = (x.float().to(DEVICE) for x in (q, k, v, g))
    ref = chunk_linear_attention(q, k, v, g, scale=1.0)[0]
    with launch.plain_warps(8):
        assert type(kmod.kernels().grads_channel).__name__ == "_Warps"
        assert torch.equal(chunk_linear_attention(q, k, v, g, scale=1.0)[0], ref)
    assert kmod.kernels().grads_channel is before


@pytest.mark.parametrize("shape", [(2, 70, 3), (1, 45, 2, 24), (1, 64, 1, 8)])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunk_cumsum_kernel_equals_torch(shape, reverse):
    """The chunk-local (reverse) cumulative sum of the decays, one Triton program a chunk, equals
    PyTorch's in float64, with a partial last chunk, a decay per head or per key channel (a width not
    a power of two), float32 and bf16 inputs (float32 out)."""
    from nlgraph.compilers.kernels.linear_attention import _chunk_cumsum

    chunk, b, t = 16, shape[0], shape[1]

    def want(x):
        xp = torch.nn.functional.pad(x.double(), (0, 0) * (len(shape) - 2) + (0, -t % chunk))
        xp = xp.view(b, -1, chunk, *shape[2:])
        return (xp.flip(2).cumsum(2).flip(2) if reverse else xp.cumsum(2)).view(b, -1, *shape[2:])[:, :t]

    g = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).to(DEVICE)
    for x in (g, g.bfloat16()):
        got = _chunk_cumsum(x, chunk, reverse=reverse)
        assert got.dtype == torch.float32 and got.shape == g.shape
        torch.testing.assert_close(got.double(), want(x), rtol=1e-6, atol=1e-5)
