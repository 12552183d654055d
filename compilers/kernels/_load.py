"""Loading a kernel module's Triton kernels on first use, with one error for each way it can fail, and
the block-size arithmetic the kernels' wrappers share."""

from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Hashable

import torch

from nlgraph.errors import NLGraphError


def load_kernels(importer, q: torch.Tensor, op: str, what: str):
    """The ``kernels()`` of the module ``importer()`` imports (``_delta_rule_triton``, ...), after
    checking that Triton imports and that ``q``'s device can run them (CUDA, or CPU under Triton's
    interpreter). The import is the caller's own ``from . import``: a traced caller (Dynamo does
    not trace ``importlib``) reaches here too.

    Raises:
        NLGraphError: no ``triton`` package; a CPU tensor without ``TRITON_INTERPRET=1``."""
    try:
        mod = importer()
    except ImportError as e:  # pragma: no cover - exercised only without triton
        raise NLGraphError(f"the Triton {what} kernels need the 'triton' package ({e}); install triton (it ships "
                           "with torch's CUDA builds) or use the 'chunked' form", path=op) from e
    if not q.is_cuda and not mod.INTERPRETED:
        raise NLGraphError(f"the Triton kernels need CUDA tensors, got {q.device}; move the inputs to a GPU, "
                           "or set TRITON_INTERPRET=1 before triton is imported to interpret them on CPU",
                           path=f"{op}.q")
    return recording(mod.kernels())


def recording(kernels: Any) -> Any:
    """``kernels`` (a module's namespace of kernels), or, in the thread running :func:`precompile`'s
    dry run, a stand-in that records their launches. Every op's kernel lookup passes through here."""
    if torch.compiler.is_compiling():  # Dynamo traces the ops' wrappers: it never sees a recording
        return kernels
    log = getattr(_RECORDING, "log", None)
    return kernels if log is None else _Recorder(kernels, log)


