"""``nlgraph bench``: without CUDA it says so and exits 0; ``--device cpu`` runs the whole command
(anchor first, a row per length and mode, B·T fixed with --tokens, JSON); bad modes are one line."""

from __future__ import annotations

import json
import os
import sys

import pytest
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
        # compile time: the first step's beyond a timed step's
        assert abs(r["compile_s"] - max(r["first_step_s"] - r["ms"] / 1e3, 0.0)) < 2e-3  # of rounded figures
        assert r["vs_anchor"] == (1.0 if r["anchor"] else round(r["tok_s"] / rows[0 if r["T"] == 16 else 2]["tok_s"], 4))
    # the anchor has the spec's width and depth
    assert rows[0]["params"] < 2 * rows[1]["params"] and rows[1]["params"] < 2 * rows[0]["params"]
    printed = capsys.readouterr().out
    assert "| gated_deltanet | 16 | 4 | eager |" in printed and "| first step s | compile s | ms/step |" in printed


def test_tf32_holds_for_the_run_is_recorded_and_put_back(tmp_path, monkeypatch):
    seen = []
    real = torch.nn.Module.__call__

    def call(self, *a, **k):  # what the steps ran under
        seen.append(torch.get_float32_matmul_precision())
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "__call__", call)
    before = torch.get_float32_matmul_precision()
    out = tmp_path / "b.json"
    assert main(["bench", "gated_deltanet", *TINY, "--device", "cpu", "--modes", "eager", "--lengths", "16",
                 "--batch", "1", "--steps", "1", "--anchor", "none", "--tf32", "--json", str(out)]) == 0
    assert seen and set(seen) == {"high"}
    assert json.loads(out.read_text())["meta"]["fp32_matmul"] == "high"
    assert torch.get_float32_matmul_precision() == before
    assert main(["bench", "gated_deltanet", *TINY, "--device", "cpu", "--modes", "eager", "--lengths", "16",
                 "--batch", "1", "--steps", "1", "--anchor", "none", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["fp32_matmul"] == "as set"


def test_the_nlgraph_switches_of_the_process_are_recorded(tmp_path, monkeypatch, capsys):
    """The NLGRAPH_* variables a bench ran under go into its JSON and its header line: a figure
    says which chunk solve, tile or backward it measured."""
    for k in [k for k in os.environ if k.startswith("NLGRAPH_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("NLGRAPH_CHUNK_SOLVE", "triangular")
    out = tmp_path / "b.json"
    assert main(["bench", "gated_deltanet", *TINY, "--device", "cpu", "--modes", "eager", "--lengths", "16",
                 "--batch", "1", "--steps", "1", "--anchor", "none", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["settings"] == {"NLGRAPH_CHUNK_SOLVE": "triangular"}
    assert "after the first, NLGRAPH_CHUNK_SOLVE=triangular" in capsys.readouterr().out


def test_graph_mode_needs_cuda(capsys):
    assert main(["bench", "gated_deltanet", *TINY, "--device", "cpu", "--modes", "graph"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA device" in err[0]


def _fake_fla(monkeypatch):
    """An ``fla`` package whose kernels are nlgraph's per-token reference forms, so the level bench's
    anchor plumbing (which kernel is the same function, its inputs, the error against it) is checked
    without fla installed."""
    import sys
    import types

    from nlgraph.runtime import run_level
    from nlgraph.spec.loader import load_level

    def delta(q, k, v, beta, scale=1.0, g=None):
        entry = {"kind": "delta_rule", "heads": q.shape[2]}
        kw = {"lr": beta}
        if g is not None:
            entry["decay"] = {"act": "sigmoid"}
            kw["retention"] = g.exp()
        return run_level(load_level(entry), keys=k, values=v, queries=q, form="reference", **kw)[0] * scale, None

    from nlgraph.compilers.kernels.linear_attention import token_loop

    def gla(q, k, v, g=None, scale=1.0):
        return token_loop(q, k, v, g, None, scale)[0], None

    from nlgraph.compilers.kernels.delta_rule import token_loop as kda_loop

    def kda(q, k, v, g, beta, scale=1.0):
        return kda_loop(q, k, v, beta, g, None, scale)[0], None

    mods = {name: types.ModuleType(name) for name in
            ("fla", "fla.ops", "fla.ops.delta_rule", "fla.ops.gated_delta_rule", "fla.ops.simple_gla", "fla.ops.gla",
             "fla.ops.kda")}
    mods["fla.ops.delta_rule"].chunk_delta_rule = lambda q, k, v, beta, scale=1.0: delta(q, k, v, beta, scale)
    mods["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = (
        lambda q, k, v, g, beta, scale=1.0: delta(q, k, v, beta, scale, g))
    mods["fla.ops.simple_gla"].chunk_simple_gla = gla
    mods["fla.ops.gla"].chunk_gla = gla
    mods["fla.ops.kda"].chunk_kda = kda
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)


LEVEL = ["--device", "cpu", "--batch", "1", "--lengths", "40", "--heads", "2", "--dim", "8", "--dtype", "float32"]


def test_level_bench_times_the_level_next_to_the_same_function(tmp_path, capsys, monkeypatch):
    """``--level``: SDPA and the fla kernel of the same function as anchors, the level in the
    registry's form with its ratio to that anchor and the relative error of its outputs."""
    _fake_fla(monkeypatch)
    out = tmp_path / "level.json"
    assert main(["bench", "gated_deltanet", *TINY, "--level", "mixer", *LEVEL, "--modes", "eager",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["form"] == "chunked" and res["meta"]["anchor"] == "fla chunk_gated_delta_rule"
    assert res["meta"]["same_function"] and res["meta"]["shape"] == [1, 40, 2, 8]
    names = [r["name"] for r in res["rows"]]
    assert names == ["SDPA causal", "fla chunk_gated_delta_rule", "nlgraph mixer (chunked, eager)"]
    ours = res["rows"][2]
    assert ours["rel_err"] < 1e-5 and ours["x_anchor_fwd"] > 0 and ours["tok_s"] > 0
    assert "| nlgraph mixer (chunked, eager) |" in capsys.readouterr().out


@pytest.mark.parametrize("spec,anchor", [("mamba2", "chunk_simple_gla"), ("retnet", "chunk_simple_gla"),
                                         ("gla", "chunk_gla"), ("kda", "chunk_kda")])
def test_level_bench_of_linear_attention_compares_with_fla_gla(spec, anchor, tmp_path, monkeypatch):
    """Linear-attention levels (gd on ``dot``) are fla's ``chunk_simple_gla`` (a decay per head, or
    none) or ``chunk_gla`` (per key channel) with values ``η v`` and ``g = log α``: the same function,
    from the level's gates or its constant rates (RetNet's); the delta rule with a decay per key
    channel is ``chunk_kda``."""
    _fake_fla(monkeypatch)
    out = tmp_path / "la.json"
    assert main(["bench", spec, *TINY, "--level", "mixer", *LEVEL, "--modes", "eager", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["anchor"] == f"fla {anchor}" and res["meta"]["same_function"]
    assert res["rows"][-1]["rel_err"] < 1e-5


def test_the_titans_order_is_not_flas_gated_delta_rule():
    """fla's gated rule is αW(I − βkkᵀ); the Titans order (``weight_decay``) is W(αI − βkkᵀ): only
    ``decay`` is the same function."""
    from nlgraph.bench import _same_function
    from nlgraph.spec.loader import load_level

    level = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"}, "optimizer": {"kind": "gd", "lr": 0.5},
             "frequency": 1}
    assert _same_function(load_level(level)) == "chunk_delta_rule"
    for kind, same in (("decay", "chunk_gated_delta_rule"), ("weight_decay", None)):
        assert _same_function(load_level({**level, "retention": {"kind": kind, "gate": 0.9}})) == same


def test_level_bench_of_a_deep_memory_has_the_delta_rule_as_yardstick(tmp_path, monkeypatch):
    _fake_fla(monkeypatch)
    out = tmp_path / "deep.json"
    assert main(["bench", "titans", *TINY, "--level", "memory", *LEVEL, "--modes", "eager", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["anchor"] == "fla chunk_delta_rule" and not res["meta"]["same_function"]
    ours = res["rows"][-1]
    assert "rel_err" not in ours and ours["x_anchor_fwd_bwd"] > 0


def test_level_bench_refusals_are_one_line(capsys):
    assert main(["bench", "gated_deltanet", *TINY, "--level", "mixr", "--device", "cpu"]) == 1
    assert main(["bench", "gated_deltanet", *TINY, "--level", "mlp", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --level: the spec has no level 'mixr'") and "did you mean 'mixer'" in err[0]
    assert err[1].startswith("error: --level: level 'mlp' is an outer-loop MLP")
    assert len(err) == 2


def test_bench_level_refuses_a_level_fed_by_adaptive_projections():
    from nlgraph.bench import bench_level
    from nlgraph.errors import NLGraphError

    with pytest.raises(NLGraphError, match="adaptive projections"):
        bench_level("hope", [], "titans", device="cpu", batch=1, length=16, heads=2, dim=8, modes=("eager",))


def test_bench_level_anchor_none_leaves_fla_out(capsys):
    """``--anchor none`` with ``--level`` skips fla (its first call autotunes for minutes)."""
    assert main(["bench", "deltanet", "--level", "mixer", "--device", "cpu", "--lengths", "32", "--batch", "1",
                 "--heads", "2", "--dim", "8", "--steps", "1", "--anchor", "none"]) == 0
    err = capsys.readouterr().err
    assert "fla --anchor none: its rows are left out" in err and '"name": "fla' not in err


def test_level_and_layer_benches_sweep_the_lengths_at_fixed_tokens(tmp_path, capsys):
    """``--lengths`` with ``--level`` / ``--layer`` times each length in turn, ``--tokens`` holding
    B·T fixed: a table each, and the JSON holds every run and its rows with their T and B."""
    for part in ("--level", "--layer"):
        out = tmp_path / f"{part[2:]}.json"
        assert main(["bench", "deltanet", *TINY, part, "mixer", "--device", "cpu", "--lengths", "16", "32",
                     "--tokens", "64", "--heads", "2", "--dim", "8", "--steps", "1", "--modes", "eager",
                     "--anchor", "none", "--json", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "B=4 T=16" in printed and "B=2 T=32" in printed, printed
        res = json.loads(out.read_text())
        assert [r["meta"]["shape"][:2] for r in res["runs"]] == [[4, 16], [2, 32]]
        assert [s[:2] for s in res["meta"]["shapes"]] == [[4, 16], [2, 32]]
        mine = [r for r in res["rows"] if not r.get("anchor")]
        assert {(r["B"], r["T"]) for r in mine} == {(4, 16), (2, 32)}
        assert all(r["fwd_ms"] > 0 for r in mine)


def test_layer_bench_times_the_whole_layer(tmp_path, capsys, monkeypatch):
    """``--layer KEY`` times the entry's whole layer (forward, forward + backward); where fla's layer
    of that kind cannot be built (no fla here) its row is left out with a note."""
    monkeypatch.setitem(__import__("sys").modules, "fla", None)  # whether or not fla is installed
    out = tmp_path / "l.json"
    assert main(["bench", "gated_deltanet", *TINY, "--layer", "mixer", "--device", "cpu", "--lengths", "32",
                 "--batch", "1", "--modes", "eager", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["layer"] == "mixer" and res["meta"]["anchor"] is None and res["meta"]["params"] > 0
    (row,) = res["rows"]
    assert row["name"] == "nlgraph mixer layer (eager)" and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    captured = capsys.readouterr()
    assert "fla not available" in captured.err and "not the same function" in captured.out


@pytest.mark.parametrize("spec,layer", [("gated_deltanet", "GatedDeltaNet"), ("deltanet", "DeltaNet"),
                                        ("kda", "KimiDeltaAttention")])
def test_layer_bench_picks_flas_layer_of_the_same_kind(spec, layer, tmp_path, monkeypatch):
    """The anchor of ``--layer`` is fla's layer of the level's function: DeltaNet, GatedDeltaNet, or
    KimiDeltaAttention for a delta rule with a decay per key channel (stand-ins here: fla's layers
    need its Triton kernels on a GPU)."""
    import types

    class Stand(torch.nn.Module):  # fla's layers return (output, attentions, cache)
        def __init__(self, hidden_size, **_):
            super().__init__()
            self.proj = torch.nn.Linear(hidden_size, hidden_size)

        def forward(self, x):
            return self.proj(x), None, None

    layers = types.ModuleType("fla.layers")
    for name in ("DeltaNet", "GatedDeltaNet", "KimiDeltaAttention"):
        setattr(layers, name, type(name, (Stand,), {}))
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.layers", layers)
    out = tmp_path / "l.json"
    assert main(["bench", spec, *TINY, "--layer", "mixer", "--device", "cpu", "--lengths", "32", "--batch", "1",
                 "--modes", "eager", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["anchor"] == f"fla {layer}"
    assert [r["name"] for r in res["rows"]] == [f"fla {layer}", "nlgraph mixer layer (eager)"]


def test_an_anchors_refused_backward_keeps_its_forward(tmp_path, capsys, monkeypatch):
    """fla refuses its gated backward on triton < 3.7.1 on Hopper: the anchor's row keeps its forward
    (and the ratio to it), says why its forward + backward is missing, and the command succeeds; the
    same failure in nlgraph's own row fails the command."""
    import types

    class Refusing(torch.nn.Module):
        def __init__(self, hidden_size, **_):
            super().__init__()
            self.proj = torch.nn.Linear(hidden_size, hidden_size)

        def forward(self, x):
            y = self.proj(x)
            return (y if not torch.is_grad_enabled() else _RefusedBackward.apply(y)), None, None

    class _RefusedBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results")

    layers = types.ModuleType("fla.layers")
    layers.GatedDeltaNet = Refusing
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.layers", layers)
    out = tmp_path / "l.json"
    assert main(["bench", "gated_deltanet", *TINY, "--layer", "mixer", "--device", "cpu", "--lengths", "32",
                 "--batch", "1", "--modes", "eager", "--json", str(out)]) == 0
    fla, ours = json.loads(out.read_text())["rows"]
    assert fla["fwd_ms"] > 0 and "fwd_bwd_ms" not in fla and "error" not in fla
    assert fla["fwd_bwd_error"].startswith("RuntimeError: Triton >= 3.4.0")
    assert ours["x_anchor_fwd"] > 0 and "x_anchor_fwd_bwd" not in ours and ours["fwd_bwd_ms"] > 0
    captured = capsys.readouterr()
    assert "| failed: RuntimeError: Triton >= 3.4.0" in captured.out
    assert "fla Refusing (forward + backward) failed" in captured.err


def test_layer_bench_refusals_are_one_line(capsys):
    assert main(["bench", "gated_deltanet", *TINY, "--layer", "mixr", "--device", "cpu"]) == 1
    assert main(["bench", "gated_deltanet", *TINY, "--layer", "mixer", "--level", "mixer", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --layer: the spec's first block has no entry 'mixr'") and "mixer" in err[0]
    assert err[1].startswith("error: --layer: --level times a level alone")
    assert len(err) == 2


def test_level_bench_of_a_deep_memory_times_titans_pytorch_when_installed(capsys, monkeypatch):
    """titans-pytorch's NeuralMemory (an optional peer, never a dependency) is a row of a deep
    memory's level bench, built with the level's heads, widths and chunk, and nlgraph's rows say how
    many times faster they are than it (issue 11's yardstick)."""
    import sys
    import types

    made = {}

    class NeuralMemory(torch.nn.Module):
        def __init__(self, dim, chunk_size, heads, dim_head, default_model_kwargs):
            super().__init__()
            made.update(dim=dim, chunk_size=chunk_size, heads=heads, dim_head=dim_head, **default_model_kwargs)
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, seq):
            return seq * self.w, None

    monkeypatch.setitem(sys.modules, "titans_pytorch", types.SimpleNamespace(NeuralMemory=NeuralMemory))
    monkeypatch.setitem(sys.modules, "fla", None)
    assert main(["bench", "titans", "--level", "memory", "--device", "cpu", "--lengths", "32", "--batch", "1",
                 "--heads", "2", "--dim", "8", "--modes", "eager"]) == 0
    assert made == {"dim": 16, "chunk_size": 16, "heads": 2, "dim_head": 8, "depth": 2, "expansion_factor": 2.0}
    out = capsys.readouterr().out
    assert "| titans-pytorch NeuralMemory |" in out and "f+b speed-up vs titans-pytorch" in out


def test_recompute_blocks_times_the_spec_recomputing_and_refuses_graph_modes(tmp_path, capsys, monkeypatch):
    from nlgraph.model import NLModel

    asked: list = []
    recompute = NLModel.recompute
    monkeypatch.setattr(NLModel, "recompute", lambda self, on=True: asked.append((self.spec.name, on))
                        or recompute(self, on))
    out = tmp_path / "r.json"
    assert main(["bench", "gated_deltanet", *TINY, "--device", "cpu", "--modes", "eager", "--lengths", "16",
                 "--batch", "2", "--steps", "1", "--recompute-blocks", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["spec"], r.get("recompute", False)) for r in rows] == [("transformer_pp", False),
                                                                        ("gated_deltanet", True)]
    assert "| gated_deltanet | 16 | 2 | eager + recompute |" in capsys.readouterr().out
    assert sorted(asked) == [("gated_deltanet", True), ("transformer_pp", False)]
    assert main(["bench", "gated_deltanet", *TINY, "--device", "cpu", "--modes", "compile-graph",
                 "--recompute-blocks"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--recompute-blocks" in err[0] and "--modes eager or compile" in err[0]
    for where in ("--level", "--layer"):
        assert main(["bench", "gated_deltanet", *TINY, "--device", "cpu", where, "mixer", "--recompute-blocks"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--recompute-blocks" in err[0] and where in err[0]
