"""GPU kernels for nlgraph's execution forms, installed as ``nlgraph.compilers.kernels``.

Each kernel is a differentiable custom op (forward and backward in Triton) that
``torch.compile(fullgraph=True)`` traces through. Triton is imported only when a kernel runs, so this
package imports on machines without it. CUDA tensors run compiled kernels; CPU tensors run the same
kernels under Triton's interpreter (slow; for tests at small shapes).
"""

from .delta_rule import chunk_delta_rule
from .linear_attention import chunk_linear_attention
from .mlp_memory import chunk_mlp_memory

__all__ = ["chunk_delta_rule", "chunk_linear_attention", "chunk_mlp_memory"]
