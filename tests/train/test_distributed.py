"""Distributed training on CPU (gloo, ``torchrun --nproc_per_node 2``): a checkpoint resumes on
another number of processes (2 -> 1, 1 -> 2) with the losses of an uninterrupted run, a stop seen
by one rank stops every rank, and FSDP2 (``--fsdp``) trains like one process and writes
checkpoints that resume with or without it.

Every run trains the same global batch: one process with ``batch`` rows equals two with
``batch // 2`` each, to float tolerance (the all-reduce sums in another order)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlgraph.cli import main
from nlgraph.train.checkpoint import load_checkpoint
from nlgraph.train.loop import TrainConfig, TrainError, train
from trainhelp import free_port, write_corpus

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")

SPEC = "transformer_pp"  # tied embedding and head: FSDP must store the tied weight once, like one process
TINY = ["vars.d_model=32", "vars.layers=1", "vars.heads=2", "levels.mlp.memory.hidden=64"]
STEPS, STOP = 5, 2

# run by torchrun: train() with a SIGTERM sent to rank 0 alone after step `stop_at`
WORKER = """
import json, os, signal, sys
from nlgraph.train.loop import TrainConfig, train
args = json.loads(sys.argv[1])
spec, resume, stop, results = args.pop("spec"), args.pop("resume"), args.pop("stop_at"), args.pop("results")
def on_step(step, loss, model):
    if step == stop and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGTERM)
