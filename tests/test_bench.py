"""``nlgraph bench``: without CUDA it says so and exits 0; ``--device cpu`` runs the whole command
(anchor first, a row per length and mode, B·T fixed with --tokens, JSON); bad modes are one line."""

from __future__ import annotations

import json

import torch

from nlgraph.cli import main

TINY = ["vars.d_model=32", "vars.layers=1", "vars.heads=2"]


def test_without_cuda_it_says_so_and_exits_0(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gated_deltanet"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_cpu_smoke_run_writes_rows_with_the_anchor_ratio(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "gated_deltanet", *TINY, "--device", "cpu", "--modes", "eager", "--lengths", "16", "32",
                 "--tokens", "64", "--steps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["spec"], r["T"], r["B"], r["anchor"]) for r in rows] == [
        ("transformer_pp", 16, 4, True), ("gated_deltanet", 16, 4, False),
        ("transformer_pp", 32, 2, True), ("gated_deltanet", 32, 2, False)]
    for r in rows:
        assert r["tok_s"] > 0 and r["ms"] > 0
        assert r["vs_anchor"] == (1.0 if r["anchor"] else round(r["tok_s"] / rows[0 if r["T"] == 16 else 2]["tok_s"], 4))
    # the anchor has the spec's width and depth
    assert rows[0]["params"] < 2 * rows[1]["params"] and rows[1]["params"] < 2 * rows[0]["params"]
    printed = capsys.readouterr().out
    assert "| gated_deltanet | 16 | 4 | eager |" in printed


def test_graph_mode_needs_cuda(capsys):
    assert main(["bench", "gated_deltanet", *TINY, "--device", "cpu", "--modes", "graph"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA device" in err[0]
