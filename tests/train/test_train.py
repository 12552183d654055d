"""nlgraph train: exact resume, checkpoints that survive crashes and refuse damage, clean stops on
SIGTERM and on a non-finite loss, and DDP (gloo, 2 CPU processes) equal to one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlgraph.cli import main
from nlgraph.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from nlgraph.train.loop import TrainConfig, TrainError, lr_at, train
from trainhelp import free_port, write_corpus

TINY = ["vars.d_model=32", "vars.layers=1", "vars.heads=2", "levels.mlp.memory.hidden=64"]


@pytest.fixture
def text(tmp_path) -> Path:
    """A small corpus written by the test: pseudo-sentences over a fixed word list."""
    return write_corpus(tmp_path / "corpus.txt")


def _cfg(out: Path, data: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), steps=6, batch=2, length=32, lr=1e-3, eval_every=3, eval_batches=2,
                device="cpu", data=str(data), overrides=list(TINY), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half-way through the cosine


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, text):
    full = tmp_path / "full"
    train("transformer_pp", _cfg(full, text))

    part = tmp_path / "part"

    def interrupt(step, loss, model):
        if step == 4:  # not a checkpoint step: the stop itself must save
            os.kill(os.getpid(), signal.SIGTERM)

    res = train("transformer_pp", _cfg(part, text), on_step=interrupt)
    assert res.stopped == "interrupted" and res.step == 4
    assert load_checkpoint(part).step == 4  # SIGTERM left a loadable checkpoint
    res = train("transformer_pp", _cfg(part, text), resume=True)
    assert res.step == 6
    a, b = _losses(full), _losses(part)
    assert sorted(b) == list(range(1, 7))  # nothing logged twice
    assert a == b  # bit for bit on CPU


def test_resume_refuses_a_checkpoint_of_another_spec(tmp_path, text, capsys):
    out = tmp_path / "run"
    train("transformer_pp", _cfg(out, text, steps=3))
    with pytest.raises(CheckpointError, match="another spec"):
        train("transformer_pp", _cfg(out, text, steps=6, overrides=[*TINY, "vars.layers=2"]), resume=True)
    capsys.readouterr()
    code = main(["train", "transformer_pp", *TINY, "vars.layers=2", "--out", str(out), "--resume",
                 "--data", str(text), "--device", "cpu", "--steps", "6", "--batch", "2", "--length", "32"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "another spec" in err and "Traceback" not in err


def _tiny_checkpoint(out: Path, step: int, value: float) -> None:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    spec_yaml = __import__("nlgraph").dump_spec(__import__("nlgraph").load_spec("transformer_pp", TINY))
    from nlgraph.spec.loader import load_spec, spec_hash

    save_checkpoint(out, step=step, model=model, optimizer=None, spec_yaml=spec_yaml,
                    spec_hash=spec_hash(load_spec(spec_yaml)), state={"data": {}})


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _tiny_checkpoint(out, 1, 1.0)
    import nlgraph.train.checkpoint as ck

    real = ck._write_synced

    def crash(path, data):
        if path.name == "optimizer.safetensors" or path.name == "state.json":
            path.write_bytes(data[: len(data) // 2])  # half written, then the process dies
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(ck, "_write_synced", crash)
    with pytest.raises(OSError):
        _tiny_checkpoint(out, 2, 2.0)
    monkeypatch.setattr(ck, "_write_synced", real)
    ckpt = load_checkpoint(out)
    assert ckpt.step == 1 and float(ckpt.model["weight"][0, 0]) == 1.0


def test_a_fresh_run_never_overwrites_a_previous_run(tmp_path, text, capsys):
    """Training without --resume into a folder that holds a run is refused and changes nothing;
    a command that owns its folder (``replace``) starts over there."""
    out = tmp_path / "run"
    train("transformer_pp", _cfg(out, text, steps=3, eval_every=3))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(TrainError, match=r"already holds a run \(a checkpoint at step 3\).*--resume"):
        train("transformer_pp", _cfg(out, text, steps=2, eval_every=2))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    capsys.readouterr()
    assert main(["train", "transformer_pp", *TINY, "--out", str(out), "--steps", "2", "--device", "cpu",
                 "--data", str(text), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0]
    res = train("transformer_pp", _cfg(out, text, steps=2, eval_every=2, replace=True))
    assert res.step == 2 and load_checkpoint(out).step == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert sorted(_losses(out)) == [1, 2]


def test_pruning_orders_checkpoints_by_step_number(tmp_path):
    out = tmp_path / "run"
    _tiny_checkpoint(out, 999_999, 1.0)
    _tiny_checkpoint(out, 1_000_000, 2.0)  # "step-1000000" < "step-999999" as text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1000000"]
    assert load_checkpoint(out).step == 1_000_000


def test_pruning_keeps_the_new_checkpoint_and_leaves_later_steps(tmp_path):
    """``keep`` prunes earlier steps only: the checkpoint just written is never removed, even when
    the folder holds a later step of some other run."""
    out = tmp_path / "run"
    _tiny_checkpoint(out, 84, 8.0)
    _tiny_checkpoint(out, 1, 1.0)
    _tiny_checkpoint(out, 2, 2.0)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000084"]
    ckpt = load_checkpoint(out)
    assert ckpt.step == 2 and float(ckpt.model["weight"][0, 0]) == 2.0


def test_pruning_keeps_the_last_keep_checkpoints(tmp_path):
    """``keep`` = 4 over steps 1..6: nothing is removed until more than four exist, then the oldest
    go (a negative slice bound once removed steps 1 and 2 at step 4)."""
    out = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    seen = []
    for step in range(1, 7):
        save_checkpoint(out, step=step, model=model, optimizer=None, spec_yaml="", spec_hash="h",
                        state={"data": {}}, keep=4)
        seen.append([int(p.name.split("-")[1]) for p in sorted((out / "checkpoints").iterdir())])
    assert seen == [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]]


def test_an_unfinished_first_checkpoint_is_not_a_run(tmp_path):
    """A process killed while writing its first checkpoint leaves only ``step-N.tmp``: --resume
    refuses that folder (no latest.json), so a fresh run must not refuse it too."""
    from nlgraph.train.checkpoint import existing_run

    out = tmp_path / "run"
    (out / "checkpoints" / "step-000005.tmp").mkdir(parents=True)
    assert existing_run(out) is None
    (out / "checkpoints" / "step-000004").mkdir()
    assert existing_run(out) == "checkpoints"


@pytest.mark.parametrize("damage", ["truncate", "flip", "state"])
def test_damaged_checkpoints_are_refused_with_one_clear_line(tmp_path, damage, capsys):
    out = tmp_path / "run"
    _tiny_checkpoint(out, 1, 1.0)
    _tiny_checkpoint(out, 2, 2.0)  # keep=1: only step 2 remains
    path = latest_checkpoint(out)
    if damage == "truncate":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-5])
        expect = "truncated or corrupted"
    elif damage == "flip":
        f = path / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
        expect = "truncated or corrupted"
    else:
        f = path / "state.json"
        f.write_text(f.read_text()[:40])
        expect = "not valid JSON"
    with pytest.raises(CheckpointError, match=expect) as info:
        load_checkpoint(out)
    assert "\n" not in str(info.value) and str(f) in str(info.value)
    assert main(["sample", str(out), "--tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_tampered_spec_is_refused(tmp_path):
    out = tmp_path / "run"
    _tiny_checkpoint(out, 1, 1.0)
    path = latest_checkpoint(out)
    state = json.loads((path / "state.json").read_text())
    spec = (path / "spec.yaml").read_text().replace("d_model: 32", "d_model: 48")
    (path / "spec.yaml").write_text(spec)
    import hashlib

    state["files"]["spec.yaml"] = hashlib.sha256(spec.encode()).hexdigest()  # checksums fixed up too
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="altered"):
        load_checkpoint(out)


def test_a_time_limited_run_is_evaluated_where_it_stops_and_resumes_exactly(tmp_path, text):
    """--time-limit: the step it stops after carries a validation loss (as a complete run's last
    step does), and that evaluation leaves training as it was: resumed, the run gives the
    uninterrupted run's losses at every later step."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train("transformer_pp", _cfg(whole, text))
    res = train("transformer_pp", _cfg(cut, text, time_limit=1e-9))
    recs = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert res.stopped == "time limit" and res.step == 1 and [r["step"] for r in recs] == [1]
    assert recs[-1]["val_loss"] == pytest.approx(res.val_loss, abs=1e-6)
    train("transformer_pp", _cfg(cut, text), resume=True)
    assert _losses(cut) == pytest.approx(_losses(whole), abs=1e-6)


