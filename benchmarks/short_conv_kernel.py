"""Check and time the short-convolution kernels (``nlgraph.compilers.kernels.short_conv``) on a GPU at
several warp counts, against a float64 reference and, in the same process, fla's ``causal_conv1d``.

    bash benchmarks/device.sh python benchmarks/short_conv_kernel.py --warps 4 8 16 --json "$OUT/conv.json"

The kernels launch on Triton's default of 4 warps; fla autotunes its convolution over 4 to 32, and at
a d_model-512 layer's shape its forward took 14 µs a stream against nlgraph's 22.5 on an H100
(docs/benchmarks.md, "Pipelining depth"). This measures what another count would do before the
launch changes: for each count in ``--warps`` (every kernel of the op launched with it,
``_launch.plain_warps``)

- checks: the op's output and the gradients of its input, taps and state against float64
  ``x̃ = cat(state or zeros, x)``, ``a[t] = Σ_j w[:, j] x̃[t + j]``, ``act(a)``: SiLU and identity,
  with and without a state, a partial token block, float32 (limit 1e-5) and bfloat16 (2e-2);
- timing (``--no-timing`` skips it): forward and forward + backward at ``--batch``, ``--length``,
  ``--channels`` (default one stream of a d_model-512 layer at B=8, T=2048), 4 taps, SiLU,
  bfloat16, median of ``--reps`` CUDA-event timings, and fla's ``causal_conv1d`` on the same input
  when fla is installed.

``--tiles 64x64 128x64 ...`` repeats the checks and timings for each token × channel tile of the
three kernels (``short_conv._BT``, ``_BC``; the launch's is ``short_conv.DEFAULT_TILE``, 64x128) at the first of ``--warps``, and
times each tile's forward op and backward op alone as the GPU's time a call: a CUDA graph of
``--graph-calls`` launches replayed, so the host's launch cost drops out (the per-call timings above
are host-bound at this size: 0.08 ms a forward call against 22.5 µs of kernel).

``--da float32 input`` checks the backward with ``da`` (``_conv_da``'s output, ``_conv_dx``'s input)
stored each way (``short_conv._DA16``; ``input`` is the default: bfloat16 for bfloat16 inputs) at the
first of ``--warps`` and times the backward op alone each way, as the GPU's time a call; ``--dw rows
inner atomic`` does the same for how the weight's gradient is summed over programs (``short_conv._DW``).

Without CUDA it says so and exits 0, unless ``--device cpu`` runs the checks under Triton's
interpreter (``TRITON_INTERPRET=1``; float32 only, the interpreter lacks bfloat16): how its tests
run it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import plain_warps  # noqa: E402

MODULES = ("_short_conv_triton",)
# (name, (B, T, C, K), dtype, with a state, SiLU, l2: the head size of a fused L2 norm, or None)
CHECKS = [
    ("fp32 silu + state, T=100 (a partial block)", (2, 100, 96, 4), torch.float32, True, True, None),
    ("fp32 identity, no state", (2, 130, 64, 4), torch.float32, False, False, None),
    ("fp32 silu + state + L2 norm, heads of 32", (2, 100, 96, 4), torch.float32, True, True, 32),
    ("bf16 silu + state", (2, 300, 512, 4), torch.bfloat16, True, True, None),
    ("bf16 silu, no state", (2, 300, 512, 4), torch.bfloat16, False, True, None),
    ("bf16 silu + L2 norm, heads of 64", (2, 300, 512, 4), torch.bfloat16, False, True, 64),
    ("bf16 silu + state + L2 norm, heads of 128", (2, 300, 512, 4), torch.bfloat16, True, True, 128),
]


def reference(x, w, s, silu: bool, l2: int | None = None) -> torch.Tensor:
    """float64 causal depthwise convolution: ``x [B, T, C]``, ``w [C, K]``, ``s [B, K−1, C]`` or
    ``None``; then each head of ``l2`` channels divided by its norm (``max(‖y‖, 1e-6)``)."""
    b, t, c = x.shape
    k = w.shape[1]
    pad = s if s is not None else x.new_zeros(b, k - 1, c)
    xt = torch.cat([pad, x], dim=1)
    a = sum(w[:, j] * xt[:, j:j + t] for j in range(k))
    y = a * torch.sigmoid(a) if silu else a
    if l2:
        y3 = y.unflatten(-1, (c // l2, l2))
        y = (y3 / y3.norm(dim=-1, keepdim=True).clamp_min(1e-6)).flatten(-2)
    return y


@contextlib.contextmanager
def tile(shape: tuple[int, int] | None):
    """Inside, the three kernels launch on token × channel tiles ``shape`` (``None``: as they are)."""
    from nlgraph.compilers.kernels import short_conv as op

    saved = (op._BT, op._BC)
    if shape is not None:
        op._BT, op._BC = shape
    try:
        yield
    finally:
        op._BT, op._BC = saved


def parse_tile(text: str) -> tuple[int, int]:
    """A ``--tiles`` entry, by the rule ``NLGRAPH_CONV_TILE`` follows (``short_conv._tile``)."""
    from nlgraph.compilers.kernels.short_conv import _tile

    shape = _tile(text)
    if isinstance(shape, str):
        raise argparse.ArgumentTypeError(shape)
    return shape


def graph_ms(fn, dev: torch.device, calls: int, reps: int = 20) -> float:
    """The GPU's ms a call of ``fn``: ``calls`` calls captured in one CUDA graph, replayed ``reps``
    times between events (median), so the host's launch time is not in it."""
    for _ in range(3):  # compile and allocate outside the capture
        fn()
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def run_checks(device: str, warps: int | None, dtypes: tuple, shape: tuple[int, int] | None = None) -> list[dict]:
    from nlgraph.bench import rel_err as rel
    from nlgraph.compilers.kernels.short_conv import short_conv

    rows = []
    for name, (b, t, c, k), dtype, with_state, silu, l2 in CHECKS:
        if dtype not in dtypes:
            continue
        limit = 1e-5 if dtype == torch.float32 else 2e-2
        row = {"check": name, "warps": warps, "tile": list(shape) if shape else None, "limit": limit}
        try:
            gen = torch.Generator(device=device).manual_seed(t + c)
            x = torch.randn(b, t, c, device=device, generator=gen).to(dtype)
            w = (0.5 * torch.randn(c, k, device=device, generator=gen))
            s = torch.randn(b, k - 1, c, device=device, generator=gen).to(dtype) if with_state else None
            dy = torch.randn(b, t, c, device=device, generator=gen).to(dtype)
            leaves = [a.clone().requires_grad_() for a in (x, w) + ((s,) if s is not None else ())]
            with plain_warps(warps, MODULES), tile(shape):
                y = short_conv(leaves[0], leaves[1], leaves[2] if s is not None else None,
                               "silu" if silu else "identity", l2)
                y.backward(dy)
            ref_leaves = [a.detach().double().requires_grad_() for a in leaves]
            yr = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if s is not None else None, silu, l2)
            yr.backward(dy.double())
            errors = {"y": rel(y.detach(), yr.detach()), "dx": rel(leaves[0].grad, ref_leaves[0].grad),
                      "dw": rel(leaves[1].grad, ref_leaves[1].grad)}
            if s is not None:
                errors["ds"] = rel(leaves[2].grad, ref_leaves[2].grad)
            row.update(errors=errors, max_rel_err=max(errors.values()))
            row["ok"] = row["max_rel_err"] <= limit
        except Exception as e:  # noqa: BLE001  (a failing config is the finding: report it, go on)
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def run_timings(args, dev: torch.device) -> list[dict]:
    from nlgraph.bench import median_ms
    from nlgraph.compilers.kernels.short_conv import normalize_heads, short_conv

    gen = torch.Generator(device=dev).manual_seed(0)
    b, t, c, k = args.batch, args.length, args.channels, 4
    x = torch.randn(b, t, c, device=dev, generator=gen).to(torch.bfloat16).requires_grad_()
    w = (0.5 * torch.randn(c, k, device=dev, generator=gen)).requires_grad_()
    dy = torch.randn(b, t, c, device=dev, generator=gen).to(torch.bfloat16)

    def timed(name, fwd, warps=None):
        def f_b():
            x.grad = w.grad = wf.grad = None
            fwd().backward(dy)

        row = {"impl": name, "warps": warps}
        try:
            with plain_warps(warps, MODULES):
                with torch.no_grad():
                    row["fwd_ms"] = median_ms(fwd, dev, reps=args.reps, warmup=3)
                row["fwd_bwd_ms"] = median_ms(f_b, dev, reps=args.reps, warmup=3)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        print(json.dumps(row), flush=True)
        return row

    rows = []
    wf = w.detach().to(torch.bfloat16).requires_grad_()  # fla's taps, in the input's dtype
    try:  # an optional anchor, never a dependency
        from fla.modules.causal_conv1d import causal_conv1d

        def theirs():
            return causal_conv1d(x, wf, activation="silu")[0]

        rows.append(timed("fla causal_conv1d", theirs))
    except ImportError as e:
        print(json.dumps({"note": f"fla's causal_conv1d not timed ({e})"}), flush=True)
    for warps in args.warps:
        rows.append(timed("nlgraph short_conv", lambda: short_conv(x, w, None, "silu"), warps))
    # a stream's conv + SiLU + L2 norm over heads of 64: fused, and the norm as a pass of its own
    rows.append(timed("nlgraph short_conv + L2 norm (fused, heads of 64)",
                      lambda: short_conv(x, w, None, "silu", 64), args.warps[0]))
    rows.append(timed("nlgraph short_conv, then F.normalize (heads of 64)",
                      lambda: normalize_heads(short_conv(x, w, None, "silu"), 64), args.warps[0]))
    return rows


