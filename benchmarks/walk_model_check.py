"""Whole HOPE models with the chunk walk against the ``chunked`` form, on the GPU: the same weights
and tokens through both, logits and every parameter gradient compared, in float32 and under bf16
autocast (and the chunked form run twice in bf16, the kernels' own run-to-run difference, for scale).
The kernel itself is checked on the GPU by ``chunk_walk.py --check``; this is the model around it
(the five stacked memories, CMS segments, retention, rolling reads) with the walk on CUDA.

    bash benchmarks/device.sh python benchmarks/walk_model_check.py --json "$OUT/walk_model_check.json"

Exit status 1 if a float32 case's relative error passes ``--tol`` (bf16 figures are reported).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=["hope", "hope_large_chunk"])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (no walk there)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from model_speed import _grads, _rel
    from nlgraph.compilers.kernels import dispatch
    from nlgraph.lower import build
    from nlgraph.runtime import level_form
    from nlgraph.spec.loader import load_spec
    from nlgraph.train.loop import lm_loss

    dev = torch.device(args.device)
    dispatch.CHUNK_WALK_ON_GPU = True  # every chunk, whatever its size: the check is of the model
    rows, failed = [], False
    for name in args.specs:
        spec = load_spec(name, [f"vars.d_model={args.d_model}", f"vars.heads={args.heads}",
                                f"vars.layers={args.layers}"])
        torch.manual_seed(0)
        ref = build(spec, forms={"titans": "chunked"}, device=dev)
        walked = build(spec, device=dev)
        walked.load_state_dict(ref.state_dict())
        form = level_form(walked.spec.levels["titans"], device=dev.type)
        g = torch.Generator(device=dev).manual_seed(1)
        x = torch.randint(0, spec.model.vocab, (args.batch, args.length), device=dev, generator=g)
        y = torch.randint(0, spec.model.vocab, (args.batch, args.length), device=dev, generator=g)

        def step(model, bf16):
            model.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
                loss = lm_loss(logits, y)
            loss.backward()
            return logits.detach().float(), float(loss.detach()), _grads(model)

        for bf16 in (False, True):
            lr, loss_r, gr = step(ref, bf16)
            lw, loss_w, gw = step(walked, bf16)
            worst = max(gr, key=lambda k: _rel(gw[k], gr[k]))
            row = {"spec": name, "dtype": "bf16-autocast" if bf16 else "float32", "titans_form": form,
                   "logits_rel": _rel(lw, lr), "loss_walk": loss_w, "loss_chunked": loss_r,
                   "grad_rel_max": _rel(gw[worst], gr[worst]), "grad_rel_max_param": worst,
                   "grads_same_keys": gw.keys() == gr.keys()}
            if bf16:
                l2, _, g2 = step(ref, bf16)
                row["chunked_rerun_logits_rel"] = _rel(l2, lr)
                row["chunked_rerun_grad_rel_max"] = max(_rel(g2[k], gr[k]) for k in gr)
            else:
                bad = (row["logits_rel"] > args.tol or row["grad_rel_max"] > args.tol or not row["grads_same_keys"]
                       or (form != "triton" and dev.type == "cuda"))
                row["ok"] = not bad
                failed |= bad
            rows.append(row)
            print(json.dumps(row), flush=True)
        del ref, walked
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": name,
                                               "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
