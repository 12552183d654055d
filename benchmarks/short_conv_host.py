"""Host cost of the short-convolution op's wrapper, without its kernels: 12 streams (conv 4, SiLU, L2
norm) forward and backward, eager and compiled, with the Triton launches replaced by no-ops, against
the PyTorch path (``conv1d``). CPU only; the kernels' own time is not in it.

    OMP_NUM_THREADS=1 python benchmarks/short_conv_host.py interpret   # the op (launches stubbed)
    OMP_NUM_THREADS=1 python benchmarks/short_conv_host.py off         # conv1d
"""
import os, sys, time
os.environ["TRITON_INTERPRET"]="1"
import torch
from nlgraph.compilers.kernels import dispatch, short_conv as sc
class _Noop:
    def __getitem__(self, grid): return lambda *a, **k: None
class K: fwd = _Noop(); da = _Noop(); dx = _Noop()
sc._kernels = lambda x: K
mode = sys.argv[1]
dispatch.set_kernels(mode)
from nlgraph.layers import Stream
from nlgraph.spec.schema import StreamSpec
torch.manual_seed(0)
ss = [Stream(StreamSpec(conv=4, feature_map="silu", norm="l2"), 16, 2, 8) for _ in range(12)]
x = torch.randn(1, 8, 16, requires_grad=True)
def f(x):
    return sum(s(x)[0].sum() for s in ss)
for name, fn in (("eager", f), ("compiled", torch.compile(f, fullgraph=True))):
    for _ in range(3): fn(x).backward()
    t=time.perf_counter()
    for _ in range(50): fn(x).backward()
    print(mode, name, round((time.perf_counter()-t)/50*1e3, 3), "ms per fwd+bwd of 12 streams")
