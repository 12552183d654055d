"""Check and time nlgraph's Triton (gated) delta-rule kernels on a GPU, in one process.

    python benchmarks/kernels.py --out kernels.json           # checks, then B=4 T=4096 H=16 D=128 bf16
    bash benchmarks/device.sh python benchmarks/kernels.py --out "$OUT/kernels.json"   # on the GPU tool

1. **Checks.** ``nlgraph.compilers.kernels.chunk_delta_rule`` against nlgraph's own forms of the
   ``delta_rule`` level run in float64 on the same (rounded) inputs: the token-by-token ``reference``
   at a small fp32 shape, the exact chunked WY form at bf16 shapes. Compared: the output, the final
   state and the gradients of q, k, v, β, the log decay g and the initial state, as
   ‖x − ref‖ / ‖ref‖. Limits: 1e-4 for fp32 inputs (ieee dots), 2e-2 for bf16. Triton 3.4–3.7 has
   miscompiled backward kernels on Hopper, so a FAIL here means the timings below are of a wrong
   kernel. A ``torch.compile(fullgraph=True)`` (inductor) call is checked against eager too.
2. **Timings** at the anchor shape, CUDA events around each call (warm-up, then the median of
   ``--reps``), forward and forward + backward, with the extra peak memory of one forward + backward
   and the first call's seconds (compile + autotune): the Triton kernels (plain and gated), nlgraph's
   PyTorch chunked form (eager), and fla's ``chunk_delta_rule`` / ``chunk_gated_delta_rule`` when fla
   is importable (relative error of the outputs against fla's where the function is the same).
3. ``--profile``: the CUDA kernels of one forward + backward, by total time: nlgraph's delta rule with
   and without a decay, and fla's ``chunk_delta_rule``.

``--resources`` instead compiles every kernel for sm_90 with each autotune config and every warp count
``NLGRAPH_TRITON_WARPS`` allows, on any machine (no GPU: triton ships ptxas and cuobjdump), and prints
registers, spills, shared memory and the count of wgmma (HGMMA) instructions:
``python benchmarks/kernels.py --resources`` (``benchmarks/kernel_resources.py`` for the other kernels).

``NLGRAPH_TRITON_WARPS=2`` (or ``4``, ``8``, ``4,8``) sets the warp counts every kernel's autotuner may
pick (default: 4 and 8, the three heavy backward kernels 8 only): a way around a Hopper miscompile if
a check FAILs. Without CUDA it says so and exits 0. The table is printed last; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from nlgraph.io import atomic_write

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_launch.py
from _launch import kernel_times  # noqa: E402

try:  # the anchors are optional
    from fla.ops.delta_rule import chunk_delta_rule as fla_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gated_delta_rule

    HAVE_FLA = True
except Exception:  # noqa: BLE001  (any import failure just drops the fla rows)
    HAVE_FLA = False


UNGUARDED = "fla chunk_gated_delta_rule, guard lifted"  # time only: its values are wrong on triton 3.4-3.7.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_inputs(b, t, h, dk, dv, dtype, *, gated, with_h0, seed, device):
    """q, k unit-norm, v normal, β = sigmoid(U(0, 1)), g = log α with α ∈ (0.9, 1) (fp32), h0 normal."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = {
        "q": F.normalize(torch.randn(b, t, h, dk, device=device, generator=gen), dim=-1).to(dtype),
        "k": F.normalize(torch.randn(b, t, h, dk, device=device, generator=gen), dim=-1).to(dtype),
        "v": torch.randn(b, t, h, dv, device=device, generator=gen).to(dtype),
        "beta": torch.rand(b, t, h, device=device, generator=gen).sigmoid().to(dtype),
    }
    if gated:
        x["g"] = (0.9 + 0.1 * torch.rand(b, t, h, device=device, generator=gen)).log()
    if with_h0:
        x["h0"] = torch.randn(b, h, dk, dv, device=device, generator=gen)
    return x


