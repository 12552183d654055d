"""The mini-batch MLP memory of Titans in one Triton kernel: the forward (issue 11, item 1, first step).

Per head, a two-layer memory ``M(x) = W1 σ(W0 x)`` (``W0 [F, D]``, ``W1 [D, F]``, ``σ`` = SiLU) on
the ``l2`` objective ``½‖M(k) − v‖²``, with momentum and weight decay (Titans' order), its gradients
taken at each chunk's start (the gradient point ``{chunk: C}``), read after the write (or before)::

    δ_t = ∇_W ½‖M_{W_c}(k_t) − v_t‖²            (W_c: the weights at the chunk's start)
    S_t = μ_t S_{t−1} − η_t δ_t,   W_t = α_t W_{t−1} + S_t,   o_t = M_{W_t}(q_t)  (or M_{W_{t−1}}(q_t))

for each of ``W0`` and ``W1`` (``α``: the kept fraction of weight decay). This is what nlgraph's
``memory`` level computes for ``specs/titans.yaml``'s memory (the mini-batch driver of
``compilers/chunked.py``); :func:`token_loop` is the same function token by token.

The weights and momentum stay in fp32 and the per-token weights are never formed
(``_mlp_memory_triton``). Two layouts of the same arithmetic: one program per (batch, head) walks
all its chunks (``split=0``), or, the default, one launch per chunk with the hidden units split over
programs (``split`` ≥ 1), the sums over hidden units added across programs with atomics: 4x the
programs at the d_model-512 Titans model's shape, where one program per head left half the SMs
idle. The transfer products of the gates (``G``, ``Y``, ``Ω = G Y`` per chunk) are formed beforehand for all chunks at once by
:func:`nlgraph.compilers.chunked.transfer`; they do not depend on the memory.

The backward is a second Triton kernel that walks the chunks in reverse from the chunk-start
states the forward kept (through the chunk-start gradients, so second order in the memory); the
gates' transfer products are differentiated by PyTorch. A custom op with autograd
(``nlgraph::chunk_mlp_memory_fwd`` / ``_bwd``), so ``torch.compile(fullgraph=True)`` traces it.

The memory family's ``triton`` form routes Titans' memory levels here
(:func:`nlgraph.compilers.kernels.dispatch.minibatch_mlp_memory`); on CUDA while
``dispatch.MLP_MEMORY_ON_GPU`` is on (the default) and the chunk's ``[C, D]`` tile is at most
``MAX_CUDA_TILE``. Checked on CPU through Triton's interpreter against :func:`token_loop` on
outputs, final state and every input's gradient (``tests/compilers/test_kernels_mlp_memory.py``),
and on the H200 in float32 and bfloat16 up to a ``[C, D]`` tile of ``MAX_CUDA_TILE``
(docs/benchmarks.md). The backward is not itself differentiable (no double backward).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from nlgraph.errors import NLGraphError

from ._load import MIN_CUDA_HEAD, cdiv as _cdiv, pow2 as _pow2, run_precompiled, switch

__all__ = ["chunk_mlp_memory", "random_inputs", "token_loop"]

_OP = "chunk_mlp_memory"


def _kernels(q: torch.Tensor):
    from ._load import load_kernels

    def importer():
        from . import _mlp_memory_triton as mod

        return mod

    return load_kernels(importer, q, _OP, "MLP-memory")


def _coefficients(alpha: torch.Tensor, mu: torch.Tensor, t: int, chunk: int, before: bool = False):
    """The transfer coefficients the kernels read, per chunk, from the gates ``[B, T, H]``
    (differentiable; the padding's gates are 1, so products over real tokens are unchanged):
    ``g0 = G[r, 0]``, ``z0 = Ω[r, 0] − G[r, 0]`` ``[B, H, NT, C]``; ``om = Ω[r, j]`` ``[B, H, NT, C, C]``
    (j ≥ 1; the read rows r are the tokens 1..C, or 0..C−1 for a read ``before`` the write, which
    sees the state after the previous token); at the chunk's last token L: ``end = (G[L, 0], Ω[L, 0] − G[L, 0], Y[L, 0])``
    ``[B, H, NT, 3]``, ``oml = Ω[L, j]`` and ``yll = Y[L, j]`` ``[B, H, NT, C]``."""
    from ..chunked import transfer

    b, _, h = alpha.shape
    nt = -(-t // chunk)
    pad = nt * chunk - t
    gates = [F.pad(x.float(), (0, 0, 0, pad), value=1.0).view(b, nt, chunk, h).permute(0, 3, 1, 2)
             for x in (alpha, mu)]
    g, y = transfer(gates[0], False), transfer(gates[1], False)      # [B, H, NT, C+1, C+1]
    om = g @ y
    steps = torch.arange(nt, device=alpha.device)
    # each chunk's last row: C, or what the partial last chunk holds. Computed on the device: an
    # item assignment of a Python int copies a pageable host tensor, which CUDA-graph capture refuses
    last = (t - steps * chunk).clamp(max=chunk)
    gl, oml, yl = (m[:, :, steps, last] for m in (g, om, y))         # rows L: [B, H, NT, C+1]
    end = torch.stack([gl[..., 0], oml[..., 0] - gl[..., 0], yl[..., 0]], dim=-1)
    rows = slice(0, chunk) if before else slice(1, chunk + 1)
    g0 = g[..., rows, 0]
    return (g0.contiguous(), (om[..., rows, 0] - g0).contiguous(), om[..., rows, 1:].contiguous(),
            end.contiguous(), oml[..., 1:].contiguous(), yl[..., 1:].contiguous())


#: The step kernels (one launch per chunk, hidden units over programs) on CUDA: on by default since
#: they passed the GPU's checks (H200 and H100) and made the compiled Titans model's CUDA-graph
#: step 1.6x faster on an H100 (docs/benchmarks.md); ``NLGRAPH_MLP_MEMORY_SPLIT=0`` turns them off.
SPLIT_ON_CUDA = switch("NLGRAPH_MLP_MEMORY_SPLIT", True)


def default_split(device: torch.device) -> int:
    """Hidden blocks per program of the step kernels on ``device``, or 0 for the one-program kernels:
    1 under the interpreter (CPU), on CUDA 1 while :data:`SPLIT_ON_CUDA` is on. 0 while
    ``torch.use_deterministic_algorithms`` is on: the step kernels add across programs with atomics,
    so their last bits vary from run to run."""
    if torch.are_deterministic_algorithms_enabled():
        return 0
    return 1 if device.type != "cuda" or SPLIT_ON_CUDA else 0


#: The products of 16-bit runs (``NLGRAPH_MLP_PRODUCTS``, read once a process): both operands rounded
#: to the inputs' 16-bit dtype (``input``, the default, at ``[C, D]`` tiles up to
#: :data:`INPUT_PRODUCTS_MAX_TILE`), or the float32 state and widened inputs through TF32 (``tf32``).
#: ``input`` has half the tensor-core instructions (compiled for sm_90 from CPU, the forward step's
#: 49 MMAs against TF32's 98; its spills did not shrink at bfloat16's float16 stand-in); on an H100
#: (2026-12-07) it passed the bfloat16 checks at tiles of 2048 (worst 8.0e-3 against float64, limit
#: 3e-2) and took the compiled Titans model from 297,860 to 338,034 tokens/s (B=8, T=2048;
#: docs/benchmarks.md). It rounds the state as a bf16 matmul of PyTorch's path under autocast does.
#: float32 runs keep exact products either way.
MLP_PRODUCTS = (os.environ.get("NLGRAPH_MLP_PRODUCTS") or "input").strip().lower()
_PRODUCT_CHOICES = ("input", "tf32")
#: The largest ``[C, D]`` tile that takes ``input`` products: at 4096 with chunks of 64 (D = 64) the
#: H100's bfloat16 check raised an illegal memory access with them (TF32 passed in the same call;
#: D = 128 at chunk 32 passed with both), so larger tiles keep TF32.
INPUT_PRODUCTS_MAX_TILE = 2048


def _precision(dtype: torch.dtype, tile_elems: int, cuda: bool = True) -> str:
    """``tl.dot``'s precision (or the 16-bit dtype the operands are rounded to) for inputs of ``dtype``
    at a ``[C, D]`` tile of ``tile_elems``; off CUDA (Triton's interpreter, whose bfloat16 products
    are wrong) bfloat16 keeps TF32."""
    if MLP_PRODUCTS not in _PRODUCT_CHOICES:
        raise NLGraphError(f"NLGRAPH_MLP_PRODUCTS={MLP_PRODUCTS!r}: give one of {', '.join(_PRODUCT_CHOICES)} "
                           "(input, the default), or unset it", path="NLGRAPH_MLP_PRODUCTS")
    if dtype == torch.float32:
        return "ieee"
    if MLP_PRODUCTS == "tf32" or tile_elems > INPUT_PRODUCTS_MAX_TILE or (dtype == torch.bfloat16 and not cuda):
        return "tf32"
    return "bf16" if dtype == torch.bfloat16 else "fp16"


def _launch(q: torch.Tensor, f: int, chunk: int, block_f: int, warps: int) -> dict:
    b, t, h, d = q.shape
    return dict(T=t, NT=-(-t // chunk), H=h, D=d, F=f, C=chunk, BD=_pow2(d), BF=block_f, num_warps=warps,
                # float32 keeps exact products whatever NLGRAPH_FP32_PRODUCTS says: compiled for sm_90
                # at D 128, three TF32 products made the split layout's forward step spill 3,968 bytes
                # a thread (ieee: 624) and the one-program backward 13,592 (2,432); untimed on a GPU
                # (benchmarks/kernel_resources.py --dtype float32, docs/benchmarks.md)
                PREC=_precision(q.dtype, tile(chunk, d), q.is_cuda))


#: The largest ``[C, D]`` tile (chunk × head dim, D rounded up to a power of two) the kernels run on
#: CUDA: the largest at which they passed the H200's checks (triton 3.6) in float32 and in bfloat16
#: (4096: D = 64 at chunk 64 and D = 128 at chunk 32, in both dtypes). At 8192 (D = 128, chunk 64)
#: the float32 check was killed unfinished at its 70 s limit and the bfloat16 one raised an illegal
#: memory access (benchmarks/results/mlp_memory_kernel_checks_h200.json, ..._tile4096_bf16_h200.json).
MAX_CUDA_TILE = 4096
#: The widest head (rounded up to a power of two) checked on the H200: wider heads are refused on
#: CUDA even within the tile (D = 256 at chunk 16 is a 4096 tile, never checked there).
MAX_CUDA_HEAD_DIM = 128


def why_not_on_cuda(chunk: int, d: int, block_f: int | None = None) -> str | None:
    """``None`` when the kernels run a chunk of ``chunk`` tokens at head dim ``d`` (and hidden block
    ``block_f``) on CUDA, else why not."""
    if block_f == 64:  # the H200 sweep that timed it faulted, and no check has passed with it
        return "block_f 64 is not checked on CUDA (the H200 timing sweep with it faulted); take 16 or 32"
    if _pow2(d) < MIN_CUDA_HEAD:
        return (f"head dim {d} is held in a 16-wide tile, which the kernel is not checked at on CUDA (the "
                "delta-rule kernels' faulted or gave wrong values there on an H100, docs/benchmarks.md \"Heads "
                "narrower than 32 on the GPU\"); use fewer, wider heads (17 columns or more)")
    if _pow2(d) > MAX_CUDA_HEAD_DIM:
        return (f"head dim {d} is above {MAX_CUDA_HEAD_DIM}, the widest the kernel is checked at on CUDA (its "
                "shared memory grows with the head dim, not only with the tile); use more heads")
    if tile(chunk, d) > MAX_CUDA_TILE:
        return (f"chunk {chunk} × head dim {d} exceeds the {MAX_CUDA_TILE}-element tile the kernel runs on CUDA "
                "(the largest checked on the H200); take chunk ≤ 32 at head dim 128, chunk ≤ 64 at head dim 64, "
                "or more heads")
    return None


def tile(chunk: int, d: int) -> int:
    """Elements of a chunk's ``[C, D]`` tile in the kernels (D rounded up to a power of two), the
    size their launch settings and their CUDA limit are read from."""
    return chunk * _pow2(d)


def default_block_f(chunk: int, d: int) -> int:
    """Hidden units a kernel step holds by default: 16 for tiles above 2048 elements (on the H200 the
    float32 kernels at D = 128, chunk 64 and 32 hidden units asked for 248 KiB of shared memory, 227
    KiB there), else 32."""
    return 16 if tile(chunk, d) > 2048 else 32


def default_warps(chunk: int, d: int) -> int:
    """Warps per program: a program holds about a dozen float32 ``[C, D]`` tiles, so large tiles
    need more threads to hold them in registers (4 warps at C·D = 1024 was the H200's checked size)."""
    return 4 if tile(chunk, d) <= 1024 else 8


_FWD = "nlgraph::chunk_mlp_memory_fwd"


@torch.library.custom_op(_FWD, mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, g0: torch.Tensor,
            z0: torch.Tensor, om: torch.Tensor, end: torch.Tensor, oml: torch.Tensor, yll: torch.Tensor,
            w0: torch.Tensor, w1: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor, chunk: int, block_f: int,
            stride: int, warps: int, split: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor]:
    """Returns ``(o, W0, W1, S0, S1 after the sequence, and every ``stride``-th chunk-start state
    [B, H, ⌈NT / stride⌉, ...] with its ``R1 = Yk − V`` [B, H, ⌈NT / stride⌉, C, BD])``; ``stride``
    0 keeps none (empties). ``split`` 0 runs one program per (batch, head); ``n`` ≥ 1 one launch
    per chunk, ``n`` hidden blocks per program (:func:`_forward_split`); R1 is kept only then."""
    args = (q, k, v, eta, g0, z0, om, end, oml, yll, w0, w1, s0, s1, chunk, block_f, stride, warps, split)
    return run_precompiled(_OP, "fwd", _forward, args, q.device)


def _history(q, out, chunk, stride, nt, split):
    """The kept chunk-start states (and their R1 with ``split``), or distinct empties when not
    saving: a custom op's outputs may not alias each other."""
    b, _, h, d = q.shape
    nh = -(-nt // stride) if stride else 0
    hist = [q.new_empty((b, h, nh, *x.shape[2:]) if stride else (0,), dtype=torch.float32) for x in out]
    # R1 with each kept start; a checkpointed backward recomputes it for every chunk and reads only
    # that (4 MiB unused at the d_model-512 Titans model's shape, kept so the kernel stays as checked)
    hist.append(q.new_empty((b, h, nh, chunk, _pow2(d)) if stride and split else (0,), dtype=torch.float32))
    return hist, nh


def _forward(q, k, v, eta, g0, z0, om, end, oml, yll, w0, w1, s0, s1, chunk, block_f, stride, warps, split):
    kn = _kernels(q)
    b, t, h, d = q.shape
    f = w0.shape[-2]
    p = _launch(q, f, chunk, block_f, warps)
    nt = p["NT"]
    out = [x.float().contiguous().clone() for x in (w0, w1, s0, s1)]
    hist, nh = _history(q, out, chunk, stride, nt, split)
    if split:
        o = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        ybuf = torch.zeros((3, b * h, chunk, p["BD"]), dtype=torch.float32, device=q.device)
        _forward_split(kn, p, (q, k, v, eta, g0, z0, om, end, oml, yll), out, hist, ybuf, o, 0, nt,
                       max(stride, 1), nh, stride > 0, True, split)
        return (o.to(v.dtype), *out, *hist)
    o = torch.empty_like(v)
    kn.fwd[(b * h,)](q, k, v, eta, g0, z0, om, end, oml, yll, *out, *hist[:4], o, C0=0, C1=nt, R=max(stride, 1),
                     NH=nh, SAVE=stride > 0, num_stages=1, **p)
    return (o, *out, *hist)


def _programs(p: dict, split: int) -> int:
    """Programs per (batch, head) of the step kernels: ``split`` hidden blocks each."""
    return _cdiv(_cdiv(p["F"], p["BF"]), split)


class _Repeated:
    """A Triton kernel launched many times with the same arguments but its last positional ones
    (the step kernels' ``i_t, C0, C1``). The first launch goes through Triton's JIT (compiling,
    specializing); the rest call the compiled kernel's launcher directly, without the JIT's binding
    of some forty arguments per call (through the JIT, the step kernels' forward took 5.4 ms for 129
    launches on the H200, more than one program per head's 4.1 ms: about 40 µs a launch, inferred).
    Triton's interpreter goes through the JIT every time; a precompile's dry run records the first
    launch only (the rest are the same kernel)."""

    def __init__(self, kernel, grid, args: tuple, kwargs: dict) -> None:
        self._kernel, self._grid, self._args, self._kwargs = kernel, grid, args, kwargs
        self._run = self._rest = None
        self._recorded = False

    def __call__(self, *varying) -> None:
        if self._run is not None:
            self._run(*self._args, *varying, *self._rest)
            return
        if self._recorded:
            return
        self._recorded = getattr(self._kernel, "recording", False)
        compiled = self._kernel[self._grid](*self._args, *varying, **self._kwargs)
        params = getattr(self._kernel, "params", None)
        if compiled is None or params is None or not hasattr(compiled, "packed_metadata"):
            return
        rest = params[len(self._args) + len(varying):]
        if all(q.name in self._kwargs for q in rest):  # else (a default left out) the JIT every time
            self._rest = tuple(self._kwargs[q.name] for q in rest)
            self._run = compiled[(*self._grid, 1, 1)[:3]]  # the launcher reads all three grid sizes


def _forward_split(kn, p, inputs, state, hist, ybuf, o, c0, c1, r, nh, save, out, split):
    """Chunks ``c0 .. c1 − 1`` forward, one launch each after a first one that computes chunk
    ``c0``'s output at its keys (``_mlp_memory_fwd_step``); ``state`` is updated in place. Without
    ``out`` the kernel never touches ``o``."""
    grid = (inputs[0].shape[0] * inputs[0].shape[2], _programs(p, split))
    launch = _Repeated(kn.fwd_step, grid, (*inputs, *state, *hist, ybuf, o),
                       dict(R=r, NH=nh, NB=split, SAVE=save, OUT=out, num_stages=1, **p))
    for i in range(c0 - 1, c1):
        launch(i, c0, c1)


@_fwd_op.register_fake
def _(q, k, v, eta, g0, z0, om, end, oml, yll, w0, w1, s0, s1, chunk, block_f, stride, warps, split):
    nt = -(-q.shape[1] // chunk)
    out = [torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in (w0, w1, s0, s1)]
    hist, _ = _history(q, out, chunk, stride, nt, split)
    return (torch.empty_like(v), *out, *hist)


@torch.library.custom_op("nlgraph::chunk_mlp_memory_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, g0: torch.Tensor,
            z0: torch.Tensor, om: torch.Tensor, end: torch.Tensor, oml: torch.Tensor, yll: torch.Tensor,
            hw0: torch.Tensor, hw1: torch.Tensor, hs0: torch.Tensor, hs1: torch.Tensor, do: torch.Tensor,
            hr1: torch.Tensor, dw0: torch.Tensor, dw1: torch.Tensor, ds0: torch.Tensor, ds1: torch.Tensor,
            chunk: int, block_f: int, stride: int, warps: int, split: int) -> list[torch.Tensor]:
    """Returns the gradients of ``(q, k, v, eta, g0, z0, om, end, oml, yll, W0, W1, S0, S1)``. With a
    ``stride`` above 1 the saved states are checkpoints: each segment of ``stride`` chunks is run
    forward again from its checkpoint, keeping every chunk's start, then backward."""
    args = (q, k, v, eta, g0, z0, om, end, oml, yll, hw0, hw1, hs0, hs1, do, hr1, dw0, dw1, ds0, ds1, chunk,
            block_f, stride, warps, split)
    return run_precompiled(_OP, "bwd", _backward, args, q.device)


def _backward(q, k, v, eta, g0, z0, om, end, oml, yll, hw0, hw1, hs0, hs1, do, hr1, dw0, dw1, ds0, ds1, chunk,
              block_f, stride, warps, split):
    kn = _kernels(q)
    b, t, h, d = q.shape
    f = hw0.shape[-2]
    p = _launch(q, f, chunk, block_f, warps)
    nt = p["NT"]
    if split:
        return _backward_split(kn, p, (q, k, v, eta, g0, z0, om, end, oml, yll), (hw0, hw1, hs0, hs1, hr1), do,
                               (dw0, dw1, ds0, ds1), stride, split)
    state = [x.float().contiguous().clone() for x in (dw0, dw1, ds0, ds1)]  # overwritten chunk by chunk
    scr = q.new_empty(b * h, chunk, f, dtype=torch.float32)
    grads = [torch.empty_like(x) for x in (q, k, v)] + [torch.empty_like(eta)]
    coef = [torch.empty_like(x) for x in (g0, z0, om, end, oml, yll)]
    do = do.contiguous()
    hist = (hw0, hw1, hs0, hs1)
    if stride == 1:  # every chunk's start was kept
        kn.bwd[(b * h,)](q, k, v, eta, g0, z0, om, end, oml, yll, *hist, do, *state, scr, *grads, *coef,
                         C0=0, C1=nt, num_stages=1, **p)
        return grads + coef + state
    o_scratch = torch.empty_like(v)
    for seg in reversed(range(-(-nt // stride))):
        c0, c1 = seg * stride, min(seg * stride + stride, nt)
        # the segment's chunk-start states, from its checkpoint
        work = [x[:, :, seg].clone() for x in hist]
        starts = [q.new_empty((b, h, c1 - c0, *x.shape[3:]), dtype=torch.float32) for x in hist]
        kn.fwd[(b * h,)](q, k, v, eta, g0, z0, om, end, oml, yll, *work, *starts, o_scratch, C0=c0, C1=c1, R=1,
                         NH=c1 - c0, SAVE=True, num_stages=1, **p)
        kn.bwd[(b * h,)](q, k, v, eta, g0, z0, om, end, oml, yll, *starts, do, *state, scr, *grads, *coef,
                         C0=c0, C1=c1, num_stages=1, **p)
    return grads + coef + state


def _backward_split(kn, p, inputs, hist, do, dstate, stride, split):
    """The step kernels' backward: each segment of ``stride`` chunks runs forward again from its
    checkpoint, keeping every chunk's start and R1 (at ``stride`` 1 the forward kept them all), then
    one launch per chunk in reverse (``_mlp_memory_bwd_step``), plus one that finishes the segment's
    first chunk."""
    q, k, v, eta, g0, z0, om, end, oml, yll = inputs
    b, h = q.shape[0], p["H"]
    nt, chunk, bd = p["NT"], p["C"], p["BD"]
    grid = (b * h, _programs(p, split))
    f32 = dict(dtype=torch.float32, device=q.device)
    state = [x.float().contiguous().clone() for x in dstate]  # the state's gradient, chunk by chunk
    scr = torch.zeros((b * h, chunk, p["F"]), **f32)
    ebuf = torch.zeros((3, b * h, chunk, bd), **f32)
    dq, dk = (torch.zeros(x.shape, **f32) for x in (q, k))
    dv, deta = torch.empty_like(v), torch.empty_like(eta)
    coef = [torch.zeros(x.shape, **f32) for x in (g0, z0, om, end, oml, yll)]
    do = do.contiguous()
    step = (q, k, eta, g0, z0, om, end, oml, yll)
    # (first chunk, end, its chunk-start states: kept by the forward, or None to recompute), last first
    segments = [(0, nt, hist)] if stride == 1 else [
        (c0, min(c0 + stride, nt), None) for c0 in reversed(range(0, nt, stride))]
    ybuf = torch.zeros((3, b * h, chunk, bd), **f32) if stride != 1 else None
    for c0, c1, starts in segments:
        if starts is None:  # the segment's chunk-start states and R1, from its checkpoint
            work = [x[:, :, (c0 // stride)].clone() for x in hist[:4]]
            starts = [q.new_empty((b, h, c1 - c0, *x.shape[3:]), dtype=torch.float32) for x in hist]
            ybuf.zero_()
            # q stands for the output it never writes (OUT is a compile-time False)
            _forward_split(kn, p, inputs, work, starts, ybuf, q, c0, c1, 1, c1 - c0, True, False, split)
        launch = _Repeated(kn.bwd_step, grid, (*step, *starts, do, *state, scr, ebuf, dq, dk, dv, deta, *coef),
                           dict(NB=split, num_stages=1, **p))
        for i in range(c1 - 1, c0 - 2, -1):
            launch(i, c0, c1)
    coef = [c.to(x.dtype) for c, x in zip(coef, (g0, z0, om, end, oml, yll))]
    return [dq.to(q.dtype), dk.to(k.dtype), dv, deta] + coef + state


@_bwd_op.register_fake
def _(q, k, v, eta, g0, z0, om, end, oml, yll, hw0, hw1, hs0, hs1, do, hr1, dw0, dw1, ds0, ds1, chunk, block_f,
      stride, warps, split):
    return ([torch.empty_like(x) for x in (q, k, v, eta, g0, z0, om, end, oml, yll)]
            + [torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in (dw0, dw1, ds0, ds1)])


def _setup_context(ctx, inputs, output):
    q, k, v, eta, g0, z0, om, end, oml, yll, w0, w1, s0, s1, chunk, block_f, stride, warps, split = inputs
    ctx.save_for_backward(q, k, v, eta, g0, z0, om, end, oml, yll, *output[5:])
    # the kept states are for the backward only: no zero gradients the size of the history for them
    ctx.mark_non_differentiable(*output[5:])
    ctx.chunk, ctx.block_f, ctx.stride, ctx.warps, ctx.split = chunk, block_f, stride, warps, split
    ctx.state_dtypes = [x.dtype for x in (w0, w1, s0, s1)]
    ctx.shapes = [x.shape for x in (w0, w1, s0, s1)]


def _autograd_backward(ctx, do, dw0, dw1, ds0, ds1, *_hist):
    saved = ctx.saved_tensors
    if ctx.stride == 0:
        raise NLGraphError("the forward ran without saving its chunk-start states (no gradients needed); run it "
                           "with gradients enabled", path=_OP)
    dstate = [torch.zeros(s, dtype=torch.float32, device=do.device) if g is None else g
              for g, s in zip((dw0, dw1, ds0, ds1), ctx.shapes)]
    g = _bwd_op(*saved[:14], do, saved[14], *dstate, ctx.chunk, ctx.block_f, ctx.stride, ctx.warps, ctx.split)
    state = [x.to(dt) for x, dt in zip(g[10:], ctx.state_dtypes)]
    return (*g[:10], *state, None, None, None, None, None)


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def chunk_mlp_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
                     mu: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     chunk: int = 16, block_f: int | None = None, checkpoint: int | None = None,
                     read: str = "after_write", warps: int | None = None, split: int | None = None
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Titans' mini-batch MLP memory over a sequence, in Triton, differentiable in every input.

    Args:
        q, k, v: ``[B, T, H, D]`` (float32 / bfloat16 / float16).
        eta, alpha, mu: ``[B, T, H]`` the inner learning rate θ, the kept fraction of weight decay
            and the momentum decay.
        state: ``(W0 [B, H, F, D], W1 [B, H, D, F], S0, S1)`` at the sequence's start (momentum
            ``S`` shaped as its weight).
        chunk: the gradient point's chunk (16, 32 or 64).
        block_f: hidden units a kernel step holds (16, 32 or 64; 64 not on CUDA); by default
            :func:`default_block_f`.

        checkpoint: with gradients enabled, the forward keeps every ``checkpoint``-th chunk's start
            state (``4·F·D`` floats per chunk and head) and the backward runs each segment forward
            again from it; 1 keeps them all (no recomputation); with ``split``, each kept chunk's
            ``[C, D]`` R1 too. By default the smallest power of two that keeps them within 256 MiB.
        read: ``after_write`` (``o_t = M_{W_t}(q_t)``) or ``before_write`` (``o_t = M_{W_{t−1}}(q_t)``).
        warps: warps per program (4, 8 or 16); by default :func:`default_warps`.
        split: ``0`` runs one program per (batch, head) that walks every chunk; ``n`` ≥ 1 one
            launch per chunk with the hidden units split over programs, ``n`` blocks of
            ``block_f`` each (more programs for the GPU's SMs, the sums over hidden units added
            across programs); by default :func:`default_split` for the device.

    Returns:
        ``(o [B, T, H, D] in v's dtype, (W0, W1, S0, S1) after the last token, fp32)``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise NLGraphError("expected a float32 / bfloat16 / float16 [B, T, H, D] tensor", path=f"{_OP}.{name}")
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise NLGraphError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape "
                           "and one dtype", path=f"{_OP}.k")
    b, t, h, d = q.shape
    for name, x in (("eta", eta), ("alpha", alpha), ("mu", mu)):
        if tuple(x.shape) != (b, t, h):
            raise NLGraphError(f"expected a [B, T, H] = {(b, t, h)} tensor, got {tuple(x.shape)}", path=f"{_OP}.{name}")
    w0, w1, s0, s1 = state
    f = w0.shape[-2]
    for name, x, want in (("W0", w0, (b, h, f, d)), ("W1", w1, (b, h, d, f)), ("S0", s0, (b, h, f, d)),
                          ("S1", s1, (b, h, d, f))):
        if tuple(x.shape) != want:
            raise NLGraphError(f"expected {want}, got {tuple(x.shape)}", path=f"{_OP}.state.{name}")
    if block_f is None:
        block_f = default_block_f(chunk, d)
    if read not in ("after_write", "before_write"):
        raise NLGraphError(f"read {read!r} must be after_write or before_write", path=f"{_OP}.read")
    if checkpoint is not None and (not isinstance(checkpoint, int) or checkpoint < 1):
        raise NLGraphError(f"checkpoint {checkpoint!r} must be a positive number of chunks", path=f"{_OP}.checkpoint")
    if chunk not in (16, 32, 64) or block_f not in (16, 32, 64):
        raise NLGraphError(f"chunk {chunk} and block_f {block_f} must each be 16, 32 or 64", path=f"{_OP}.chunk")
    if d > 256:
        raise NLGraphError(f"head dim {d} exceeds 256; split the heads", path=f"{_OP}.q")
    if q.device.type == "cuda" and (why := why_not_on_cuda(chunk, d, block_f)) is not None:
        raise NLGraphError(why, path=f"{_OP}.chunk")
    if warps is None:
        warps = default_warps(chunk, d)
    if warps not in (4, 8, 16):
        raise NLGraphError(f"warps {warps!r} must be 4, 8 or 16", path=f"{_OP}.warps")
    if split is None:
        split = default_split(q.device)
    if not isinstance(split, int) or isinstance(split, bool) or split < 0:
        raise NLGraphError(f"split {split!r} must be 0 (one program per head) or a number of hidden blocks per "
                           "program", path=f"{_OP}.split")
    split = min(split, _cdiv(f, block_f))  # more blocks a program than the memory has would all be empty
    _kernels(q)
    if t == 0:
        return v.new_zeros(v.shape), tuple(x.float() for x in state)
    coef = _coefficients(alpha, mu, t, chunk, before=read == "before_write")
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, eta, alpha, mu, *state))
    nt = -(-t // chunk)
    if checkpoint is None:
        # keep every chunk's start while that takes at most 256 MiB (a model keeps one such set per
        # layer until its backward), else every 2nd, 4th ... chunk's. The step kernels count each
        # kept chunk's R1 too: at the d_model-512 Titans model's shape (B=8, T=2048) that keeps every
        # 8th chunk's start, where the one-program kernels keep every 4th (their 256 MiB exactly)
        per_chunk = 4 * b * h * (4 * f * d + (chunk * _pow2(d) if split else 0))
        checkpoint = 1
        while checkpoint < nt and per_chunk * -(-nt // checkpoint) > 2**28:
            checkpoint *= 2
    stride = checkpoint if save else 0
    out = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), eta.float().contiguous(), *coef,
                  *(x.contiguous() for x in state), chunk, block_f, stride, warps, split)
    return out[0], tuple(out[1:5])


def token_loop(q, k, v, eta, alpha, mu, state, chunk: int, read: str = "after_write"):
    """The same function token by token in PyTorch (the kernel's tests use it in float64):
    ``(o [B, T, H, D], (W0, W1, S0, S1))``."""

    def readout(w0, w1, x):
        return torch.einsum("bhdf,bhf->bhd", w1, F.silu(torch.einsum("bhfd,bhd->bhf", w0, x)))

    w0, w1, s0, s1 = (x.clone() for x in state)
    out = []
    for i in range(q.shape[1]):
        if i % chunk == 0:
            c0, c1 = w0, w1  # the gradient point
        kt, vt = k[:, i], v[:, i]                                   # [B, H, D]
        z = torch.einsum("bhfd,bhd->bhf", c0, kt)
        a = F.silu(z)
        d1 = torch.einsum("bhdf,bhf->bhd", c1, a) - vt              # ∂ℓ/∂(W1 a)
        sg = torch.sigmoid(z)
        d0 = torch.einsum("bhdf,bhd->bhf", c1, d1) * (sg + z * sg * (1 - sg))
        if read == "before_write":
            out.append(readout(w0, w1, q[:, i]))
        lr, al, m = (x[:, i, :, None, None] for x in (eta, alpha, mu))
        s0 = m * s0 - lr * d0[..., :, None] * kt[..., None, :]
        s1 = m * s1 - lr * d1[..., :, None] * a[..., None, :]
        w0 = al * w0 + s0
        w1 = al * w1 + s1
        if read == "after_write":
            out.append(readout(w0, w1, q[:, i]))
    return torch.stack(out, dim=1), (w0, w1, s0, s1)


def random_inputs(b: int, t: int, h: int, d: int, f: int, seed: int = 0):
    """Float64 CPU inputs for the kernel's checks (its tests and GPU check): unit-norm q and k,
    normal v, gates θ ~ U(0, 0.2), kept fraction α ~ U(0.9, 1), momentum μ ~ U(0, 1), and a state
    of scaled normal weights and small momentum. Returns ``((q, k, v), (θ, α, μ), (W0, W1, S0, S1))``."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, t, h, generator=gen, dtype=torch.float64)

    q = F.normalize(r(b, t, h, d), dim=-1)
    k = F.normalize(r(b, t, h, d), dim=-1)
    v = r(b, t, h, d)
    gates = (u(0.0, 0.2), u(0.9, 1.0), u(0.0, 1.0))
    state = (r(b, h, f, d) / d ** 0.5, r(b, h, d, f) / f ** 0.5, 0.01 * r(b, h, f, d), 0.01 * r(b, h, d, f))
    return (q, k, v), gates, state