def run_tile_timings(args, dev: torch.device) -> list[dict]:
    """Each tile's forward op and backward op alone, GPU time a call (:func:`graph_ms`), at the
    first of ``--warps``; fla's ``causal_conv1d`` forward the same way."""
    import nlgraph.compilers.kernels.short_conv  # noqa: F401  (registers the ops)

    gen = torch.Generator(device=dev).manual_seed(0)
    b, t, c, k = args.batch, args.length, args.channels, 4
    x = torch.randn(b, t, c, device=dev, generator=gen).to(torch.bfloat16)
    w = 0.5 * torch.randn(c, k, device=dev, generator=gen)
    dy = torch.randn(b, t, c, device=dev, generator=gen).to(torch.bfloat16)
    moved = 2 * x.numel() * x.element_size()  # the forward reads x and writes y
    rows = []
    try:
        from fla.modules.causal_conv1d import causal_conv1d

        wf = w.to(torch.bfloat16)
        ms = graph_ms(lambda: causal_conv1d(x, wf, activation="silu"), dev, args.graph_calls)
        rows.append({"impl": "fla causal_conv1d", "fwd_gpu_ms": ms, "fwd_tb_s": moved / ms / 1e9})
        print(json.dumps(rows[-1]), flush=True)
    except Exception as e:  # noqa: BLE001  (an optional anchor)
        print(json.dumps({"note": f"fla's causal_conv1d not graph-timed ({type(e).__name__}: {e})"}), flush=True)
    fwd, bwd = torch.ops.nlgraph.short_conv_fwd, torch.ops.nlgraph.short_conv_bwd
    for shape in args.tiles:
        row = {"impl": "nlgraph short_conv", "tile": list(shape), "warps": args.warps[0]}
        try:
            with plain_warps(args.warps[0], MODULES), tile(shape):
                row["fwd_gpu_ms"] = graph_ms(lambda: fwd(x, w, None, True), dev, args.graph_calls)
                row["bwd_gpu_ms"] = graph_ms(lambda: bwd(x, w, None, dy, True), dev, args.graph_calls)
            row["fwd_tb_s"] = moved / row["fwd_gpu_ms"] / 1e9
        except Exception as e:  # noqa: BLE001  (a tile that does not compile or fit is the finding)
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# the backward's module switches --da and --dw set: option -> (short_conv attribute, {choice: value})
SWITCHES = {"da": ("_DA16", {"float32": False, "input": True}),
            "dw": ("_DW", {"rows": "rows", "inner": "inner", "atomic": "atomic"})}


