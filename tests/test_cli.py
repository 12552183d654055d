"""The nlgraph command: outputs, exit codes (0 ok / 1 invalid spec / 2 usage), files it writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nlgraph.cli import main

ROOT = Path(__file__).parent.parent


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_ok(capsys):
    code, out, err = run(["validate", "hope"], capsys)
    assert code == 0 and err == ""
    assert out.startswith("ok: ") and "hope (hash " in out


def test_show_prints_resolved_yaml_and_table(capsys):
    code, out, _ = run(["show", "gated_deltanet", "vars.layers=2"], capsys)
    assert code == 0
    assert "repeat: 2" in out and "${" not in out
    assert "b0.mixer  Gated DeltaNet" in out
    assert "node" in out and "frequency" in out


@pytest.mark.parametrize("ext,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".dot", b"digraph")])
def test_show_draws_the_graph(tmp_path, capsys, ext, magic):
    out_file = tmp_path / f"hope{ext}"
    code, out, _ = run(["show", "hope", "--no-yaml", "--graph", str(out_file)], capsys)
    assert code == 0 and f"graph drawn to {out_file}" in out
    assert out_file.read_bytes().startswith(magic)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left"


def test_dot_names_every_frequency_band(tmp_path, capsys):
    out_file = tmp_path / "g.dot"
    run(["show", "hope", "--no-yaml", "--graph", str(out_file)], capsys)
    dot = out_file.read_text()
    for band in ("every token", "every 16 tokens", "every 2048 tokens", "outer loop only"):
        assert band in dot


def test_bad_graph_extension_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["show", "hope", "--graph", "out.txt"])
    assert e.value.code == 2
    assert "use a .png, .svg, .pdf or .dot file" in capsys.readouterr().err


def test_unwritable_graph_path_is_one_line(capsys, tmp_path):
    code, _, err = run(["show", "hope", "--no-yaml", "--graph", str(tmp_path / "nodir" / "g.png")], capsys)
    assert code == 1 and err.startswith("error: cannot write") and len(err.splitlines()) == 1


def test_existing_graph_file_survives_a_failed_run(tmp_path, capsys):
    target = tmp_path / "g.dot"
    target.write_text("previous")
    code, _, _ = run(["show", "hope", "levels.titans.memory.kind=nope", "--graph", str(target)], capsys)
    assert code == 1 and target.read_text() == "previous"


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["frobnicate"], ["validate"], ["show", "--graph"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_list_shows_library(capsys):
    code, out, _ = run(["list"], capsys)
    assert code == 0 and "hope" in out and "_fragments" not in out


def test_schema_is_json(capsys, tmp_path):
    code, out, _ = run(["schema"], capsys)
    schema = json.loads(out)
    assert code == 0 and "levels" in schema["properties"]
    code, _, _ = run(["schema", "--out", str(tmp_path / "s.json")], capsys)
    assert json.loads((tmp_path / "s.json").read_text()) == schema


def test_help_everywhere():
    for argv in (["--help"], *([c, "--help"] for c in ("validate", "show", "compile", "equiv", "list", "schema"))):
        r = subprocess.run([sys.executable, "-m", "nlgraph.cli", *argv], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: nlgraph" in r.stdout


def test_console_script_reports_user_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("levels: {}\nmodel: {vocab: 2, d_model: 4, blocks: [x]}\n")
    r = subprocess.run([sys.executable, "-m", "nlgraph.cli", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == f"error: {bad}:1: levels: needs at least 1 entry, got 0\n"


def test_overrides_may_follow_options(capsys):
    code, out, _ = run(["show", "deltanet", "--no-yaml", "levels.mixer.frequency=4"], capsys)
    assert code == 0 and "every 4 tokens" in out


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["validate", "hope", "--bogus"])
    assert e.value.code == 2


def test_compile_prints_the_plan_and_checks(capsys):
    code, out, err = run(["compile", "transformer_pp", "vars.d_model=32", "vars.heads=2", "vars.layers=1",
                          "--check", "--length", "8"], capsys)
    assert code == 0, err
    assert "b0.attn" in out and "sdpa" in out and "parameters:" in out
    assert "check: forward+backward on (2, 8) tokens ok" in out


def test_compile_plans_for_a_device_and_dtype_this_machine_may_lack(capsys):
    """``--device cuda`` shows the forms a GPU run will use, also on a machine without one (the
    model is laid out on ``meta``); ``--dtype float64`` is no kernel's; ``--check`` needs the device."""
    import torch

    from nlgraph.compilers.kernels import dispatch

    small = ["gated_deltanet", "vars.d_model=32", "vars.heads=2", "vars.layers=1"]
    code, out, err = run(["compile", *small, "--device", "cuda"], capsys)
    assert code == 0, err
    mixer = next(line for line in out.splitlines() if line.startswith("b0.mixer"))
    assert mixer.split()[3] == ("triton" if dispatch.why_no_kernel("cuda") is None else "chunked")
    code, out, err = run(["compile", *small, "--device", "cuda", "--dtype", "float64"], capsys)
    assert code == 0 and next(ln for ln in out.splitlines() if ln.startswith("b0.mixer")).split()[3] == "chunked"
    if not torch.cuda.is_available():
        code, out, err = run(["compile", *small, "--device", "cuda", "--check"], capsys)
        assert code == 1 and err.startswith("error: --device: --check runs on device 'cuda'") and "\n" not in err.strip()
