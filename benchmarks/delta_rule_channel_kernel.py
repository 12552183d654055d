"""The delta rule with a decay per key channel (Kimi Delta Attention's) in Triton, on the GPU: its
checks, then its speed against fla's ``chunk_kda``.

``nlgraph.compilers.kernels.chunk_delta_rule`` with ``g [B, T, H, Dk]`` is checked against a float64
token loop (``delta_rule.token_loop``) on outputs, final state and every input gradient (q, k, v, β,
g, the initial state): float32 and bfloat16 (the kernels run 32 tokens a chunk; the label says
so), a partial last chunk, two value blocks, decays down to e^−8 a token. That is what rules out the Hopper backward miscompiles of
triton 3.4–3.7, which Triton's CPU interpreter (where the tests run) cannot show;
``dispatch.DELTA_RULE_CHANNEL_ON_GPU`` (on since this passed there) turns the kernels on for CUDA plans. Then
forward and forward + backward at the anchor shape (B=4, T=4096, H=16, D=128, bf16) next to fla's
``chunk_kda`` (the same function: relative error against it, peak memory) and nlgraph's per-head
gated kernel, in the same process. Without CUDA it says so and exits 0.

    bash benchmarks/device.sh python benchmarks/delta_rule_channel_kernel.py --json "$OUT/kda.json"
    python benchmarks/delta_rule_channel_kernel.py --no-timing --checks 0 1   # only some checks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_launch.py
from _launch import channel_form, header, kernel_profile, plain_warps, with_warps  # noqa: E402

# (B, T, H, Dk, Dv, decay, dtype, limit, chunk); decay "mild": log α in log(0.9 .. 1) a token and
# channel, "strong": log α down to −8 a token (a chunk of 64 decays far past float32's e^−88)
CHECKS = [(2, 333, 2, 64, 100, "mild", torch.float32, 1e-4, 64),
          (1, 60, 2, 64, 64, "strong", torch.float32, 1e-4, 64),
          (2, 300, 2, 128, 128, "strong", torch.float32, 1e-4, 32),
          (1, 200, 2, 128, 128, "mild", torch.float32, 1e-4, 16),
          (1, 256, 4, 128, 128, "mild", torch.bfloat16, 2e-2, 64),
          (1, 256, 4, 64, 64, "strong", torch.bfloat16, 2e-2, 32),
          # the widest head the router allows, and widths that are not powers of two
          (1, 100, 2, 256, 64, "mild", torch.float32, 1e-4, 32),
          (1, 90, 2, 80, 130, "strong", torch.float32, 1e-4, 64)]


def checks(dev: torch.device, which: list[int] | None) -> list[dict]:
    from nlgraph.bench import rel_err
    from nlgraph.compilers.kernels import chunk_delta_rule
    from nlgraph.compilers.kernels._load import kernel_chunk
    from nlgraph.compilers.kernels.delta_rule import token_loop

    rows = []
    for i, (b, t, h, dk, dv, decay, dtype, tol, chunk) in enumerate(CHECKS):
        if which is not None and i not in which:
            continue
        gen = torch.Generator().manual_seed(t)
        q = torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64)
        k = torch.nn.functional.normalize(torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64), dim=-1)
        v = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
        beta = torch.rand(b, t, h, generator=gen, dtype=torch.float64)
        if decay == "strong":
            g = -8.0 * torch.rand(b, t, h, dk, generator=gen, dtype=torch.float64)
        else:
            g = torch.log(0.9 + 0.1 * torch.rand(b, t, h, dk, generator=gen, dtype=torch.float64))
        h0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
        leaves = [x.requires_grad_() for x in (q, k, v, beta, g, h0)]
        y_ref, s_ref = token_loop(q, k, v, beta, g, h0, 0.5)
        do, ds = torch.randn_like(y_ref), torch.randn_like(s_ref)
        ref = torch.autograd.grad((y_ref * do).sum() + (s_ref * ds).sum(), leaves)
        ins = [x.detach().to(dev, dtype).requires_grad_() for x in (q, k, v)]
        extra = [x.detach().to(dev, torch.float32).requires_grad_() for x in (beta, g, h0)]
        y, s = chunk_delta_rule(*ins, extra[0], g=extra[1], initial_state=extra[2], output_final_state=True,
                                scale=0.5, chunk=chunk)
        got = torch.autograd.grad((y.float() * do.to(dev).float()).sum() + (s * ds.to(dev).float()).sum(),
                                  ins + extra)
        errs = {"o": rel_err(y.detach().cpu(), y_ref.detach()), "state": rel_err(s.detach().cpu(), s_ref.detach())}
        for name, a, r in zip(("q", "k", "v", "beta", "g", "h0"), got, ref):
            errs[f"d{name}"] = rel_err(a.cpu(), r)
        worst = max(errs.values())
        ran = kernel_chunk(extra[1], chunk)  # the chunk the kernels ran, which the label names
        rows.append({"check": f"{i}: {str(dtype).removeprefix('torch.')} T={t} Dk={dk} Dv={dv} chunk={ran} {decay}",
                     "max_rel_err": worst, "limit": tol, "ok": worst < tol, "errors": errs})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def timings(dev: torch.device, b: int, t: int, h: int, d: int, warps: tuple[int, ...] = (),
            fla: bool = True, profile: list | None = None) -> list[dict]:
    """Per key channel at the anchor shape (the kernels run 32 tokens a chunk: ``_load.CHANNEL_CHUNK``),
    against fla's ``chunk_kda`` (first, so
    nlgraph's rows carry their ratio to it and their error against it), and the per-head kernel;
    with ``warps``, the per-channel rows again with the plain kernels launched at each count; without
    ``fla``, nlgraph's rows alone (fla's first call autotunes for minutes)."""
    from nlgraph.bench import time_rows
    from nlgraph.compilers.kernels import chunk_delta_rule

    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(b, t, h, d, device=dev, generator=gen), dim=-1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(b, t, h, d, device=dev, generator=gen), dim=-1).bfloat16()
    v = torch.randn(b, t, h, d, device=dev, generator=gen).bfloat16()
    beta = torch.rand(b, t, h, device=dev, generator=gen)
    g = torch.log(0.9 + 0.1 * torch.rand(b, t, h, d, device=dev, generator=gen))
    impls = [(f"nlgraph chunk_delta_rule per channel ({channel_form()})",
              lambda q_, k_, v_: chunk_delta_rule(q_, k_, v_, beta, g=g, scale=1.0)[0], False)]
    channel_rows = list(impls)
    impls.append(("nlgraph chunk_delta_rule per head (for scale)",
                  lambda q_, k_, v_: chunk_delta_rule(q_, k_, v_, beta, g=g[..., 0].contiguous(), scale=1.0)[0],
                  False))
    try:  # fla is an optional anchor
        if not fla:
            raise ImportError("--no-fla")
        from fla.ops.kda import chunk_kda

        impls.insert(0, ("fla chunk_kda", lambda q_, k_, v_: chunk_kda(q_, k_, v_, g, beta, scale=1.0)[0], True))
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"note": f"fla's chunk_kda not timed ({type(e).__name__}: {e})"}), flush=True)
    rows = with_warps(time_rows, impls, channel_rows, warps, [q, k, v], b * t, dev)
    if profile is not None:  # where each implementation's time goes, kernel by kernel
        profile += kernel_profile(impls, [q, k, v], dev)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--checks", type=int, nargs="*", default=None,
                    help="indices of CHECKS to run (all by default; none with no index)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--warps", type=int, nargs="*", default=[],
                    help="also time the per-channel rows with the plain kernels launched at these warp counts")
    ap.add_argument("--check-warps", type=int, default=None,
                    help="run the checks with the plain kernels launched at this warp count")
    ap.add_argument("--no-fla", action="store_true", help="time nlgraph's rows alone, without fla's chunk_kda")
    ap.add_argument("--profile", action="store_true",
                    help="after the timings, each row's CUDA kernels (forward, forward + backward) by time, as "
                         "launched (not the --warps variants)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.profile and args.no_timing:
        ap.error("--profile profiles the rows after their timing: drop --no-timing")
    if not torch.cuda.is_available():
        print("delta_rule_channel_kernel: no CUDA device here; nothing to check or time")
        return 0
    dev = torch.device("cuda")
    res = header(dev, args.check_warps)
    with plain_warps(args.check_warps):
        res["checks"] = checks(dev, args.checks)
    if not args.no_timing:
        res["profile"] = [] if args.profile else None
        res["timings"] = timings(dev, args.batch, args.length, args.heads, args.dim, tuple(args.warps),
                                 fla=not args.no_fla, profile=res["profile"])
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps(res, indent=1).encode())
    return 0 if all(r["ok"] for r in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