def test_a_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, text):
    out = tmp_path / "run"

    def poison(step, loss, model):
        if step == 3:  # after the step-3 checkpoint: break the first block's attention output
            with torch.no_grad():
                model.blocks[0].entries["attn"].inner.attn.out.weight.fill_(float("nan"))

    with pytest.raises(TrainError) as info:
        train("transformer_pp", _cfg(out, text), on_step=poison)
    msg = str(info.value)
    assert "step 4" in msg and "block 0, level 'attn'" in msg and "step-000003" in msg
    ckpt = load_checkpoint(out)
    assert ckpt.step == 3 and all(torch.isfinite(t).all() for t in ckpt.model.values())


def test_cli_train_writes_metrics_plot_and_summary(tmp_path, text, capsys):
    out = tmp_path / "cli"
    code = main(["train", "transformer_pp", *TINY, f"data={text}", "--out", str(out), "--steps", "4",
                 "--batch", "2", "--length", "32", "--eval-every", "2", "--device", "cpu", "--sample", "20"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("done: transformer_pp, step 4/4")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert {"step", "loss", "tokens", "tok_s", "lr"} <= set(recs[0]) and "val_loss" in recs[1]
    assert recs[-1]["tokens"] == 4 * 2 * 32
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "spec.yaml").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_ddp_with_gloo_on_two_processes_equals_one_process(tmp_path, text):
    torchrun = Path(sys.executable).with_name("torchrun")
    common = ["gated_deltanet", "vars.d_model=32", "vars.layers=1", "vars.heads=2", "levels.mlp.memory.hidden=64",
              f"data={text}", "--steps", "3", "--batch", "4", "--length", "32", "--device", "cpu",
              "--eval-every", "3", "--eval-batches", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "nlgraph", "train", *common, "--out", str(one)], check=True, env=env,
                   capture_output=True, timeout=300)
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(free_port()), "-m", "nlgraph", "train",
                        *common, "--out", str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6)
    wa, wb = load_checkpoint(one).model, load_checkpoint(two).model
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["fifo", "symlink_outside", "nan_json", "deep_json", "spec_is_a_name"])
def test_hostile_checkpoints_are_refused_without_reading_beyond(tmp_path, case):
    out = tmp_path / "run"
    _tiny_checkpoint(out, 1, 1.0)
    path = latest_checkpoint(out)
    state = path / "state.json"
    if case == "fifo":
        state.unlink()
        os.mkfifo(state)  # reading it would block forever
        expect = "not a regular file"
    elif case == "symlink_outside":
        secret = tmp_path / "secret.yaml"
        secret.write_text("name: secret\n")
        (path / "spec.yaml").unlink()
        (path / "spec.yaml").symlink_to(secret)
        expect = "outside the checkpoint folder"
    elif case == "nan_json":
        state.write_text(state.read_text().replace('"step": 1', '"step": NaN'))
        expect = "not valid JSON"
    elif case == "deep_json":
        state.write_text("[" * 100_000 + "]" * 100_000)
        expect = "not valid JSON"
    else:  # a one-line spec.yaml naming a library spec must not be looked up as a name or a path
        import hashlib

        (path / "spec.yaml").write_text("transformer_pp")
        rec = json.loads(state.read_text())
        rec["files"]["spec.yaml"] = hashlib.sha256(b"transformer_pp").hexdigest()
        state.write_text(json.dumps(rec))
        expect = "stored spec does not load"
    with pytest.raises(CheckpointError, match=expect) as info:
        load_checkpoint(out)
    assert "\n" not in str(info.value)


