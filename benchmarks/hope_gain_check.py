"""A HOPE checkpoint whose next step went non-finite, examined (docs/hope_stability.md, "Chunk-start
gradients and the memory's gain"): the largest singular value of every memory's layers per block,
and the failing sequence re-read with the checkpoint's weights under DGD's raw and gain-normalised
inner errors.

    python benchmarks/hope_gain_check.py RUN/checkpoints/step-000080 nan_trace.json --json out.json

``nan_trace.json`` is what ``benchmarks/nan_trace.py`` wrote for the failing step: its ``text``
holds the failing sequences. The spec is the checkpoint's own ``spec.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a step folder (model.safetensors, spec.yaml)")
    ap.add_argument("trace", type=Path, help="nan_trace.py's JSON of the failing step")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from nlgraph import load_spec
    from nlgraph.lower import build

    weights = load_file(str(args.checkpoint / "model.safetensors"))
    report: dict = {"checkpoint": str(args.checkpoint), "singular_values": {}, "reads": {}}
    prefix = ".entries.titans.inner.init_params."
    for name, w in sorted(weights.items()):
        if prefix in name and w.dim() == 3:  # [H, out, in]
            block = name.split(".")[1]
            report["singular_values"].setdefault(block, {})[name.split(prefix)[1]] = round(
                float(torch.linalg.matrix_norm(w.double(), 2).max()), 3)
    for block, values in report["singular_values"].items():
        print(f"block {block}: " + "  ".join(f"{k.replace('adaptive__', '')} {v}" for k, v in values.items()))
    trace = json.loads(args.trace.read_text())
    for row, text in trace["text"].items():
        tokens = torch.tensor([list(text.encode("latin-1"))])
        for errors in ("raw", "gain"):
            model = build(load_spec(args.checkpoint / "spec.yaml", [f"levels.titans.optimizer.inner_errors={errors}"]))
            missing = model.load_state_dict(weights, strict=False).missing_keys
            assert set(missing) <= {"head.weight"}, missing  # the head is tied to the embedding
            with torch.no_grad():
                logits = model(tokens)
            finite = bool(torch.isfinite(logits).all())
            loss = float(F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])) if finite else None
            report["reads"][f"row {row}, {errors}"] = {"finite": finite, "loss": loss}
            print(f"row {row}, inner_errors {errors}: logits finite {finite}, loss {loss}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
