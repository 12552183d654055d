"""The Triton linear-attention kernel on the GPU: its checks, then its speed against fla.

``nlgraph.compilers.kernels.linear_attention.chunk_linear_attention`` (scalar decay optional) is
checked against a float64 token loop on outputs, final state and every input gradient (float32 and
bfloat16, a partial last chunk, two value blocks), which is what rules out the Hopper backward
miscompiles of triton 3.4–3.7 that Triton's CPU interpreter cannot show. Then forward and
forward + backward are timed at the anchor shape (B=4, T=4096, H=16, D=128, bf16) next to fla's
``chunk_simple_gla`` in the same process (relative error against it, peak memory). Without CUDA it
says so and exits 0.

With ``--channel``, the same for a decay per key channel (GLA's; ``g [B, T, H, Dk]``): the checks add
chunks 64 and 32 asked (the kernels run 32) and decays down to e^−8 a token, and the timing is against fla's
``chunk_gla``. ``dispatch.LINEAR_ATTENTION_CHANNEL_ON_GPU`` (on since this passed there) turns the
per-channel kernels on for CUDA plans.

    bash benchmarks/device.sh python benchmarks/linear_attention_kernel.py --json "$OUT/la_kernel.json"
    bash benchmarks/device.sh python benchmarks/linear_attention_kernel.py --channel --json "$OUT/gla.json"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_launch.py
from _launch import channel_form, header, kernel_profile, plain_warps, with_warps  # noqa: E402


SCALAR_CHECKS = [(2, 333, 2, 64, 100, True, torch.float32, 1e-4, 64),
                 (2, 300, 2, 128, 128, False, torch.float32, 1e-4, 64),
                 (1, 256, 4, 128, 128, True, torch.bfloat16, 2e-2, 64),
                 # a partial last chunk decaying past e^-88 (its padded rows once overflowed to NaN)
                 (1, 60, 2, 64, 64, "strong_head", torch.float32, 1e-4, 64)]
# gated: "channel" (log α in log(0.9 .. 1)) or "strong" / "strong_head" (log α down to −8 a token)
CHANNEL_CHECKS = [(2, 333, 2, 64, 100, "channel", torch.float32, 1e-4, 64),
                  (1, 60, 2, 64, 64, "strong", torch.float32, 1e-4, 64),
                  (2, 300, 2, 128, 128, "strong", torch.float32, 1e-4, 32),
                  (1, 200, 2, 128, 128, "channel", torch.float32, 1e-4, 16),
                  (1, 256, 4, 128, 128, "channel", torch.bfloat16, 2e-2, 64),
                  (1, 256, 4, 64, 64, "strong", torch.bfloat16, 2e-2, 32)]


def checks(dev: torch.device, channel: bool = False, which: list[int] | None = None) -> list[dict]:
    from nlgraph.bench import rel_err
    from nlgraph.compilers.kernels._load import kernel_chunk
    from nlgraph.compilers.kernels.linear_attention import chunk_linear_attention
    from nlgraph.compilers.kernels.linear_attention import token_loop as _reference

    rows = []
    for i, (b, t, h, dk, dv, gated, dtype, tol, chunk) in enumerate(CHANNEL_CHECKS if channel else SCALAR_CHECKS):
        if which is not None and i not in which:
            continue
        gen = torch.Generator().manual_seed(t)
        q = torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64)
        k = torch.nn.functional.normalize(torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64), dim=-1)
        v = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
        g = None
        if gated in ("strong", "strong_head"):
            shape = (b, t, h, dk) if gated == "strong" else (b, t, h)
            g = -8.0 * torch.rand(shape, generator=gen, dtype=torch.float64)
        elif gated:
            shape = (b, t, h, dk) if gated == "channel" else (b, t, h)
            g = torch.log(0.9 + 0.1 * torch.rand(shape, generator=gen, dtype=torch.float64))
        h0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
        leaves = [x.requires_grad_() for x in (q, k, v, g, h0) if x is not None]
        y_ref, s_ref = _reference(q, k, v, g, h0, 0.5)
        do, ds = torch.randn_like(y_ref), torch.randn_like(s_ref)
        ref = torch.autograd.grad((y_ref * do).sum() + (s_ref * ds).sum(), leaves)
        ins = [x.detach().to(dev, dtype).requires_grad_() for x in (q, k, v)]
        extra = [x.detach().to(dev, torch.float32).requires_grad_() for x in (g, h0) if x is not None]
        y, s = chunk_linear_attention(*ins, extra[0] if gated else None, extra[-1], output_final_state=True,
                                      scale=0.5, chunk=chunk)
        got = torch.autograd.grad((y.float() * do.to(dev).float()).sum() + (s * ds.to(dev).float()).sum(),
                                  ins + extra)
        errs = {"o": rel_err(y.detach().cpu(), y_ref.detach()), "state": rel_err(s.detach().cpu(), s_ref.detach())}
        for name, a, r in zip(["q", "k", "v"] + (["g"] if gated else []) + ["h0"], got, ref):
            errs[f"d{name}"] = rel_err(a.cpu(), r)
        worst = max(errs.values())
        kind = {True: "gated", False: "plain"}.get(gated, gated)
        ran = kernel_chunk(extra[0] if gated else None, chunk)  # the chunk the kernels ran
        rows.append({"check": f"{str(dtype).removeprefix('torch.')} T={t} Dk={dk} Dv={dv} chunk={ran} {kind}",
                     "max_rel_err": worst, "limit": tol, "ok": worst < tol, "errors": errs})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def channel_timings(dev: torch.device, b: int, t: int, h: int, d: int, warps: tuple[int, ...] = (),
                    fla: bool = True, profile: list | None = None) -> list[dict]:
    """A decay per key channel at the anchor shape (the kernels run 32 tokens a chunk:
    ``_load.CHANNEL_CHUNK``), against fla's ``chunk_gla``; with ``warps``, again with the plain
    kernels launched at each count; without ``fla``, nlgraph's rows alone."""
    from nlgraph.bench import time_rows
    from nlgraph.compilers.kernels.linear_attention import chunk_linear_attention

    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(b, t, h, d, device=dev, generator=gen), dim=-1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(b, t, h, d, device=dev, generator=gen), dim=-1).bfloat16()
    v = torch.randn(b, t, h, d, device=dev, generator=gen).bfloat16()
    g = torch.log(0.9 + 0.1 * torch.rand(b, t, h, d, device=dev, generator=gen))
    impls = [(f"nlgraph chunk_linear_attention per channel ({channel_form()})",
              lambda q_, k_, v_: chunk_linear_attention(q_, k_, v_, g, scale=1.0)[0], False)]
    ours = list(impls)
    try:  # fla is an optional anchor
        if not fla:
            raise ImportError("--no-fla")
        from fla.ops.gla import chunk_gla

        impls.insert(0, ("fla chunk_gla", lambda q_, k_, v_: chunk_gla(q_, k_, v_, g, scale=1.0)[0], True))
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"note": f"fla not timed ({type(e).__name__}: {e})"}), flush=True)
    rows = with_warps(time_rows, impls, ours, warps, [q, k, v], b * t, dev)
    if profile is not None:  # where each implementation's time goes, kernel by kernel
        profile += kernel_profile(impls, [q, k, v], dev)
    return rows