def test_cli_errors_are_one_line(tmp_path, text, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cases = [
        (["--out", str(blocker / "run")], "Not a directory"),
        (["--tokenizer", "gpt2", "--out", str(tmp_path / "a")], "model.vocab"),
        (["--task", "mqar", "--out", str(tmp_path / "b")], "--task-setting vocab_size=256"),
    ]
    for extra, expect in cases:
        code = main(["train", "transformer_pp", *TINY, f"data={text}", "--steps", "1", "--device", "cpu", *extra])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and expect in err, err


def _cms_spec(updates: str, period: int, lifetime: str = "sequence") -> dict:
    return {"name": "tiny_cms_train",
            "levels": {"attn": {"kind": "attention", "heads": 2},
                       "cms": {"memory": {"kind": "mlp", "hidden": "2x"},
                               "objective": {"kind": "outer", "updates": updates},
                               "optimizer": {"kind": "gd", "lr": 0.1}, "frequency": period,
                               "lifetime": lifetime}},
            "model": {"vocab": 256, "d_model": 16, "blocks": [["attn", "cms"]]}}


def test_an_outer_loop_level_moves_only_every_period_of_training_tokens(tmp_path, text):
    """``updates: outer_loop`` with C = 128 training tokens and 64 tokens a step (2 × 32): the
    optimizer moves the level on every second step only; the rest of the model every step."""
    seen = []

    def record(step, loss, model):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

    train(_cms_spec("outer_loop", 128), _cfg(tmp_path / "run", text, overrides=[], weight_decay=0.0),
          on_step=record)
    # the level's own MLP; the pre-norm of its residual is an ordinary parameter
    cms = [n for n in seen[0] if ".cms.inner." in n]
    other = [n for n in seen[0] if ".cms.inner." not in n]
    assert cms and other
    for step in range(1, len(seen)):
        moved = any(not torch.equal(seen[step][n], seen[step - 1][n]) for n in cms)
        assert moved == (step % 2 == 1), step  # steps 2, 4, 6 (0-based 1, 3, 5) cross 128k tokens
        assert all(not torch.equal(seen[step][n], seen[step - 1][n]) for n in other)


def test_persistent_memory_is_saved_with_the_run_and_restored_on_resume(tmp_path, text):
    """A ``lifetime: persistent`` level's carried memory is written with each checkpoint and read
    back on ``--resume``: the resumed step differs from one resumed without the file (which starts
    the memory afresh), and equals an uninterrupted run's."""
    import shutil

    spec = _cms_spec("in_context", 8, lifetime="persistent")
    full = tmp_path / "full"
    train(spec, _cfg(full, text, overrides=[], steps=4, eval_every=3))
    out = tmp_path / "run"

    def interrupt(step, loss, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    res = train(spec, _cfg(out, text, overrides=[], steps=4, eval_every=3), on_step=interrupt)
    assert res.step == 3 and (out / "memory.safetensors").is_file()
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "memory.safetensors").unlink()
    train(spec, _cfg(out, text, overrides=[], steps=4, eval_every=3), resume=True)
    train(spec, _cfg(bare, text, overrides=[], steps=4, eval_every=3), resume=True)
    assert _losses(out)[4] == _losses(full)[4]
    assert _losses(bare)[4] != _losses(out)[4]


def test_eval_and_sample_no_learn_freeze_in_context_levels(tmp_path, text, capsys):
    """``--no-learn``: the run's in-context CMS reads its trained parameters only, so perplexity
    differs from the learning model's; sampling takes the flag too."""
    import yaml

    spec = tmp_path / "cms.yaml"
    spec.write_text(yaml.safe_dump(_cms_spec("in_context", 4)))
    out = tmp_path / "run"
    assert main(["train", str(spec), f"data={text}", "--out", str(out), "--steps", "2", "--batch", "2",
                 "--length", "32", "--eval-every", "2", "--device", "cpu", "--lr", "1e-2"]) == 0
    capsys.readouterr()
    ppl = {}
    for flag in ([], ["--no-learn"]):
        assert main(["eval", str(out), "--task", "ppl", f"data={text}", "--eval-batches", "2",
                     "--length", "32", "--device", "cpu", *flag]) == 0
        ppl[bool(flag)] = capsys.readouterr().out
    assert ppl[True] != ppl[False]
    assert main(["sample", str(out), "--tokens", "8", "--device", "cpu", "--no-learn"]) == 0
    assert capsys.readouterr().out


class _CompileFailure(torch._dynamo.exc.TorchDynamoException):
    """Stands for what torch.compile raises on a graph it cannot lower."""


def _failing_compile(monkeypatch, error: type[BaseException] = _CompileFailure):
    from nlgraph.model import NLModel

    def compile_blocks(self, **_):
        def boom(*args, **kwargs):
            raise error("could not guard on data-dependent expression u1 % 16")

        self._compiled = [boom for _ in self.blocks]
        return self

    monkeypatch.setattr(NLModel, "compile_blocks", compile_blocks)


def test_a_default_compile_that_fails_trains_eagerly_with_a_note(tmp_path, text, capsys, monkeypatch):
    """Compiling by default (CUDA): a torch.compile failure at the first step falls back to eager,
    which trains the same losses as an eager run; asked for explicitly it is one clear error."""
    import nlgraph.train.loop as loop

    eager = train("transformer_pp", _cfg(tmp_path / "eager", text, steps=3, compile=False))
    _failing_compile(monkeypatch)
    monkeypatch.setattr(loop, "default_compile", lambda device, cfg: True)
    res = train("transformer_pp", _cfg(tmp_path / "fallback", text, steps=3, progress=True))
    assert res.step == 3
    assert _losses(tmp_path / "fallback") == _losses(tmp_path / "eager") and res.step == eager.step
    out = capsys.readouterr()
    assert "note: torch.compile failed on this model (_CompileFailure: could not guard" in out.out + out.err
    with pytest.raises(TrainError, match=r"torch\.compile failed on this model .*train it eagerly \(--no-compile\)"):
        train("transformer_pp", _cfg(tmp_path / "explicit", text, steps=3, compile=True))


def test_a_model_error_under_compile_is_not_taken_for_a_compile_failure(tmp_path, text, monkeypatch):
    import nlgraph.train.loop as loop

    _failing_compile(monkeypatch, error=ValueError)
    monkeypatch.setattr(loop, "default_compile", lambda device, cfg: True)
    with pytest.raises(ValueError, match="data-dependent"):
        train("transformer_pp", _cfg(tmp_path / "run", text, steps=2))


def test_cuda_graphs_refuse_persistent_memory(tmp_path, text):
    """A replayed CUDA graph would read the persistent memory it captured at every step, so
    ``--cuda-graph`` with a ``lifetime: persistent`` level is one clear error (and the default
    leaves graphs off for such a spec)."""
    spec = _cms_spec("in_context", 8, lifetime="persistent")
    with pytest.raises(TrainError, match="lifetime: persistent"):
        train(spec, _cfg(tmp_path / "run", text, overrides=[], steps=1, cuda_graph=True))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
