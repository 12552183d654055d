"""Find the first operation of a spec's training step that synchronises with the host (what stops a
CUDA graph capture): runs one small forward+backward under ``torch.cuda.set_sync_debug_mode("error")``.

    bash benchmarks/device.sh python benchmarks/sync_check.py titans hope
"""

import sys
import traceback

import torch

from nlgraph.lower import build
from nlgraph.spec.loader import load_spec
from nlgraph.train.loop import lm_loss

ok = True
for name in sys.argv[1:]:
    torch.manual_seed(0)
    model = build(load_spec(name, ["model.vocab=256", "vars.d_model=128", "vars.heads=2", "vars.layers=1"]),
                  device="cuda")
    x = torch.randint(0, 256, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lm_loss(model(x), x).backward()  # warm: lazy initialisations may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model(x), x)
        loss.backward()
        print(f"{name}: no synchronising operation", flush=True)
    except Exception:  # noqa: BLE001
        ok = False
        print(f"{name}: synchronises:", flush=True)
        traceback.print_exc(limit=-8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
sys.exit(0 if ok else 1)