@contextlib.contextmanager
def switched(option: str, choice: str | None):
    """``short_conv``'s attribute behind ``--OPTION`` set to ``choice``'s value for the block
    (``None`` leaves it)."""
    from nlgraph.compilers.kernels import short_conv as op

    attr, values = SWITCHES[option]
    saved = getattr(op, attr)
    setattr(op, attr, saved if choice is None else values[choice])
    try:
        yield
    finally:
        setattr(op, attr, saved)


def run_switch_timings(args, dev: torch.device, option: str) -> list[dict]:
    """The backward op alone (SiLU, no state, bfloat16) at each choice of ``--OPTION``, GPU time a
    call (:func:`graph_ms`) at the launch's tile and the first of ``--warps``, with the bytes it
    must move at least (x and dy read, dx written) over that time."""
    import nlgraph.compilers.kernels.short_conv  # noqa: F401  (registers the ops)

    gen = torch.Generator(device=dev).manual_seed(0)
    b, t, c, k = args.batch, args.length, args.channels, 4
    x = torch.randn(b, t, c, device=dev, generator=gen).to(torch.bfloat16)
    w = 0.5 * torch.randn(c, k, device=dev, generator=gen)
    dy = torch.randn(b, t, c, device=dev, generator=gen).to(torch.bfloat16)
    least = 3 * x.numel() * x.element_size()
    bwd, rows = torch.ops.nlgraph.short_conv_bwd, []
    for choice in getattr(args, option):
        row = {"impl": f"nlgraph short_conv backward ({option} {choice})", "warps": args.warps[0]}
        try:
            with plain_warps(args.warps[0], MODULES), switched(option, choice):
                row["bwd_gpu_ms"] = graph_ms(lambda: bwd(x, w, None, dy, True, 0), dev, args.graph_calls)
            row["bwd_tb_s"] = least / row["bwd_gpu_ms"] / 1e9
        except Exception as e:  # noqa: BLE001  (a backward that does not compile is the finding)
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def best_tile(res: dict) -> str:
    """``BTxBC`` of the fastest tile (forward + backward GPU time) whose checks all passed; the
    launch's default (``short_conv.DEFAULT_TILE``) when none was timed."""
    failed = {tuple(r["tile"]) for r in res.get("checks", []) if r.get("tile") and not r.get("ok")}
    timed = [r for r in res.get("tile_timings", [])
             if "tile" in r and "fwd_gpu_ms" in r and "bwd_gpu_ms" in r and tuple(r["tile"]) not in failed]
    if not timed:
        from nlgraph.compilers.kernels.short_conv import DEFAULT_TILE
        return "{}x{}".format(*DEFAULT_TILE)
    bt, bc = min(timed, key=lambda r: r["fwd_gpu_ms"] + r["bwd_gpu_ms"])["tile"]
    return f"{bt}x{bc}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--tiles", type=parse_tile, nargs="+", default=None, metavar="TxC",
                    help="token x channel tiles to check and graph-time, at the first of --warps")
    ap.add_argument("--graph-calls", type=int, default=50, help="launches a timed CUDA graph holds")
    ap.add_argument("--best-tile", default=None, metavar="JSON",
                    help="print the tile of a --tiles run's JSON with the least forward + backward GPU time among "
                         "those whose checks all passed (as NLGRAPH_CONV_TILE takes it), and exit")
    ap.add_argument("--da", nargs="+", default=None, choices=list(SWITCHES["da"][1]),
                    help="also check (at the first of --warps) and graph-time the backward with da stored in float32 "
                         "or in the input dtype (short_conv._DA16)")
    ap.add_argument("--dw", nargs="+", default=None, choices=list(SWITCHES["dw"][1]),
                    help="also check and graph-time the backward with the weight's partial sums laid out "
                         "[programs, C*K] (rows) or [C*K, programs] (inner), or added with atomics (atomic) "
                         "(short_conv._DW)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--device", default=None, help="cuda (default when there is one) or cpu (the interpreter)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.best_tile:
        print(best_tile(json.loads(Path(args.best_tile).read_text())))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("short_conv_kernel: no CUDA device here; nothing to check or time (--device cpu checks under "
              "TRITON_INTERPRET=1)")
        return 0
    dev = torch.device(device)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)",
           "torch": torch.__version__, "checks": [], "timings": []}
    print(json.dumps({k: res[k] for k in ("device", "torch")}), flush=True)
    dtypes = (torch.float32, torch.bfloat16) if dev.type == "cuda" else (torch.float32,)
    for warps in args.warps if dev.type == "cuda" else [None]:  # the interpreter has no warps
        res["checks"] += run_checks(device, warps, dtypes)
    for shape in args.tiles or []:
        res["checks"] += run_checks(device, args.warps[0] if dev.type == "cuda" else None, dtypes, shape)
    for option in SWITCHES:
        for choice in getattr(args, option) or []:
            with switched(option, choice):
                rows = run_checks(device, args.warps[0] if dev.type == "cuda" else None, dtypes)
            res["checks"] += [dict(r, check=f"{r['check']} ({option} {choice})", **{option: choice}) for r in rows]
    if dev.type == "cuda" and not args.no_timing:
        res["timings"] = run_timings(args, dev)
        if args.tiles:
            res["tile_timings"] = run_tile_timings(args, dev)
        for option in SWITCHES:
            if getattr(args, option):
                res[f"{option}_timings"] = run_switch_timings(args, dev, option)
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps(res, indent=1).encode())
    failed = [r["check"] for r in res["checks"] if not r.get("ok")]
    if failed:
        print(f"short_conv_kernel: {len(failed)} check(s) failed: {'; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
