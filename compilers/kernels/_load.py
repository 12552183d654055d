"""Loading a kernel module's Triton kernels on first use, with one error for each way it can fail, and
the block-size arithmetic the kernels' wrappers share."""

from __future__ import annotations

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
    return mod.kernels()


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
