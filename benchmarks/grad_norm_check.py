"""HOPE's outer gradient norm on the first training batch of the default corpus, and the parameters
with the largest gradients: a first look when a run's gradient norm explodes (issue 8; see
docs/hope_stability.md, "The outer gradient goes through the gain").

    python benchmarks/grad_norm_check.py OUT.json L:ERRORS:PRECISION:DEVICE[:T[:D_MODEL[:HEADS[:B]]]] ... \\
        [KEY=VALUE ...]
    bash benchmarks/device.sh python benchmarks/grad_norm_check.py "$OUT/gn.json" 4:gain:bf16:cuda 4:raw:bf16:cuda
    OMP_NUM_THREADS=1 python benchmarks/grad_norm_check.py gn.json 4:gain:fp32:cpu:2048:256:4:1

Each configuration builds ``hope`` with L layers (T 2048, d_model 512, 8 heads, B 2 unless given),
``levels.titans.optimizer.inner_errors`` set to ERRORS (``default``: the spec's), seed 0, and runs
one forward and backward in PRECISION (bf16 autocast or fp32). KEY=VALUE arguments are extra
overrides for every configuration.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def grad_norm(config: str, extra: list[str]) -> dict:
    """One configuration ``L:ERRORS:PRECISION:DEVICE[:T[:D_MODEL[:HEADS[:B]]]]``: its loss, total
    gradient norm and the ten parameters with the largest gradients."""
    from nlgraph.lower import build
    from nlgraph.train.loop import TrainConfig, _Data, _init_dist, lm_loss

    layers, err, prec, dev, *rest = config.split(":")
    t, d_model, heads, b = (int(v) for v in [*rest, *("2048", "512", "8", "2")[len(rest):]])
    ov = [f"vars.d_model={d_model}", f"vars.layers={layers}", f"vars.heads={heads}", *extra]
    if err != "default":
        ov.append(f"levels.titans.optimizer.inner_errors={err}")
    # the first training batch of the default corpus, as `nlgraph train` draws it (seed 0)
    cfg = TrainConfig(steps=1, batch=b, length=t, device=dev, overrides=ov)
    x, y = _Data(cfg, 256, torch.device(dev), _init_dist(dev), None).next()
    torch.manual_seed(0)
    model = build("hope", device=dev, overrides=ov)
    t0 = time.time()
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=prec == "bf16"):
        logits = model(x)
    loss = lm_loss(logits, y)
    loss.backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    norms = {n: float(p.grad.float().norm()) for n, p in model.named_parameters() if p.grad is not None}
    top = sorted(norms.items(), key=lambda kv: -kv[1])[:10]
    return {"config": config, "loss": float(loss.detach()), "grad_norm": sum(v * v for v in norms.values()) ** 0.5,
            "top": top, "s": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON file, rewritten after every configuration")
    ap.add_argument("items", nargs="+", metavar="CONFIG|KEY=VALUE")
    args = ap.parse_args()
    extra = [a for a in args.items if "=" in a]
    rows = []
    for config in (a for a in args.items if "=" not in a):
        rows.append(grad_norm(config, extra))
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