def switch(env: str, default: bool | None) -> bool | None:
    """A per-process switch from ``env``: ``1`` / ``on`` / ``true`` / ``yes`` turn it on, ``0`` /
    ``off`` / ``false`` / ``no`` off; unset or anything else keeps ``default`` (read at import, where
    an error would stop ``import nlgraph`` itself)."""
    value = os.environ.get(env, "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    return default


#: How the delta-rule, linear-attention and online-recurrence kernels multiply float32 operands
#: (``tl.dot``'s ``input_precision``), from ``NLGRAPH_FP32_PRODUCTS``: ``ieee``, exact float32
#: products on the CUDA cores, or ``tf32x3``, three TF32 tensor-core products per product (each
#: operand split into a high and a low TF32 part; about float32's accuracy). Compiled for sm_90 at a
#: key width of 128, ``ieee`` makes the delta rule's kernels spill up to 12 KB a thread; on an H100
#: its float32 forward + backward ran 9–10x slower than with ``tf32x3``, whose results were within
#: 4.3e-7 of float64 there (docs/benchmarks.md). Unset, each kernel takes the mode it was checked
#: with on a GPU: ``tf32x3`` for the per-head delta rule, linear attention (scalar or per-channel
#: decay: within 2.3e-6 of float64 on an H100) and the online recurrence (within 2.2e-6), ``ieee``
#: for the per-channel delta rule, whose float32 backward asked for 265 KiB of shared memory with
#: ``tf32x3`` on the H100 (227 KiB there). Titans' MLP memory keeps ``ieee`` (``tf32x3`` spills more
#: there). 16-bit operands take TF32 products of their float32 intermediates either way.
FP32_PRODUCTS = os.environ.get("NLGRAPH_FP32_PRODUCTS", "").strip().lower() or None
_FP32_CHOICES = ("ieee", "tf32x3")


#: The widest key that takes ``tf32x3`` in float32: wider keys keep ``ieee`` whatever the variable
#: says. On an H100 the per-channel delta rule's float32 backward at 256 asked for 265 KiB of shared
#: memory with ``tf32x3`` (227 KiB there), and compiled for sm_90 float32 linear attention's state
#: kernel at 256 asks for 328,200 bytes with it (232,448 there; 229,896 with ``ieee``).
TF32X3_MAX_KEY = 128


def products(dtype: torch.dtype, unset: str = "ieee", key: int = 0) -> str:
    """``tl.dot``'s ``input_precision`` for a kernel whose operands arrive in ``dtype``; ``unset``:
    float32's mode when ``NLGRAPH_FP32_PRODUCTS`` is not set; ``key``: the key width, past
    :data:`TF32X3_MAX_KEY` of which float32 stays ``ieee``."""
    if dtype != torch.float32:
        return "tf32"
    mode = FP32_PRODUCTS or unset
    if mode not in _FP32_CHOICES:
        raise NLGraphError(f"unknown float32 product mode {mode!r}; set it to one of "
                           f"{', '.join(_FP32_CHOICES)}, or unset it", path="NLGRAPH_FP32_PRODUCTS")
    return "ieee" if mode == "tf32x3" and key > TF32X3_MAX_KEY else mode


# --------------------------------------------------------------------------- precompile

#: Precompile: the kernels of an op's first call per shape class compile in parallel threads before
#: it launches them (see :func:`precompile`); ``NLGRAPH_TRITON_PRECOMPILE=0`` leaves each kernel to
#: compile at its first launch, one after another.
PRECOMPILE = switch("NLGRAPH_TRITON_PRECOMPILE", True)
#: One entry per :func:`precompile` that ran: its key, kernel launches, threads and seconds, or the
#: error that stopped it (``benchmarks/compile_check.py`` reports them).
PRECOMPILE_LOG: list[dict] = []
_RECORDING = threading.local()  # .log: the launches of the dry run this thread is in
_DONE: set = set()
# a process that has seen this many shape classes (a server answering every prompt length) has
# compiled its kernels long ago: stop dry-running new ones
_MAX_KEYS = 256


class _Arg:
    """What a recorded launch keeps of a tensor argument: what Triton specializes a kernel on (the
    dtype, and the address for its 16-byte alignment) and what the autotuners' pruning reads (the
    device, the element size); not the tensor, so a dry run's buffers are freed as it goes."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype, self.device, self._ptr, self._size = t.dtype, t.device, t.data_ptr(), t.element_size()

    def data_ptr(self) -> int:
        return self._ptr

    def element_size(self) -> int:
        return self._size


class _Recorder:
    """Stands for a kernels namespace during a dry run: ``kn.name[grid](*args, **kw)`` records the
    launch (kernel name, kernel, grid, arguments with tensors as :class:`_Arg`) instead of making it."""

    def __init__(self, kernels: Any, log: list) -> None:
        self._kernels, self._log = kernels, log

    def __getattr__(self, name: str) -> Any:
        kernel, log = getattr(self._kernels, name), self._log

        def arg(a):
            return _Arg(a) if isinstance(a, torch.Tensor) else a

        class _Launch:
            recording = True  # a dry run's launch: callers that launch one kernel many times record one

            def __getitem__(self, grid):
                return lambda *args, **kwargs: log.append(
                    (name, kernel, grid, tuple(arg(a) for a in args), {k: arg(v) for k, v in kwargs.items()}))

        return _Launch()


def _record(dry_run: Callable[[], Any]) -> list:
    """The launches ``dry_run`` makes in this thread, recorded (``(name, kernel, grid, args,
    kwargs)``), none made."""
    outer = getattr(_RECORDING, "log", None)
    _RECORDING.log = []
    try:
        with torch.no_grad():
            dry_run()
        return _RECORDING.log
    finally:
        _RECORDING.log = outer


def call_key(op: str, pass_: str, args: tuple) -> tuple:
    """A :func:`precompile` key from an op's arguments: each tensor's dtype, device and shape (the
    shapes give the integer arguments Triton specializes the kernels on), the rest as they are. A
    new shape costs a dry run, whose warm-ups find the kernels already compiled."""
    def one(a):
        return (a.dtype, str(a.device), tuple(a.shape)) if isinstance(a, torch.Tensor) else a

    return (op, pass_, *(one(a) for a in args))


def run_precompiled(op: str, pass_: str, fn: Callable[..., Any], args: tuple, device: torch.device) -> Any:
    """``fn(*args)``, a pass of a Triton op, after :func:`precompile` of the kernels it launches
    (keyed by :func:`call_key`)."""
    precompile(call_key(op, pass_, args), lambda: fn(*args), device)
    return fn(*args)


def precompile(key: Hashable, dry_run: Callable[[], Any], device: torch.device) -> None:
    """Precompile: compile, in parallel threads, every Triton kernel that ``dry_run`` would launch,
    once per ``key`` (the shapes and flags that decide the kernels' specializations).

    An op's first call compiles each of its kernels at its launch, one after another in this
    process; Triton spends most of a compile in C++ passes and ``ptxas``, outside the GIL, so
    threads overlap them (a cold float32 Gated DeltaNet compile on an H100 spent 73 s compiling its
    Triton kernels one at a time, docs/benchmarks.md). ``dry_run`` runs the op's Python with every
    kernel namespace recording launches instead of making them (its outputs are garbage); each
    recorded kernel is then warmed up (compiled, not run) under Triton's ``AsyncCompileMode``, and
    the compiled kernels enter the kernels' caches, so the real launches that follow find them (an
    autotuned kernel compiles each config its pruning keeps). Nothing happens for tensors off CUDA
    (``device``), during CUDA-graph capture, with ``NLGRAPH_TRITON_PRECOMPILE=0``, or on a Triton
    without ``AsyncCompileMode``. A dry run that raises is left to the real call, which raises the
    same error; a kernel that fails to compile in a thread compiles (and fails, or is scored out by
    its autotuner) at its launch; anything else is one warning, and the launches compile as before.
    """
    if (not PRECOMPILE or device.type != "cuda" or key in _DONE or len(_DONE) >= _MAX_KEYS
            or torch.cuda.is_current_stream_capturing()):
        return
    _DONE.add(key)
    try:
        from triton.runtime import _async_compile
    except ImportError:  # an older Triton: its compiles stay one after another
        return
    if _async_compile.active_mode.get() is not None:  # a caller's own asynchronous compile: leave it be
        return
    entry: dict = {"key": repr(key)}
    t0 = time.perf_counter()
    try:
        log = _record(dry_run)
    except Exception:  # noqa: BLE001 - the real call raises it, with its own message
        return
    threads = max(1, min(len(log), os.cpu_count() or 1, 16))
    try:
        # ignore_errors: a kernel that fails in a thread is not finalized; its launch compiles it again
        with ThreadPoolExecutor(threads, thread_name_prefix="nlgraph-precompile") as pool, \
                _async_compile.AsyncCompileMode(pool, ignore_errors=True):
            for _, kernel, grid, args, kwargs in log:
                kernel.warmup(*args, grid=grid, **kwargs)
        entry.update(launches=[name for name, *_ in log], threads=threads)
    except Exception as e:  # noqa: BLE001 - the launches compile one by one instead
        entry["error"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"nlgraph: precompiling the Triton kernels in parallel failed ({entry['error']}); they "
                      "compile at their launches instead. NLGRAPH_TRITON_PRECOMPILE=0 skips the attempt.",
                      RuntimeWarning, stacklevel=2)
    finally:
        # Triton leaves its mode set when a compile failed on the way out of the block: later
        # compiles in this thread would go to the closed pool
        _async_compile.active_mode.set(None)
    entry["s"] = round(time.perf_counter() - t0, 3)
    PRECOMPILE_LOG.append(entry)


def cdiv(a: int, b: int) -> int:
    """``⌈a / b⌉``: how many blocks of ``b`` cover ``a``."""
    return -(-a // b)


def pow2(n: int) -> int:
    """The block a dimension of ``n`` is held in: the next power of two, at least 16 (``tl.dot``'s
    smallest)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


#: The narrowest tile the delta-rule and linear-attention kernels hold a head in on CUDA: a head of
#: 16 or fewer columns is zero-padded to it (:func:`pad_heads`). On an H100 (triton 3.6, 2026-12-07;
#: `benchmarks/small_heads.py`, docs/benchmarks.md "Heads narrower than 32 on the GPU") the delta rule
#: at heads of 8 and 16, whose tiles are 16 wide, raised illegal memory accesses in float32 and
#: returned wrong values in bfloat16 (relative error 1.6–1.8), and linear attention at 16 with a
#: strong decay wrong gradients (1.5); heads of 32 and 64 passed in the same calls. Zeros in the
#: padded key and value columns leave the real columns' function unchanged (the state's padded rows
#: and columns stay zero).
MIN_CUDA_HEAD = 32
#: Pad on every device, not only CUDA (the tests, to check the padding under Triton's interpreter).
PAD_EVERYWHERE = False


def pad_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
              h0: torch.Tensor | None) -> tuple[tuple, tuple[int, int] | None]:
    """``((q, k, v, g, h0), None)`` as given, or on CUDA, with a key or value width of 16 or less
    (held in a tile narrower than :data:`MIN_CUDA_HEAD`), those five zero-padded to it (``q``, ``k``
    and a per-key-channel ``g`` on their last dim when the keys are narrow, ``v`` when the values
    are, ``h0 [B, H, Dk, Dv]`` on both) with the original ``(Dk, Dv)`` to cut the output and final
    state back to. Differentiable: the real columns' gradients are the unpadded function's."""
    dk, dv = q.shape[-1], v.shape[-1]
    if not (q.device.type == "cuda" or PAD_EVERYWHERE) or min(pow2(dk), pow2(dv)) >= MIN_CUDA_HEAD:
        return (q, k, v, g, h0), None  # widths of 17 to 31 are held in 32-wide tiles already
    pk, pv = (MIN_CUDA_HEAD - n if pow2(n) < MIN_CUDA_HEAD else 0 for n in (dk, dv))
    pad = torch.nn.functional.pad
    q, k, v = pad(q, (0, pk)), pad(k, (0, pk)), pad(v, (0, pv))
    if g is not None and g.dim() == 4:  # log decay 0 on the padded channels: their rows stay zero anyway
        g = pad(g, (0, pk))
    if h0 is not None:
        h0 = pad(h0, (0, pv, 0, pk))
    return (q, k, v, g, h0), (dk, dv)


