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
import json, sys, time
import torch
from nlgraph.lower import build
from nlgraph.train.loop import TrainConfig, _Data, _init_dist, lm_loss

out = sys.argv[1]
rows = []
extra = [a for a in sys.argv[2:] if "=" in a]
for c in [a for a in sys.argv[2:] if "=" not in a]:
    L, err, prec, dev, *rest = c.split(":")
    T = int(rest[0]) if rest else 2048
    d_model = int(rest[1]) if len(rest) > 1 else 512
    heads = int(rest[2]) if len(rest) > 2 else 8
    B = int(rest[3]) if len(rest) > 3 else 2
    ov = [f"vars.d_model={d_model}", f"vars.layers={L}", f"vars.heads={heads}", *extra]
    if err != "default":
        ov.append(f"levels.titans.optimizer.inner_errors={err}")
    cfg = TrainConfig(out="/tmp/hgn", steps=1, batch=B, length=T, device=dev, overrides=ov)
    data = _Data(cfg, 256, torch.device(dev), _init_dist(dev), None)
    x, y = data.next()
    torch.manual_seed(0)
    model = build("hope", device=dev, overrides=ov)
    t0 = time.time()
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=(prec == "bf16")):
        logits = model(x)
    loss = lm_loss(logits, y)
    loss.backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    norms = {n: float(p.grad.float().norm()) for n, p in model.named_parameters() if p.grad is not None}
    tot = sum(v * v for v in norms.values()) ** 0.5
    top = sorted(norms.items(), key=lambda kv: -kv[1])[:10]
    row = {"config": c, "loss": float(loss.detach()), "grad_norm": tot, "top": top, "s": round(time.time() - t0, 1)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    sys.stdout.flush()
    del model, logits, loss
    if dev == "cuda":
        torch.cuda.empty_cache()