res = train(spec, TrainConfig(**args), resume=resume, on_step=on_step)
# a file per rank: lines the ranks print to one pipe can interleave
with open(os.path.join(results, "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({"rank": int(os.environ["RANK"]), "step": res.step, "stopped": res.stopped}, f)
# leave the process group as `nlgraph train` does: gloo torn down at exit aborted a rank in CI
from nlgraph.cli import _close_process_group
_close_process_group(True)
"""


def _cfg(out: Path, text: Path, **kw) -> dict:
    base = dict(out=str(out), steps=STEPS, batch=4, length=32, lr=1e-3, eval_every=STEPS, eval_batches=2,
                device="cpu", data=str(text), overrides=list(TINY), progress=False)
    base.update(kw)
    return base


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _val(out: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r}


def _stop_at(step: int):
    def on_step(s, loss, model):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_step


def _torchrun(tmp: Path, cfg: dict, *, resume: bool = False, stop_at: int | None = None,
              spec: str | dict = SPEC) -> list[dict]:
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    results = tmp / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    args = json.dumps({**cfg, "spec": spec, "resume": resume, "stop_at": stop_at, "results": str(results)})
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(free_port()), str(worker), args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(f.read_text()) for f in sorted(results.iterdir())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The corpus, an uninterrupted one-process run and a one-process run stopped after step STOP."""
    root = tmp_path_factory.mktemp("dist")
    text = write_corpus(root / "corpus.txt")
    train(SPEC, TrainConfig(**_cfg(root / "ref", text)))
    res = train(SPEC, TrainConfig(**_cfg(root / "one_stopped", text)), on_step=_stop_at(STOP))
    assert res.stopped == "interrupted" and res.step == STOP
    return {"text": text, "ref": root / "ref", "one_stopped": root / "one_stopped"}


def _assert_continues_the_reference(out: Path, ref: Path) -> None:
    """Every step's loss, the final validation loss and the final weights of ``out`` equal the
    uninterrupted one-process run's, to float tolerance."""
    a, b = _losses(ref), _losses(out)
    assert sorted(b) == sorted(a) == list(range(1, STEPS + 1))  # nothing logged twice or lost
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s
    assert _val(out)[STEPS] == pytest.approx(_val(ref)[STEPS], rel=1e-5)
    wa, wb = load_checkpoint(ref), load_checkpoint(out)
    assert wb.step == wa.step == STEPS
    assert set(wb.model) == set(wa.model) and wb.state["aliases"] == wa.state["aliases"]
    for k in wa.model:
        torch.testing.assert_close(wb.model[k], wa.model[k], rtol=1e-4, atol=1e-6)
    assert set(wb.optimizer) == set(wa.optimizer)
    for k in wa.optimizer:
        torch.testing.assert_close(wb.optimizer[k], wa.optimizer[k], rtol=1e-4, atol=1e-7)


def _assert_stopped_at(out: Path, results: list[dict], world: int, fsdp: bool = False) -> None:
    # SIGTERM reached rank 0 only, yet both ranks stopped after the same step
    assert sorted((r["rank"], r["step"], r["stopped"]) for r in results) == \
        [(0, STOP, "interrupted"), (1, STOP, "interrupted")]
    ckpt = load_checkpoint(out)
    assert ckpt.step == STOP and ckpt.state["world"] == world and ckpt.state["fsdp"] is fsdp
    assert ckpt.state["data"]["batcher"]["step"] == STOP


def test_two_processes_stopped_at_step_2_resume_on_one(runs, tmp_path):
    """DDP on 2 ranks, stopped by a SIGTERM to rank 0 after step 2, resumed by 1 process: every
    step, the final weights and AdamW state equal the uninterrupted one-process run."""
    text = runs["text"]
    out = tmp_path / "two_one"
    _assert_stopped_at(out, _torchrun(tmp_path, _cfg(out, text), stop_at=STOP), world=2)
    res = train(SPEC, TrainConfig(**_cfg(out, text)), resume=True)
    assert res.step == STEPS and load_checkpoint(out).state["world"] == 1
    _assert_continues_the_reference(out, runs["ref"])


def test_fsdp_on_two_processes_trains_like_one_and_resumes_without_fsdp(runs, tmp_path):
    """``--fsdp`` on 2 ranks, stopped after step 2: its losses equal one process', its checkpoint
    has the one-process layout, and one process without FSDP resumes it to the uninterrupted
    run's losses, weights and AdamW state."""
    text = runs["text"]
    out = tmp_path / "fsdp_one"
    _assert_stopped_at(out, _torchrun(tmp_path, _cfg(out, text, fsdp=True), stop_at=STOP), world=2, fsdp=True)
    ckpt, ref_stop = load_checkpoint(out), load_checkpoint(runs["one_stopped"])
    # names, shapes, the tied weight stored once, AdamW state by parameter index
    assert {k: v.shape for k, v in ckpt.model.items()} == {k: v.shape for k, v in ref_stop.model.items()}
    assert ckpt.state["aliases"] == ref_stop.state["aliases"] == {"head.weight": "embed.weight"}
    assert {k: v.shape for k, v in ckpt.optimizer.items()} == {k: v.shape for k, v in ref_stop.optimizer.items()}
    assert ckpt.state["optimizer"]["param_groups"] == ref_stop.state["optimizer"]["param_groups"]
    train(SPEC, TrainConfig(**_cfg(out, text)), resume=True)
    _assert_continues_the_reference(out, runs["ref"])


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_one_process_stopped_at_step_2_resumes_on_two(runs, tmp_path, fsdp):
    """A one-process checkpoint resumed by 2 ranks (DDP, or FSDP loading the full AdamW state into
    its shards) continues with the uninterrupted one-process run's losses."""
    out = tmp_path / "one_two"
    shutil.copytree(runs["one_stopped"], out)
    results = _torchrun(tmp_path, _cfg(out, runs["text"], fsdp=fsdp), resume=True)
    assert sorted((r["rank"], r["step"], r["stopped"]) for r in results) == [(0, STEPS, "done"), (1, STEPS, "done")]
    ckpt = load_checkpoint(out)
    assert ckpt.state["world"] == 2 and ckpt.state["fsdp"] is fsdp
    _assert_continues_the_reference(out, runs["ref"])


@pytest.mark.slow
def test_persistent_memory_of_every_rank_is_saved_and_resumes_on_one_process(runs, tmp_path):
    """A ``lifetime: persistent`` level carries each batch row's memory into the next sequence.
    Two ranks save both ranks' rows (4, the global batch, not rank 0's 2), and one process resumes
    with the uninterrupted one-process run's losses (its memory rows are the ranks' in order)."""
    from safetensors.torch import load_file

    spec = {"name": "tiny_persistent",
            "levels": {"attn": {"kind": "attention", "heads": 2},
                       "cms": {"memory": {"kind": "mlp", "hidden": "2x"}, "objective": {"kind": "outer"},
                               "optimizer": {"kind": "gd", "lr": 0.1}, "frequency": 8, "lifetime": "persistent"}},
            "model": {"vocab": 256, "d_model": 16, "blocks": [["attn", "cms"]]}}
    text = runs["text"]
    ref = tmp_path / "ref"
    train(spec, TrainConfig(**_cfg(ref, text, overrides=[])))
    out = tmp_path / "two_one"
    _assert_stopped_at(out, _torchrun(tmp_path, _cfg(out, text, overrides=[]), stop_at=STOP, spec=spec), world=2)
    memory = load_file(str(out / "memory.safetensors"))
    assert memory and {v.shape[0] for v in memory.values() if v.dim()} == {4}
    train(spec, TrainConfig(**_cfg(out, text, overrides=[])), resume=True)
    _assert_continues_the_reference(out, ref)


def _outer_loop_spec() -> dict:
    """An ``updates: outer_loop`` level moved once every 384 training tokens: every 3 steps of
    4 x 32 tokens, so a stop after step 2 falls inside a period, with 2 steps' gradients held back."""
    return {"name": "tiny_outer_loop",
            "levels": {"attn": {"kind": "attention", "heads": 2},
                       "cms": {"memory": {"kind": "mlp", "hidden": "2x"},
                               "objective": {"kind": "outer", "updates": "outer_loop"},
                               "optimizer": {"kind": "gd", "lr": 0.1}, "frequency": 384}},
            "model": {"vocab": 256, "d_model": 16, "blocks": [["attn", "cms"]]}}


@pytest.fixture(scope="module")
def outer_ref(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("outer") / "ref"
    train(_outer_loop_spec(), TrainConfig(**_cfg(out, runs["text"], overrides=[], steps=6, eval_every=6)))
    return out


def _assert_same_losses(out: Path, ref: Path, exact: bool) -> None:
    a, b = _losses(ref), _losses(out)
    assert sorted(b) == sorted(a)
    for s in a:
        if exact:
            assert b[s] == a[s], s
        else:
            assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s


def test_a_stop_inside_an_outer_loop_period_resumes_exactly(runs, outer_ref, tmp_path):
    """The gradients an ``outer_loop`` level holds back inside its period, and the token count
    that says when they are released, are saved with the checkpoint (outer.safetensors): the
    resumed run equals the uninterrupted one bit for bit on CPU (without them it differed from
    step 4 on)."""
    spec, out = _outer_loop_spec(), tmp_path / "run"
    cfg = _cfg(out, runs["text"], overrides=[], steps=6, eval_every=6)
    train(spec, TrainConfig(**cfg), on_step=_stop_at(STOP))
    ckpt = load_checkpoint(out)
    held = ckpt.extra["outer.safetensors"]
    assert held and all(".cms.inner." in k for k in held)
    assert ckpt.state["outer"] == {"tokens": 2 * 128, "steps": {k: 2 for k in held}}
    train(spec, TrainConfig(**cfg), resume=True)
    _assert_same_losses(out, outer_ref, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_outer_loop_gradients_held_on_two_processes_resume_on_one(runs, outer_ref, tmp_path, fsdp):
    """2 ranks (DDP, or FSDP with the held-back sums sharded) stopped inside an outer-loop period;
    one process resumes them to the uninterrupted one-process run's losses."""
    spec, out = _outer_loop_spec(), tmp_path / "run"
    cfg = _cfg(out, runs["text"], overrides=[], steps=6, eval_every=6)
    _assert_stopped_at(out, _torchrun(tmp_path, {**cfg, "fsdp": fsdp}, stop_at=STOP, spec=spec), world=2, fsdp=fsdp)
    assert load_checkpoint(out).extra["outer.safetensors"]
    train(spec, TrainConfig(**cfg), resume=True)
    _assert_same_losses(out, outer_ref, exact=False)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_outer_loop_gradients_held_on_one_process_resume_on_two(runs, outer_ref, tmp_path, fsdp):
    """The other way: one process stopped inside the period, 2 ranks resume (under FSDP each rank
    takes its shard of the held-back sums)."""
    spec, out = _outer_loop_spec(), tmp_path / "run"
    cfg = _cfg(out, runs["text"], overrides=[], steps=6, eval_every=6)
    train(spec, TrainConfig(**cfg), on_step=_stop_at(STOP))
    _torchrun(tmp_path, {**cfg, "fsdp": fsdp}, resume=True, spec=spec)
    _assert_same_losses(out, outer_ref, exact=False)


def test_resume_refuses_another_global_batch_or_a_world_that_does_not_split_it(runs, tmp_path, monkeypatch,
                                                                              capsys):
    text = runs["text"]
    out = tmp_path / "run"
    shutil.copytree(runs["one_stopped"], out)
    with pytest.raises(TrainError, match=r"--batch 6: the checkpoint was trained with a global batch of 4 "
                                         r"\(on 1 process\); resume with --batch 4"):
        train(SPEC, TrainConfig(**_cfg(out, text, batch=6)), resume=True)
    import nlgraph.train.loop as loop

    # 3 ranks (as torchrun --nproc_per_node 3 would start) cannot split a global batch of 4; the
    # check runs before any collective, so the rank count alone is what matters here
    monkeypatch.setattr(loop, "_init_dist", lambda hint: loop._Dist(rank=0, world=3, local_rank=0))
    with pytest.raises(TrainError, match=r"--batch 4 \(the checkpoint's global batch\) does not split over 3 "
                                         r"processes; resume with a torchrun --nproc_per_node that divides 4"):
        train(SPEC, TrainConfig(**_cfg(out, text)), resume=True)
    monkeypatch.undo()
    assert load_checkpoint(out).step == STOP  # nothing was changed
    capsys.readouterr()
    code = main(["train", SPEC, *TINY, f"data={text}", "--out", str(out), "--resume", "--batch", "6",
                 "--steps", str(STEPS), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "resume with --batch 4" in err and "Traceback" not in err


def test_fsdp_needs_torchrun_and_refuses_compile_and_cuda_graphs(runs, tmp_path, capsys):
    text = runs["text"]
    code = main(["train", SPEC, *TINY, f"data={text}", "--out", str(tmp_path / "a"), "--fsdp", "--steps", "1",
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "torchrun --nproc_per_node N" in err and "--fsdp" in err
    assert not (tmp_path / "a").exists()
    import nlgraph.train.loop as loop

    for kw, expect in (({"compile": True}, "--no-compile"), ({"cuda_graph": True}, "--cuda-graph")):
        with pytest.MonkeyPatch.context() as mp:
            # the checks come before any collective: a 2-rank world is enough to reach them
            mp.setattr(loop, "_init_dist", lambda hint: loop._Dist(rank=0, world=2, local_rank=0))
            with pytest.raises(TrainError, match=expect):
                train(SPEC, TrainConfig(**_cfg(tmp_path / "b", text, fsdp=True, **kw)))


def test_two_processes_recomputing_their_blocks_train_like_one(runs, tmp_path):
    """DDP with ``recompute_blocks`` (each block run again in the backward, its parameters' gradients
    returned by the recomputation): every step's loss and the final weights equal the one-process
    run without it."""
    out = tmp_path / "recompute"
    results = _torchrun(tmp_path, _cfg(out, runs["text"], recompute_blocks=True))
    assert sorted(r["step"] for r in results) == [STEPS, STEPS]
    assert load_checkpoint(out).state["config"]["recompute_blocks"] is True  # the ranks ran with it
    _assert_continues_the_reference(out, runs["ref"])


def test_recompute_blocks_from_the_cli_trains_like_without_and_refuses_cuda_graphs(runs, tmp_path, capsys,
                                                                                  monkeypatch):
    from nlgraph.model import NLModel

    text = runs["text"]
    asked: list = []
    recompute = NLModel.recompute
    monkeypatch.setattr(NLModel, "recompute", lambda self, on=True: asked.append(on) or recompute(self, on))
    code = main(["train", SPEC, *TINY, f"data={text}", "--out", str(tmp_path / "r"), "--recompute-blocks",
                 "--steps", str(STEPS), "--batch", "4", "--length", "32", "--lr", "1e-3", "--eval-every", str(STEPS),
                 "--eval-batches", "2", "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert asked == [True]
    a, b = _losses(runs["ref"]), _losses(tmp_path / "r")
    assert sorted(a) == sorted(b) and all(b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6) for s in a)
    capsys.readouterr()
    code = main(["train", SPEC, *TINY, f"data={text}", "--out", str(tmp_path / "g"), "--recompute-blocks",
                 "--cuda-graph", "--steps", "1", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--recompute-blocks" in err and "--cuda-graph" in err
    assert not (tmp_path / "g").exists()
    import nlgraph.train.loop as loop

    with pytest.MonkeyPatch.context() as mp:  # a 2-rank world reaches the check before any collective
        mp.setattr(loop, "_init_dist", lambda hint: loop._Dist(rank=0, world=2, local_rank=0))
        with pytest.raises(TrainError, match="--recompute-blocks with --fsdp"):
            train(SPEC, TrainConfig(**_cfg(tmp_path / "f", text, recompute_blocks=True, fsdp=True)))
