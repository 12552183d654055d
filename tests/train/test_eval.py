"""nlgraph eval and sample: the task path trains a spec then scores held-out draws; a trained run is
evaluated as it is; ppl reads the run's validation split; accuracy is the task's own metric."""

from __future__ import annotations

import json

import torch

from nlgraph.cli import main
from nlgraph.data import sequence_accuracy, token_accuracy

TINY = ["vars.d_model=32", "vars.layers=1", "vars.heads=2", "levels.mlp.memory.hidden=64"]


def test_task_metrics_count_only_scored_positions():
    logits = torch.zeros(2, 4, 4)
    logits[..., 1] = 1.0  # predicts token 1 everywhere
    y = torch.tensor([[1, -100, 1, -100], [1, 2, -100, -100]])
    assert token_accuracy(logits, y).tolist() == [1.0, 0.5]
    assert sequence_accuracy(logits, y).tolist() == [1.0, 0.0]


def test_eval_trains_a_spec_on_a_task_then_evaluates_the_run(tmp_path, capsys):
    out = tmp_path / "parity"
    report = tmp_path / "r.json"
    code = main(["eval", "transformer_pp", *TINY, "--task", "parity", "--length", "16", "--steps", "2",
                 "--batch", "4", "--eval-batches", "1", "--device", "cpu", "--out", str(out),
                 "--eval-lengths", "16,32", "--json", str(report)])
    assert code == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["length"] for r in rows] == [16, 32] and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    capsys.readouterr()
    # the run folder is evaluated as it is (no training): same numbers at the same length
    assert main(["eval", str(out), "--task", "parity", "--eval-lengths", "16", "--eval-batches", "1",
                 "--batch", "4", "--json", str(report)]) == 0
    again = json.loads(report.read_text())["rows"]
    assert again[0]["accuracy"] == rows[0]["accuracy"] and again[0]["trained_length"] == 16
    # and a run of one task is not silently scored on another
    assert main(["eval", str(out), "--task", "mqar"]) == 1
    assert "trained on 'parity'" in capsys.readouterr().err
    # training again into the same --out is refused (the run there is kept) and says what to do
    before = (out / "latest.json").read_bytes()
    assert main(["eval", "transformer_pp", *TINY, "--task", "parity", "--length", "16", "--steps", "2",
                 "--batch", "4", "--eval-batches", "1", "--device", "cpu", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"nlgraph eval {out} --task parity" in err[0]
    assert (out / "latest.json").read_bytes() == before


def test_eval_with_a_time_limit_scores_the_training_it_reached(tmp_path, capsys):
    """--time-limit shortens the training of a task run: the run is evaluated as far as it got, the
    JSON says which step that was; without the flag an unfinished training stays an error."""
    out = tmp_path / "parity"
    report = tmp_path / "r.json"
    code = main(["eval", "transformer_pp", *TINY, "--task", "parity", "--length", "16", "--steps", "50",
                 "--batch", "4", "--eval-batches", "1", "--device", "cpu", "--out", str(out),
                 "--time-limit", "1e-9", "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    res = json.loads(report.read_text())
    assert 1 <= res["step"] < 50
    assert 0.0 <= res["rows"][0]["accuracy"] <= 1.0
