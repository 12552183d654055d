"""Loading a kernel module's Triton kernels on first use, with one error for each way it can fail, and
the block-size arithmetic the kernels' wrappers share."""

from __future__ import annotations

import os
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
    """``kernels`` (a module's namespace of kernels), or during :func:`precompile`'s dry run a
    stand-in that records their launches. Every op's kernel lookup passes through here."""
    # a plain global, not a ContextVar: Dynamo traces the wrappers that call this, and reads a global
    return kernels if _RECORDING is None else _Recorder(kernels, _RECORDING)


# --------------------------------------------------------------------------- parallel first compile

#: Compile the kernels of an op's first call in parallel threads (see :func:`precompile`);
#: ``NLGRAPH_TRITON_PRECOMPILE=0`` leaves each kernel to compile at its first launch, one after another.
PRECOMPILE = os.environ.get("NLGRAPH_TRITON_PRECOMPILE", "1") != "0"
#: One entry per :func:`precompile` that compiled: its key, kernel launches, threads and seconds, or
#: the error that stopped it (``benchmarks/compile_check.py`` reports them).
PRECOMPILE_LOG: list[dict] = []
_RECORDING: list | None = None  # the launches of the dry run in progress
_DONE: set = set()
# a process that has seen this many shape classes (a server answering every prompt length) has
# compiled its kernels long ago: stop dry-running new ones
_MAX_KEYS = 256


class _Recorder:
    """Stands for a kernels namespace during a dry run: ``kn.name[grid](*args, **kw)`` records the
    launch (kernel, grid, arguments) instead of launching."""

    def __init__(self, kernels: Any, log: list) -> None:
        self._kernels, self._log = kernels, log

    def __getattr__(self, name: str) -> Any:
        kernel, log = getattr(self._kernels, name), self._log

        class _Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: log.append((name, kernel, grid, args, kwargs))

        return _Launch()


def _record(dry_run: Callable[[], Any]) -> list:
    """The launches ``dry_run`` makes, recorded (``(name, kernel, grid, args, kwargs)``), none made."""
    global _RECORDING
    outer, _RECORDING = _RECORDING, []
    try:
        with torch.no_grad():
            dry_run()
        return _RECORDING
    finally:
        _RECORDING = outer


def call_key(op: str, pass_: str, args: tuple) -> tuple:
    """A :func:`precompile` key from an op's arguments: each tensor's dtype, device and shape (the
    shapes give the integer arguments Triton specializes the kernels on), the rest as they are. A
    new shape costs a dry run, whose warm-ups find the kernels already compiled."""
    def one(a):
        return (a.dtype, str(a.device), tuple(a.shape)) if isinstance(a, torch.Tensor) else a

    return (op, pass_, *(one(a) for a in args))


def precompile(key: Hashable, dry_run: Callable[[], Any]) -> None:
    """Compile, in parallel threads, every Triton kernel that ``dry_run`` would launch, once per
    ``key`` (the shapes and flags that decide the kernels' specializations).

    An op's first call compiles each of its kernels at its launch, one after another in this
    process; Triton spends most of a compile in C++ passes and ``ptxas``, outside the GIL, so
    threads overlap them (a cold Gated DeltaNet compile on an H100 spent 73 s compiling the delta
    rule's kernels one at a time, docs/benchmarks.md). ``dry_run`` runs the op's Python with every
    ``load_kernels`` namespace recording launches instead of making them (its outputs are garbage);
    each recorded kernel is then warmed up (compiled, not run) under Triton's ``AsyncCompileMode``
    and the compiled kernels enter the kernels' caches, so the real launches that follow find them
    (an autotuned kernel compiles each config its pruning keeps). On CPU (the interpreter), during
    CUDA-graph capture, with ``NLGRAPH_TRITON_PRECOMPILE=0``, or on a Triton without
    ``AsyncCompileMode``, nothing happens; a failure is a warning, and the launches then compile
    as before."""
    if (not PRECOMPILE or key in _DONE or len(_DONE) >= _MAX_KEYS or not torch.cuda.is_available()
            or torch.cuda.is_current_stream_capturing()):
        return
    _DONE.add(key)
    entry: dict = {"key": repr(key)}
    t0 = time.perf_counter()
    try:
        from triton.runtime._async_compile import AsyncCompileMode

        log = _record(dry_run)
        threads = max(1, min(len(log), os.cpu_count() or 1, 16))
        with ThreadPoolExecutor(threads, thread_name_prefix="nlgraph-precompile") as pool, AsyncCompileMode(pool):
            for _, kernel, grid, args, kwargs in log:
                kernel.warmup(*args, grid=grid, **kwargs)
        entry.update(launches=[name for name, *_ in log], threads=threads)
    except Exception as e:  # noqa: BLE001 - the launches compile one by one instead
        entry["error"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"nlgraph: compiling the Triton kernels in parallel failed ({entry['error']}); they compile "
                      "at their launches instead. NLGRAPH_TRITON_PRECOMPILE=0 skips the attempt.", RuntimeWarning,
                      stacklevel=2)
    entry["s"] = round(time.perf_counter() - t0, 3)
    PRECOMPILE_LOG.append(entry)


def cdiv(a: int, b: int) -> int:
    """``⌈a / b⌉``: how many blocks of ``b`` cover ``a``."""
    return -(-a // b)


def pow2(n: int) -> int:
    """The block a dimension of ``n`` is held in: the next power of two, at least 16 (``tl.dot``'s
    smallest)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


# The kernels with a decay per key channel run 32 tokens a chunk, whatever chunk the caller asks for:
# the function does not depend on the chunk, and 32 is the chunk their checks passed at on the H200.
# There (B=4, T=4096, H=16, D=128, bf16; benchmarks/linear_attention_kernel.py --channel) GLA's
# forward+backward took 16.5 ms at chunk 64, 9.4 ms at 32 and 8.9 at 16 (unchecked there), and the
# delta rule's per-channel backward at Dk=128 and chunk 64 asked for 262,144 bytes of shared memory,
# over the 232,448 there. ``None`` runs the chunk asked for (the kernels' own tests, at every chunk).
CHANNEL_CHUNK: int | None = 32
# The widest keys the per-channel kernels take on CUDA: their GPU checks went up to Dk=128 (256
# compiles within the shared memory, benchmarks/kernel_resources.py, but is unchecked there).
CHANNEL_MAX_KEY_CUDA = 128


def kernel_chunk(g: torch.Tensor | None, chunk: int) -> int:
    """The chunk a kernel runs: ``chunk``, or ``CHANNEL_CHUNK`` for ``g`` per key channel
    (``[B, T, H, Dk]``)."""
    return CHANNEL_CHUNK if CHANNEL_CHUNK is not None and g is not None and g.dim() == 4 else chunk
