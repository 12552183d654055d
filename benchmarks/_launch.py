"""Benchmarks only: launch nlgraph's plain (not autotuned) Triton kernels at another warp count, to
time what a launch setting would do before the product changes it.

    with plain_warps(8):
        ...  # every launch of the linear-attention and per-channel delta-rule kernels, forward and
             # backward, runs with 8, also those whose launch names its own count (the per-channel
             # backward's kernels launch on 8: plain_warps(4) times them as they were)
"""

from __future__ import annotations

import contextlib
import importlib

# the modules whose kernels are plain @triton.jit (the per-head delta-rule kernels autotune theirs)
PLAIN = ("_linear_attention_triton", "_delta_rule_channel_triton")


class _Warps:
    def __init__(self, kernel, warps: int):
        self.kernel, self.warps = kernel, warps

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            kwargs["num_warps"] = self.warps
            return launch(*args, **kwargs)

        return call

    def warmup(self, *args, **kwargs):  # the precompile builds what the launch will run
        kwargs["num_warps"] = self.warps
        return self.kernel.warmup(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def channel_form() -> str:
    """Which form of the per-channel scores this process runs (``NLGRAPH_CHANNEL_TREE``, read when
    the kernels' module is imported): ``"tree"`` or ``"offsets"``."""
    mod = importlib.import_module("nlgraph.compilers.kernels._linear_attention_triton")
    return "tree" if mod.CHANNEL_TREE else "offsets"


def header(dev, check_warps) -> dict:
    """The run's context, printed first and kept in its JSON: a log cut short still says what ran."""
    import json

    import torch

    head = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "check_warps": check_warps,
            "channel_form": channel_form()}
    print(json.dumps(head), flush=True)
    return head


@contextlib.contextmanager
def plain_warps(warps: int | None, modules: tuple[str, ...] = PLAIN):
    """Inside, the kernels of ``modules`` launch with ``warps`` (``None``: as they are)."""
    saved = []
    if warps is not None:
        for name in modules:
            holder = importlib.import_module(f"nlgraph.compilers.kernels.{name}").kernels()
            for attr in [a for a in vars(holder) if not a.startswith("_")]:
                kernel = getattr(holder, attr)
                if hasattr(kernel, "fn"):
                    saved.append((holder, attr, kernel))
                    setattr(holder, attr, _Warps(kernel, warps))
    try:
        yield
    finally:
        for holder, attr, kernel in saved:
            setattr(holder, attr, kernel)


def with_warps(time_rows, impls, ours, warps, inputs, tokens, dev) -> list[dict]:
    """``nlgraph.bench.time_rows`` of ``impls`` (an anchor first, if any) as launched, then of ``ours``
    again with the plain kernels at each count of ``warps``, after the anchor timed again so their
    ratios come from one call. The backward's launches happen outside the timed function, so the
    whole call runs inside ``plain_warps``."""
    def log(line):
        print(line, flush=True)

    anchor = impls[0] if impls[0][2] else None
    rows = time_rows(impls, inputs, tokens, dev, log, anchor[0] if anchor else None, compare=True)
    for w in warps:
        again = [(f"{name}, {w} warps", fn, False) for name, fn, _ in ours]
        with plain_warps(w):
            rows += time_rows(([anchor] if anchor else []) + again, inputs, tokens, dev, log,
                              anchor[0] if anchor else None, compare=True)[1 if anchor else 0:]
    return rows


def kernel_times(prof, reps: int) -> list[tuple[float, float, str]]:
    """``(ms a call, launches a call, kernel name)`` of every CUDA kernel a ``torch.profiler`` run of
    ``reps`` calls recorded, the longest first."""
    out = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if total > 0 and e.count:
            out.append((total / 1e3 / reps, e.count / reps, e.key[:70]))
    return sorted(out, reverse=True)


def kernel_profile(impls, inputs, dev, reps: int = 5, top: int = 12) -> list[dict]:
    """Per-kernel CUDA time of each ``(name, fn, is an anchor)``'s forward and of its forward +
    backward (``torch.profiler``, ``reps`` calls after a warm call), the ``top`` kernels of each by
    time: where one implementation's time goes next to another's, kernel by kernel."""
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name, fn, _ in impls:
        leaves = [x.clone().requires_grad_() for x in inputs]
        try:
            with torch.no_grad():
                grad = torch.randn_like(fn(*inputs))
        except Exception as e:  # noqa: BLE001 - a failing forward is a row that says so; the others run
            rows.append({"impl": name, "phase": "fwd", "error": f"{type(e).__name__}: {str(e)[:160]}"})
            print(json.dumps(rows[-1]), flush=True)
            continue

        def fwd():
            with torch.no_grad():
                fn(*inputs)

        def fwd_bwd():
            for x in leaves:
                x.grad = None
            fn(*leaves).backward(grad)

        for phase, run in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            try:
                run()
                torch.cuda.synchronize(dev)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(reps):
                        run()
                    torch.cuda.synchronize(dev)
            except Exception as e:  # noqa: BLE001 - a refused backward is a row that says so
                rows.append({"impl": name, "phase": phase, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            kernels = kernel_times(prof, reps)
            row = {"impl": name, "phase": phase, "gpu_ms": round(sum(k[0] for k in kernels), 4),
                   "kernels": [{"kernel": k, "ms": round(ms, 4), "calls": calls} for ms, calls, k in kernels[:top]]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows
