"""Time one forward + backward of a library spec with its adam / muon levels in the chunked form
(the default) or forced back to the per-token reference form, on CPU or GPU.

    OMP_NUM_THREADS=1 python benchmarks/form_speed.py atlas adam_memory
    bash benchmarks/device.sh python benchmarks/form_speed.py atlas adam_memory --device cuda \\
        --d-model 512 --heads 8 --layers 4 --batch 8 --length 512

Prints one line per spec and form: the median of ``--repeats`` timed passes after one warm-up, and
the loss (the two forms must agree on it up to rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import nlgraph.compilers.chunked as chunked
    from nlgraph.lower import build
    from nlgraph.spec.loader import load_spec
    from nlgraph.train.loop import lm_loss

    mapped = chunked.MAPPED
    dev = torch.device(args.device)
    for name in args.specs:
        for form in ("reference", "chunked"):
            # an empty MAPPED makes the chunked form refuse adam / muon, so the planner picks reference
            chunked.MAPPED = () if form == "reference" else mapped
            torch.manual_seed(0)
            spec = load_spec(name, ["model.vocab=256", f"vars.d_model={args.d_model}", f"vars.heads={args.heads}",
                                    f"vars.layers={args.layers}"])
            model = build(spec, device=dev)
            x = torch.randint(0, 256, (args.batch, args.length), device=dev)
            times = []
            for i in range(args.repeats + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    loss = lm_loss(model(x), x)
                loss.backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
            print(f"{name:14s} {form:9s} {statistics.median(times):8.3f} s  loss {float(loss):.6f}", flush=True)
    chunked.MAPPED = mapped


if __name__ == "__main__":
    main()