def ours(x: dict, scale: float, chunk: int, final: bool):
    from nlgraph.compilers.kernels import chunk_delta_rule

    return chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x.get("g"), initial_state=x.get("h0"),
                            output_final_state=final, scale=scale, chunk=chunk, value_beta=x.get("value_beta"))


def reference(x: dict, scale: float, form: str):
    """nlgraph's delta_rule level in float64: ``memory = hᵀ``, ``decay = exp(g)``, output × scale."""
    from nlgraph.compilers.delta_rule import delta_rule_chunked, delta_rule_reference
    from nlgraph.spec.schema import DeltaRuleSpec

    b, _, h, dk = x["q"].shape
    dv = x["v"].shape[-1]
    memory = x["h0"].transpose(-1, -2) if "h0" in x else x["q"].new_zeros(b, h, dv, dk)
    fn = delta_rule_reference if form == "reference" else delta_rule_chunked
    # the values' own write strength β_v is the plain rule on the values β_v v / β
    values = x["v"] * (x["value_beta"] / x["beta"])[..., None] if "value_beta" in x else x["v"]
    y, state = fn(DeltaRuleSpec(kind="delta_rule"), keys=x["k"], values=values, queries=x["q"], beta=x["beta"],
                  decay=x["g"].exp() if "g" in x else None,
                  state={"memory": memory, "position": torch.zeros((), dtype=torch.int64, device=memory.device)})
    return y * scale, state["memory"].transpose(-1, -2)


CHECKS = [  # name, (B, T, H, Dk, Dv), dtype, gated, h0, chunk, reference form, limit
    ("fp32 gated + h0, T=333 (partial chunk)", (2, 333, 4, 64, 64), torch.float32, True, True, 64, "reference", 1e-4),
    ("fp32 plain, Dv=32 (no state in)", (2, 200, 4, 64, 32), torch.float32, False, False, 64, "reference", 1e-4),
    ("bf16 gated + h0, D=128", (2, 1000, 4, 128, 128), torch.bfloat16, True, True, 64, "chunked", 2e-2),
    ("bf16 plain, D=128", (2, 1000, 4, 128, 128), torch.bfloat16, False, False, 64, "chunked", 2e-2),
    # bfloat16 heads of 64 and 128 run their own configs on sm_90 (_delta_rule_triton.SM90_BF16)
    ("bf16 gated + h0, D=64", (2, 1000, 4, 64, 64), torch.bfloat16, True, True, 64, "chunked", 2e-2),
    ("bf16 plain, D=64", (2, 1000, 4, 64, 64), torch.bfloat16, False, False, 64, "chunked", 2e-2),
]


def run_checks(device: str, value_beta: bool = False) -> list[dict]:
    """The checks of ``CHECKS``; with ``value_beta`` each with a write strength of the values' own
    (``chunk_delta_rule(value_beta=...)``, Titans' order), its gradient among the checked ones."""
    rows = []
    for name, (b, t, h, dk, dv), dtype, gated, with_h0, chunk, form, limit in CHECKS:
        row = {"check": name + (" [value beta]" if value_beta else ""), "limit": limit}
        try:
            x = make_inputs(b, t, h, dk, dv, dtype, gated=gated, with_h0=with_h0, seed=t, device=device)
            if value_beta:
                x["value_beta"] = torch.rand(b, t, h, device=device, generator=torch.Generator(device=device)
                                             .manual_seed(t + 1))
            got = {n: a.clone().requires_grad_() for n, a in x.items()}
            ref = {n: a.detach().double().requires_grad_() for n, a in x.items()}
            scale = dk ** -0.5
            t0 = time.perf_counter()
            o, ht = ours(got, scale, chunk, True)
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            y, s = reference(ref, scale, form)
            gen = torch.Generator(device=device).manual_seed(1)
            do = torch.randn(o.shape, device=device, generator=gen).to(dtype)
            dht = torch.randn(ht.shape, device=device, generator=gen)
            errs = {"o": rel(o, y), "final_state": rel(ht, s)}
            ((o * do).sum() + (ht * dht).sum()).backward()
            ((y * do.double()).sum() + (s * dht.double()).sum()).backward()
            for n in x:
                errs["d" + n] = rel(got[n].grad, ref[n].grad)
            row["rel_err"] = errs
            row["max_rel_err"] = max(errs.values())
            row["ok"] = bool(row["max_rel_err"] <= limit)
        except Exception as e:  # noqa: BLE001  (a failing check is a result: report it, go on)
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            row["ok"] = False
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not value_beta:
        rows.append(check_compile(device))
    return rows


