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


# The kernels with a decay per key channel tile by at most 32 tokens, whatever chunk the caller asks
# for: the function does not depend on the chunk. On an H200 (B=4, T=4096, H=16, D=128, bf16;
# benchmarks/linear_attention_kernel.py --channel) GLA's forward+backward took 16.5 ms at chunk 64 and
# 9.4 ms at 32, since the scores inside a chunk cost one step per key offset; and the delta rule's
# per-channel backward at Dk=128 and chunk 64 asks for 256 KiB of shared memory, over the 227 KiB there.
CHANNEL_MAX_CHUNK = 32


def kernel_chunk(g: torch.Tensor | None, chunk: int) -> int:
    """The chunk a kernel runs: ``chunk``, or at most ``CHANNEL_MAX_CHUNK`` for ``g`` per key channel
    (``[B, T, H, Dk]``)."""
    return min(chunk, CHANNEL_MAX_CHUNK) if g is not None and g.dim() == 4 else chunk