# The kernels with a decay per key channel run 32 tokens a chunk, whatever chunk the caller asks for:
# the function does not depend on the chunk, and 32 is the chunk their checks passed at on the H200.
# There (B=4, T=4096, H=16, D=128, bf16; benchmarks/linear_attention_kernel.py --channel) GLA's
# forward+backward took 16.5 ms at chunk 64, 9.4 ms at 32 and 8.9 at 16 (unchecked there), and the
# delta rule's per-channel backward at Dk=128 and chunk 64 asked for 262,144 bytes of shared memory,
# over the 232,448 there. ``None`` runs the chunk asked for (the kernels' own tests, at every chunk).
CHANNEL_CHUNK: int | None = 32

#: Warps of the per-channel forms' backward kernels (KDA's ``dv_local`` and ``grads``, GLA's
#: ``grads_channel``; their forwards stay on Triton's 4). When chosen (the kernels have changed since;
#: docs/benchmarks.md has the current spills and times), compiled for sm_90, KDA's ``grads`` spilled
#: 2,192 bytes a thread on 4 warps and 984 on 8, GLA's ``grads_channel`` 1,584 and 160; on an H100 at
#: B=4, T=4096, H=16, D=128, bf16, KDA's forward + backward took 9.10 ms with every plain kernel on 8
#: warps against 13.69 ms on 4 in one run (its forward 2.94 against 2.70), and GLA's 5.61 ms with
#: ``grads_channel`` on 8 against 6.22–6.30 on 4 (earlier runs on other machines of the same card).
CHANNEL_BACKWARD_WARPS = 8
# The widest keys the per-channel kernels take on CUDA: their GPU checks went up to Dk=128 (256
# compiles within the shared memory, benchmarks/kernel_resources.py, but is unchecked there).
CHANNEL_MAX_KEY_CUDA = 128


def kernel_chunk(g: torch.Tensor | None, chunk: int) -> int:
    """The chunk a kernel runs: ``chunk``, or ``CHANNEL_CHUNK`` for ``g`` per key channel
    (``[B, T, H, Dk]``)."""
    return CHANNEL_CHUNK if CHANNEL_CHUNK is not None and g is not None and g.dim() == 4 else chunk