def check_compile(device: str) -> dict:
    """``torch.compile(fullgraph=True)`` around the op (inductor) equals eager, gradients included."""
    row = {"check": "torch.compile fullgraph (inductor) == eager, bf16 gated", "limit": 1e-2}
    try:
        x = make_inputs(2, 512, 4, 128, 128, torch.bfloat16, gated=True, with_h0=True, seed=11, device=device)

        def f(q, k, v, beta, g, h0):
            from nlgraph.compilers.kernels import chunk_delta_rule

            o, ht = chunk_delta_rule(q, F.normalize(k.float(), dim=-1).to(k.dtype), v, beta, g=g,
                                     initial_state=h0, output_final_state=True, scale=1.0)
            return o, ht

        names = ("q", "k", "v", "beta", "g", "h0")
        eager = [x[n].clone().requires_grad_() for n in names]
        comp = [x[n].clone().requires_grad_() for n in names]
        outs_e = f(*eager)
        t0 = time.perf_counter()
        outs_c = torch.compile(f, fullgraph=True)(*comp)
        torch.cuda.synchronize()
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        sum(o.float().sum() for o in outs_e).backward()
        sum(o.float().sum() for o in outs_c).backward()
        errs = {"o": rel(outs_c[0], outs_e[0]), "final_state": rel(outs_c[1], outs_e[1])}
        for n, a, b in zip(names, comp, eager):
            errs["d" + n] = rel(a.grad, b.grad)
        row["rel_err"] = errs
        row["max_rel_err"] = max(errs.values())
        row["ok"] = bool(row["max_rel_err"] <= row["limit"])
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        row["ok"] = False
    print(json.dumps(row), flush=True)
    return row