def timings(dev: torch.device, b: int, t: int, h: int, d: int, warps: tuple[int, ...] = (),
            fla: bool = True) -> list[dict]:
    from nlgraph.bench import time_rows
    from nlgraph.compilers.kernels.linear_attention import chunk_linear_attention

    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(b, t, h, d, device=dev, generator=gen), dim=-1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(b, t, h, d, device=dev, generator=gen), dim=-1).bfloat16()
    v = torch.randn(b, t, h, d, device=dev, generator=gen).bfloat16()
    g = torch.log(0.9 + 0.1 * torch.rand(b, t, h, device=dev, generator=gen))
    try:  # fla is an optional anchor
        if not fla:
            raise ImportError("--no-fla")
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001
        chunk_simple_gla = None
        print(json.dumps({"note": f"fla not timed ({type(e).__name__}: {e})"}), flush=True)
    # with the decay, and without it (fla refuses its gated backward on triton < 3.7.1 on Hopper);
    # fla first in each pair, so nlgraph's row carries its ratio to fla and its error against it
    rows = []
    for gi, tag in ((g, " + g"), (None, "")):
        impls = [(f"nlgraph chunk_linear_attention{tag}",
                  lambda q_, k_, v_, gi=gi: chunk_linear_attention(q_, k_, v_, gi, scale=1.0)[0], False)]
        if chunk_simple_gla is not None:
            impls.insert(0, (f"fla chunk_simple_gla{tag}",
                             lambda q_, k_, v_, gi=gi: chunk_simple_gla(q_, k_, v_, gi, scale=1.0)[0], True))
        rows += with_warps(time_rows, impls, [i for i in impls if not i[2]], warps, [q, k, v], b * t, dev)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--channel", action="store_true", help="a decay per key channel (GLA's), against chunk_gla")
    ap.add_argument("--checks", type=int, nargs="*", default=None,
                    help="indices of the checks to run (all by default; none with no index); each new shape "
                         "compiles every kernel")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--warps", type=int, nargs="*", default=[],
                    help="also time nlgraph's rows with the plain kernels launched at these warp counts")
    ap.add_argument("--check-warps", type=int, default=None,
                    help="run the checks with the plain kernels launched at this warp count")
    ap.add_argument("--no-fla", action="store_true", help="time nlgraph's rows alone, without fla's kernels")
    ap.add_argument("--profile", action="store_true",
                    help="after the timings, each row's CUDA kernels (forward, forward + backward) by time, as "
                         "launched (not the --warps variants)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.profile and (not args.channel or args.no_timing):
        ap.error("--profile profiles the per-channel rows after their timing: add --channel, drop --no-timing")
    if not torch.cuda.is_available():
        print("linear_attention_kernel: no CUDA device here; nothing to check or time")
        return 0
    dev = torch.device("cuda")
    res = header(dev, args.check_warps)
    with plain_warps(args.check_warps):
        res["checks"] = checks(dev, args.channel, args.checks)
    if not args.no_timing:
        if args.channel:
            res["profile"] = [] if args.profile else None
            res["timings"] = channel_timings(dev, args.batch, args.length, args.heads, args.dim, tuple(args.warps),
                                             fla=not args.no_fla, profile=res["profile"])
        else:
            res["timings"] = timings(dev, args.batch, args.length, args.heads, args.dim, tuple(args.warps),
                                     fla=not args.no_fla)
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps(res, indent=1).encode())
    return 0 if all(r["ok"] for r in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