def time_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` between two CUDA events, after ``warmup`` calls."""
    from nlgraph.bench import median_ms

    return median_ms(fn, torch.device("cuda"), reps=reps, warmup=warmup)


def peak_mib(run: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fwd_bwd(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    grad = None

    def run():
        nonlocal grad
        for a in leaves:
            a.grad = None
        y = fn(*leaves)
        if grad is None:
            grad = torch.randn_like(y)
        y.backward(grad)

    return run


def nlgraph_chunked(gated: bool):
    """nlgraph's current chunked form of the level (PyTorch, eager), as models run it."""
    from nlgraph.runtime import run_level
    from nlgraph.spec.loader import load_level

    def fn(q, k, v, beta, *g):
        heads = q.shape[2]
        entry = {"kind": "delta_rule", "heads": heads}
        if gated:
            entry["decay"] = {"act": "logsigmoid"}
        spec = load_level(entry)
        kw = {"lr": beta}
        if gated:
            kw["retention"] = g[0].exp()
        return run_level(spec, keys=k, values=v, queries=q, form="chunked", **kw)[0]

    return fn


@contextlib.contextmanager
def wy_lowp(level: str | None):
    """``NLGRAPH_WY_LOWP`` set to ``level`` (None: left as it is) while the block runs."""
    old = os.environ.get("NLGRAPH_WY_LOWP")
    if level is not None:
        os.environ["NLGRAPH_WY_LOWP"] = level
    try:
        yield
    finally:
        if level is not None:
            if old is None:
                os.environ.pop("NLGRAPH_WY_LOWP", None)
            else:
                os.environ["NLGRAPH_WY_LOWP"] = old


@contextlib.contextmanager
def fla_gated_guard_lifted():
    """fla's gated backward with its Hopper guard lifted while the block runs: on triton 3.4-3.7.0
    fla refuses ``chunk_bwd_dqkwg`` with a decay, because that Triton miscompiles it into wrong
    values (fla issue 640). Its time is still fla's kernels' time, the only gated forward + backward
    anchor on this Triton; its values are not compared (``--fla-gated-unguarded``)."""
    import fla.ops.common.chunk_o as chunk_o

    old = chunk_o.TRITON_ABOVE_3_7_1
    chunk_o.TRITON_ABOVE_3_7_1 = True
    try:
        yield
    finally:
        chunk_o.TRITON_ABOVE_3_7_1 = old


def timing_rows(args, device: str, levels: list[str] = ()) -> list[dict]:
    b, t, h, d = args.batch, args.length, args.heads, args.dim
    dtype = getattr(torch, args.dtype)
    rows = []
    outputs: dict[str, torch.Tensor] = {}

    def triton_fn(gated: bool):
        def fn(q, k, v, beta, *g):
            from nlgraph.compilers.kernels import chunk_delta_rule

            return chunk_delta_rule(q, k, v, beta, g=g[0] if gated else None, scale=1.0, chunk=args.chunk)[0]
        return fn

    impls = []  # name, fn, gated, same-function anchor
    if HAVE_FLA and not args.skip_fla:
        impls.append(("fla chunk_delta_rule", lambda q, k, v, beta: fla_delta_rule(q, k, v, beta, scale=1.0)[0],
                      False, None))
        impls.append(("fla chunk_gated_delta_rule",
                      lambda q, k, v, beta, g: fla_gated_delta_rule(q, k, v, g, beta, scale=1.0)[0], True, None))
    for level in levels or [None]:
        tag = "" if level is None else f" [wy {level}]"
        for gated, name, anchor in ((False, "nlgraph triton chunk_delta_rule", "fla chunk_delta_rule"),
                                    (True, "nlgraph triton chunk_delta_rule + g", "fla chunk_gated_delta_rule")):
            impls.append((name + tag, triton_fn(gated), gated, anchor, level))
    if not args.skip_nlgraph_chunked:
        impls.append(("nlgraph chunked form (PyTorch), eager", nlgraph_chunked(False), False, "fla chunk_delta_rule"))
        impls.append(("nlgraph chunked form + decay, eager", nlgraph_chunked(True), True,
                      "fla chunk_gated_delta_rule"))

    if HAVE_FLA and not args.skip_fla and args.fla_gated_unguarded:
        # last: a kernel Triton miscompiles could fault, and a fault spoils every later row's CUDA context
        impls.append((UNGUARDED, lambda q, k, v, beta, g: fla_gated_delta_rule(q, k, v, g, beta, scale=1.0)[0],
                      True, None))
    x = make_inputs(b, t, h, d, d, dtype, gated=True, with_h0=False, seed=0, device=device)
    for name, fn, gated, anchor, *level in impls:
        inputs = [x["q"], x["k"], x["v"], x["beta"]] + ([x["g"]] if gated else [])
        row = {"name": name}
        # the WY level holds for the row's whole measurement (its backward reads it), then is undone
        guard = fla_gated_guard_lifted() if name == UNGUARDED else contextlib.nullcontext()
        with wy_lowp(level[0] if level else None), guard:
            _measure(row, name, fn, gated, anchor, inputs, outputs, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _measure(row, name, fn, gated, anchor, inputs, outputs, args) -> None:
    """One implementation's first call, forward and forward + backward timings and peak memory."""
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            y = fn(*inputs)
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - t0, 2)
        outputs[name] = y
        if anchor in outputs:
            row["rel_err_vs_" + anchor.split()[0]] = rel(y, outputs[anchor])
        with torch.no_grad():
            row["fwd_ms"] = time_ms(lambda: fn(*inputs), args.warmup, args.reps)
        leaves = [a.clone().requires_grad_() for a in inputs]
        run = fwd_bwd(fn, leaves)
        try:
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            row["first_bwd_s"] = round(time.perf_counter() - t0, 2)
            row["fwd_bwd_ms"] = time_ms(run, args.warmup, args.reps)
            row["peak_mib"] = peak_mib(run)
        except Exception as e:  # noqa: BLE001  (a refused backward is a result too)
            row["bwd_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def profile_rows(args, device: str) -> list[dict]:
    """The CUDA kernels of one forward + backward, by total time: nlgraph's delta rule with and without
    a decay, and fla's ``chunk_delta_rule`` beside them when fla is importable (its gated backward is
    refused on triton 3.6), so a kernel that falls behind fla's at a shape shows which one it is."""
    from torch.profiler import ProfilerActivity, profile

    from nlgraph.compilers.kernels import chunk_delta_rule

    x = make_inputs(args.batch, args.length, args.heads, args.dim, args.dim, getattr(torch, args.dtype),
                    gated=True, with_h0=False, seed=0, device=device)
    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "beta", "g")]
    runs = {
        "nlgraph chunk_delta_rule + g": fwd_bwd(
            lambda q, k, v, beta, g: chunk_delta_rule(q, k, v, beta, g=g, scale=1.0, chunk=args.chunk)[0], leaves),
        "nlgraph chunk_delta_rule": fwd_bwd(
            lambda q, k, v, beta: chunk_delta_rule(q, k, v, beta, scale=1.0, chunk=args.chunk)[0], leaves[:4]),
    }
    if HAVE_FLA and not args.skip_fla:
        runs["fla chunk_delta_rule"] = fwd_bwd(lambda q, k, v, beta: fla_delta_rule(q, k, v, beta, scale=1.0)[0],
                                               leaves[:4])
    rows = []
    reps = 5
    for impl, run in runs.items():
        run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                run()
            torch.cuda.synchronize()
        rows += [{"impl": impl, "kernel": name[:60], "ms_per_step": ms, "calls_per_step": calls}
                 for ms, calls, name in kernel_times(prof, reps)[:16]]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write checks, timings and profile as JSON to this file")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--skip-fla", action="store_true")
    p.add_argument("--skip-nlgraph-chunked", action="store_true", help="skip the PyTorch chunked-form rows")
    p.add_argument("--profile", action="store_true", help="per-kernel CUDA times of one Triton fwd+bwd")
    p.add_argument("--wy-lowp", default="", metavar="LEVELS",
                   help="check and time the Triton rows once per NLGRAPH_WY_LOWP level, e.g. 0,1,2 (16-bit "
                        "products in the WY backward; default: the environment's setting only)")
    p.add_argument("--fla-gated-unguarded", action="store_true",
                   help="also time fla's gated forward + backward with its Hopper guard lifted (triton 3.4-3.7.0 "
                        "miscompiles it into wrong values, so only its time is used): the gated f+b ratio, "
                        "marked *, is taken against it")
    p.add_argument("--value-beta", action="store_true",
                   help="run the checks with a write strength of the values' own (Titans' order; "
                        "dispatch.VALUE_BETA_ON_GPU) instead of the plain ones")
    p.add_argument("--resources", action="store_true",
                   help="only compile the kernels for sm_90 (no GPU needed) and print registers / spills")
    args = p.parse_args()
    if args.resources:  # benchmarks/kernel_resources.py does it for every kernel; these are the delta rule's
        import subprocess

        cmd = [sys.executable, str(Path(__file__).with_name("kernel_resources.py")), "--all-warps",
               "--cases", "delta_rule", "gated_delta_rule", "--dim", str(args.dim), "--chunk", str(args.chunk),
               "--dtype", args.dtype] + (["--json", str(args.out)] if args.out else [])
        return subprocess.run(cmd).returncode
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device here, so nothing to check or time (exit 0)")
        return 0
    device = "cuda"
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "fla": HAVE_FLA,
            "warps": os.environ.get("NLGRAPH_TRITON_WARPS", "default"),
            "shape": {"B": args.batch, "T": args.length, "H": args.heads, "D": args.dim, "dtype": args.dtype,
                      "chunk": args.chunk}}
    levels = [x for x in args.wy_lowp.split(",") if x]
    checks = []
    if not args.skip_checks:
        for level in levels or [None]:
            with wy_lowp(level):
                for c in run_checks(device, args.value_beta):
                    if level is not None:
                        c["check"] += f" [wy {level}]"
                    checks.append(c)
    timings = timing_rows(args, device, levels)
    prof = profile_rows(args, device) if args.profile else []
    result = {"meta": meta, "checks": checks, "timings": timings, "profile": prof}
    if args.out:
        atomic_write(args.out, (json.dumps(result, indent=2) + "\n").encode())

    print()
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, fla {'yes' if HAVE_FLA else 'no'}")
    if checks:
        print(f"{'check':<58} {'max rel err':>11} {'limit':>7}  result")
        for c in checks:
            err = f"{c['max_rel_err']:.2e}" if "max_rel_err" in c else "-"
            print(f"{c['check']:<58} {err:>11} {c['limit']:>7.0e}  {'ok' if c['ok'] else 'FAIL ' + c.get('error', '')}")
            if "rel_err" in c and not c["ok"]:
                print("    " + ", ".join(f"{k} {v:.1e}" for k, v in c["rel_err"].items()))
    if prof:
        for impl in dict.fromkeys(r["impl"] for r in prof):
            rows = [r for r in prof if r["impl"] == impl]
            print(f"\n{'kernel (' + impl + ', fwd+bwd)':<62} {'ms':>8} {'calls':>6}   total "
                  f"{sum(r['ms_per_step'] for r in rows):.3f} ms")
            for r in rows:
                print(f"{r['kernel']:<62} {r['ms_per_step']:>8.3f} {r['calls_per_step']:>6.1f}")
    print(f"\nB={args.batch} T={args.length} H={args.heads} D={args.dim} {args.dtype}, chunk {args.chunk}; "
          f"median of {args.reps} (CUDA events)")
    anchors = {r["name"]: r for r in timings if r["name"].startswith("fla")}
    unguarded = anchors.pop(UNGUARDED, None)
    print(f"{'implementation':<42} {'fwd ms':>8} {'f+b ms':>8} {'x fla f':>8} {'x fla fb':>8} {'peak MiB':>9} "
          f"{'1st s':>6}  note")
    for r in timings:
        anchor = anchors.get("fla chunk_gated_delta_rule" if ("+ g" in r["name"] or "decay" in r["name"]
                                                              or "gated" in r["name"]) else "fla chunk_delta_rule")

        def ratio(key):
            ref = anchor
            if ref is not None and key not in ref and ref["name"] == "fla chunk_gated_delta_rule":
                ref = unguarded  # fla refuses its gated backward here: its time with the guard lifted
            if ref is None or ref is r or key not in r or key not in ref:
                return "-"
            return f"{r[key] / ref[key]:.2f}" + ("*" if ref is unguarded else "")

        def num(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        note = r.get("error") or r.get("bwd_error") or ("time only: fla's values are wrong on this Triton"
                                                         if r is unguarded else "") or ", ".join(
            f"{k} {v:.1e}" for k, v in r.items() if k.startswith("rel_err"))
        print(f"{r['name']:<42} {num('fwd_ms', '.3f'):>8} {num('fwd_bwd_ms', '.3f'):>8} {ratio('fwd_ms'):>8} "
              f"{ratio('fwd_bwd_ms'):>8} {num('peak_mib', '.0f'):>9} {num('first_call_s', '.1f'):>6}  {note}")
    failed = [c["check"] for c in checks if not c["ok"]]
    if failed:
        print(f"\nFAILED checks: {'; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
