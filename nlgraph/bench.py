"""``nlgraph bench SPEC``: the training speed of a spec's model next to Transformer++ of the same
width and depth, measured in one process (issue 10 item 5).

For every sequence length (``--lengths``, with ``--tokens`` the batch is ``tokens // T`` so B·T stays
fixed) and every mode (``eager``; ``graph``: the step replayed as CUDA graphs, as ``nlgraph train``
does with ``--no-compile``; ``compile``: per-block ``torch.compile``; ``compile-graph``: both, the
compiled blocks' step captured as CUDA graphs), one AdamW training step on
random tokens is timed: the first step alone (it holds compilation or capture; ``compile s`` is its
time beyond a timed step's), then the median of ``--steps`` more. The anchor, Transformer++ with the spec's ``d_model`` / layers / heads, runs in
the same process at the same shapes (its fastest mode measured: ``compile`` on CUDA, and
``compile-graph`` when the spec runs it), and each row
gives its tokens/s as a ratio to the anchor's. Peak memory on CUDA.

``--level KEY`` times one level of the spec instead (:func:`bench_level`): forward and
forward+backward of ``run_level`` at ``[B, T, H, D]`` (default the anchors' shape B=4, T=4096, H=16,
D=128, bf16), in the form the registry chooses for the device (``triton`` for the delta rules on
CUDA) eagerly and compiled, next to the anchors in the same process: SDPA (FlashAttention) always,
and, when fla is installed, the fla kernel computing the same function (``chunk_delta_rule``,
``chunk_gated_delta_rule``, ``chunk_simple_gla``) with the relative error of the outputs against it,
else fla's ``chunk_delta_rule`` as the yardstick. Each row gives ms, tokens/s, the ratio to that
anchor, peak memory and the first call's seconds (compile, autotuning). ``--layer KEY`` times the
entry's whole layer (:func:`bench_layer`). Both take every ``--lengths`` in turn (with ``--tokens``
at a fixed B·T), a table each; the JSON then holds every run (``runs``) and their rows with ``T``
and ``B``.

A GPU tool: without CUDA it says so and exits 0, unless ``--device cpu`` asks for a CPU run (a
smoke test of the command, not a speed claim).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .errors import NLGraphError
from .model import compile_options

__all__ = ["bench", "bench_layer", "bench_level", "MODES"]


def _report(what: str) -> None:
    """The whole traceback of a failed row on stderr: the table keeps its first line, a bug report
    needs the rest (a compile error's reason comes after it)."""
    print(f"nlgraph bench: {what} failed:", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)


MODES = ("eager", "graph", "compile", "compile-graph")


def _time_step(spec: Any, overrides: list[str], batch: int, length: int, mode: str, steps: int,
               device: torch.device, precision: str, recompute_blocks: bool = False) -> dict[str, Any]:
    from .lower import build
    from .spec.loader import load_spec
    from .train.loop import graph_step, lm_loss, param_groups

    torch.manual_seed(0)
    model = build(load_spec(spec, overrides), device=device)
    vocab = model.spec.model.vocab
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    y = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    cuda = device.type == "cuda"
    bf16 = precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    if mode in ("compile", "compile-graph"):
        model.compile_blocks()
    model.recompute(recompute_blocks)
    step_fn = None

    def one() -> float:
        nonlocal step_fn
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if mode in ("graph", "compile-graph"):
            if step_fn is None:
                step_fn = graph_step(model, x, y, precision)
            loss = step_fn(x, y)
        else:
            with autocast():
                loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    first = one()
    times = [one() for _ in range(steps)]
    med = statistics.median(times)
    # the first step's time beyond a timed step's: compilation, autotuning and graph capture
    row = {"params": sum(p.numel() for p in model.parameters()), "first_step_s": round(first, 3),
           "compile_s": round(max(first - med, 0.0), 3), "ms": round(med * 1e3, 3),
           "tok_s": round(batch * length / med, 1)}
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return row


def bench(spec: Any, overrides: list[str], *, lengths: list[int], batch: int, tokens: int | None,
          modes: list[str], steps: int, device: str | None, precision: str, anchor: str | None,
          recompute_blocks: bool = False, log=print) -> dict[str, Any] | None:
    """Time ``spec`` (see the module doc); returns JSON-able results, or ``None`` without CUDA when
    no ``device`` was asked for. ``recompute_blocks``: the spec's blocks recompute their activations in the
    backward (``nlgraph train --recompute-blocks``); the anchor keeps its own."""
    if device is None and not torch.cuda.is_available():
        return None
    dev = torch.device(device or "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NLGraphError(f"--device {device}: CUDA is not available on this machine; use --device cpu "
                           f"for a smoke run", path="--device")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise NLGraphError(f"--modes {bad[0]}: choose from {', '.join(MODES)}", path="--modes")
    if recompute_blocks and any(m.endswith("graph") for m in modes):
        raise NLGraphError("--recompute-blocks reads and restores the RNG state in the backward, which a CUDA "
                           "graph capture forbids; time it with --modes eager or compile", path="--modes")
    if any(m.endswith("graph") for m in modes) and dev.type != "cuda":
        raise NLGraphError("--modes graph needs a CUDA device (CUDA graphs)", path="--modes")
    from .spec.loader import load_spec
    from .train.loop import resolve_precision

    precision = resolve_precision(precision, dev)

    spec_obj = load_spec(spec, overrides)
    width = ["vars.d_model", "vars.layers", "vars.heads"]
    vars_ = spec_obj.vars or {}
    anchor_ov = [f"{k}={vars_[k.split('.', 1)[1]]}" for k in width if k.split(".", 1)[1] in vars_]
    rows = []
    for length in lengths:
        b = max(1, tokens // length) if tokens else batch
        # the anchor first, so every row of the spec has its ratio: against its fastest mode measured
        # (compile on CUDA; also compile-graph when the spec is timed that way)
        a_modes = ["compile"] + (["compile-graph"] if "compile-graph" in modes else []) if dev.type == "cuda" else ["eager"]
        runs = [(anchor, anchor_ov, m) for m in a_modes] if anchor else []
        runs += [(spec, overrides, m) for m in modes]
        anchor_tok = None
        for name, ov, mode in runs:
            row = {"spec": name if isinstance(name, str) else (spec_obj.name or "spec"), "T": length,
                   "B": b, "mode": mode, "anchor": name is anchor}
            try:
                mine = recompute_blocks and not row["anchor"]
                if mine:
                    row["recompute"] = True
                row.update(_time_step(name, list(ov), b, length, mode, steps, dev, precision, recompute_blocks=mine))
            except NLGraphError:
                raise
            except Exception as e:  # noqa: BLE001 - one failing mode is a row that says so
                _report(f"{row['spec']} T={length} {mode}")
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if row["anchor"] and "tok_s" in row:
                anchor_tok = max(anchor_tok or 0.0, row["tok_s"])
            if anchor_tok and "tok_s" in row:
                row["vs_anchor"] = round(row["tok_s"] / anchor_tok, 4)
            rows.append(row)
            log(json.dumps(row))
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "precision": precision, "steps": steps,
            "spec": spec_obj.name, "overrides": list(overrides), "anchor": anchor}
    return {"meta": meta, "rows": rows}


def median_ms(fn, device: torch.device, reps: int = 20, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls: between two CUDA events on the GPU,
    by the wall clock (3 calls) elsewhere."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps if device.type == "cuda" else 3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b`` (float64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _with_heads(level: Any, heads: int) -> Any:
    from .spec.schema import LevelSpec

    if isinstance(level, LevelSpec):
        return level.model_copy(update={"memory": level.memory.model_copy(update={"heads": heads})})
    return level.model_copy(update={"heads": heads})


def _same_function(level: Any) -> str | None:
    """The fla kernel that computes ``level``'s outputs exactly (its name), or ``None``."""
    from .compilers.kernels.dispatch import why_no_online_kernel, why_no_online_linear_attention
    from .spec.schema import DeltaRuleSpec, GateSpec, LevelSpec, LinearAttentionSpec

    if isinstance(level, DeltaRuleSpec):
        return "chunk_gated_delta_rule" if level.decay is not None else "chunk_delta_rule"
    if isinstance(level, LinearAttentionSpec):
        return None if level.normalize else "chunk_simple_gla"
    if not isinstance(level, LevelSpec) or level.read != "after_write" or (
            level.retention is not None and level.retention.toward == "initial"):
        return None
    if why_no_online_kernel(level) is None and level.optimizer.kind == "gd":
        if level.retention is None:
            return "chunk_delta_rule"
        # the Titans order W(αI − βkkᵀ) is not fla's gated rule αW(I − βkkᵀ) unless α = 1
        if level.retention.kind != "decay":
            return None
        gate = level.retention.gate
        return "chunk_kda" if isinstance(gate, GateSpec) and gate.per == "channel" else "chunk_gated_delta_rule"
    if why_no_online_linear_attention(level) is None:  # gd on dot: W_t = α_t W_{t−1} + η_t v_t k_tᵀ
        gate = level.retention.gate if level.retention is not None else None
        return "chunk_gla" if isinstance(gate, GateSpec) and gate.per == "channel" else "chunk_simple_gla"
    return None


def _linear_attention_rates(level: Any, rates: dict[str, torch.Tensor], shape: tuple[int, int, int],
                            dev: torch.device) -> tuple[Any, torch.Tensor | None]:
    """``(η [B, T, H, 1] or a float, log α or None)`` of a linear-attention level for fla's
    ``chunk_simple_gla`` / ``chunk_gla`` (values ``η v``, ``g = log α``): the gates given in ``rates``,
    or the spec's constants."""
    from .spec.schema import LevelSpec

    if not isinstance(level, LevelSpec):
        return 1.0, None
    lr = rates["lr"].float().unsqueeze(-1) if "lr" in rates else float(level.optimizer.lr)
    if "retention" in rates:
        return lr, rates["retention"].float().log()
    if level.retention is not None:
        return lr, torch.full(shape, math.log(float(level.retention.gate)), device=dev)
    return lr, None


def bench_level(spec: Any, overrides: list[str], key: str, *, batch: int = 4, length: int = 4096,
                heads: int = 16, dim: int = 128, dtype: str = "bfloat16", modes: tuple[str, ...] = ("eager", "compile"),
                device: str | None = None, fla: bool = True, log=print) -> dict[str, Any] | None:
    """Time level ``key`` of ``spec`` (see the module doc); ``None`` without CUDA when no ``device``
    was asked for. ``fla=False`` leaves fla's rows out (its first call autotunes for minutes). Inputs: q and k L2-normalised, v standard normal, learning rates / β ~ U(0, 1),
    retention / decay α ~ U(0.9, 1), momentum ~ U(0, 1), each as a data-dependent gate needs it."""
    if device is None and not torch.cuda.is_available():
        return None
    dev = torch.device(device or "cuda")
    from .runtime import level_form, run_level
    from .spec.loader import load_spec
    from .spec.schema import ChainSpec, DeltaRuleSpec, GateSpec, LevelSpec, LinearAttentionSpec

    spec_obj = load_spec(spec, overrides)
    if key not in spec_obj.levels:
        from .errors import did_you_mean

        raise NLGraphError(f"the spec has no level '{key}' (levels: {', '.join(spec_obj.levels)})"
                           f"{did_you_mean(key, spec_obj.levels)}", path="--level")
    level = spec_obj.levels[key]
    if not isinstance(level, (LevelSpec, DeltaRuleSpec, LinearAttentionSpec)) or isinstance(level, ChainSpec) or (
            isinstance(level, LevelSpec) and level.objective.kind == "outer"):
        what = "an outer-loop MLP (objective: outer)" if isinstance(level, LevelSpec) else f"a {level.kind}"
        raise NLGraphError(f"level '{key}' is {what}, which run_level does not run; bench a memory, delta_rule "
                           "or linear_attention level, or the whole spec (no --level)", path="--level")
    if isinstance(level, LevelSpec) and level.adaptive:
        raise NLGraphError(f"level '{key}' reads its keys, values or rates from its adaptive projections "
                           f"({', '.join(level.adaptive)}), which only the model feeds it; bench the whole spec "
                           "(no --level)", path="--level")
    level = _with_heads(level, heads)
    dt = getattr(torch, dtype)
    b, t, h, d = batch, length, heads, dim
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, generator=gen)

    def uni(lo, shape):
        return lo + (1 - lo) * torch.rand(*shape, device=dev, generator=gen)

    q = torch.nn.functional.normalize(rnd(b, t, h, d), dim=-1).to(dt)
    k = torch.nn.functional.normalize(rnd(b, t, h, d), dim=-1).to(dt)
    v = rnd(b, t, h, d).to(dt)
    beta, alpha = uni(0.0, (b, t, h)).to(dt), uni(0.9, (b, t, h)).to(dt)

    def gate_shape(rate):
        return (b, t, h, d) if isinstance(rate, GateSpec) and rate.per == "channel" else (b, t, h)

    rates: dict[str, torch.Tensor] = {}
    if isinstance(level, DeltaRuleSpec):
        if isinstance(level.beta, GateSpec):
            rates["lr"] = beta
        if isinstance(level.decay, GateSpec):
            rates["retention"] = alpha
    elif isinstance(level, LevelSpec):
        opt = level.optimizer
        if isinstance(getattr(opt, "lr", None), GateSpec):
            rates["lr"] = uni(0.0, gate_shape(opt.lr)).to(dt) if gate_shape(opt.lr) != (b, t, h) else beta
        if isinstance(getattr(opt, "momentum", None), GateSpec):
            rates["momentum"] = uni(0.0, gate_shape(opt.momentum)).to(dt)
        if level.retention is not None and isinstance(level.retention.gate, GateSpec):
            shape = gate_shape(level.retention.gate)
            rates["retention"] = alpha if shape == (b, t, h) else uni(0.9, shape).to(dt)
    form = level_form(level, device=dev, dtype=dt, head_dim=d)
    state0 = None
    if isinstance(level, LevelSpec):
        from .levels.run import init_state

        # made outside the timed (and compiled) call: a fresh deep memory's initial weights are drawn
        # from a generator, which a compiled graph cannot create
        state0 = init_state(level, batch=b, d_key=d, d_value=d, dtype=torch.float32, device=dev)
        # without a position the call is a fresh sequence, whose chunk boundaries the graph knows
        state0.pop("position", None)

    # a model runs its levels under autocast (bf16 operands, float32 state and accumulation); a level
    # timed alone runs the same way, so the PyTorch forms' float32 state meets bf16 inputs as in training
    amp = dt in (torch.bfloat16, torch.float16)

    def ours(q_, k_, v_):
        state = dict(state0) if state0 is not None else None
        with torch.autocast(dev.type, dtype=dt, enabled=amp):
            return run_level(level, keys=k_, values=v_, queries=q_, form=form, state=state, **rates)[0]

    impls: list[tuple[str, Any, bool]] = []  # (name, fn(q, k, v), is an anchor)
    sdpa = "SDPA causal (FlashAttention)" if dev.type == "cuda" else "SDPA causal"
    impls.append((sdpa, lambda q_, k_, v_: torch.nn.functional.scaled_dot_product_attention(
        q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), is_causal=True).transpose(1, 2), True))
    same = _same_function(level)
    use_fla, fla = fla, None
    try:  # fla is an optional anchor, never a dependency
        if not use_fla:
            raise LookupError("--anchor none")
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla

        try:
            from fla.ops.kda import chunk_kda
        except ImportError:  # fla before 0.4 has no KDA: only that row is dropped
            chunk_kda = None

        eta, g_la = _linear_attention_rates(level, rates, (b, t, h), dev)
        fla = {"chunk_delta_rule": lambda q_, k_, v_: chunk_delta_rule(q_, k_, v_, rates.get("lr", beta), scale=1.0)[0],
               "chunk_gated_delta_rule": lambda q_, k_, v_: chunk_gated_delta_rule(
                   q_, k_, v_, rates.get("retention", alpha).float().log(), rates.get("lr", beta), scale=1.0)[0],
               "chunk_simple_gla": lambda q_, k_, v_: chunk_simple_gla(q_, k_, (v_ * eta).to(v_.dtype), g_la,
                                                                      scale=1.0)[0],
               "chunk_gla": lambda q_, k_, v_: chunk_gla(q_, k_, (v_ * eta).to(v_.dtype), g_la, scale=1.0)[0]}
        if chunk_kda is not None:
            fla["chunk_kda"] = lambda q_, k_, v_: chunk_kda(q_, k_, v_, rates["retention"].float().log(),
                                                            rates.get("lr", beta), scale=1.0)[0]
    except Exception as e:  # noqa: BLE001 - any import failure drops the fla rows
        why = str(e) if isinstance(e, LookupError) else f"not available ({type(e).__name__})"
        log(json.dumps({"note": f"fla {why}: its rows are left out"}))
    anchor = same if fla and same in fla else ("chunk_delta_rule" if fla else None)
    if fla and anchor:
        impls.append((f"fla {anchor}", fla[anchor], True))
    peer = _titans_pytorch(level, h, d, dev, dt, amp, log) if use_fla else None
    if peer is not None:
        impls.append(peer)
    from .compilers import find_form
    from .runtime import _family

    # a form registered not to compile (measured slower under inductor) runs eagerly inside the graph
    registered = find_form(_family(level), form)
    whole = registered is None or registered.compiles
    for mode in modes:
        fn = torch.compile(ours, **compile_options(dev, fullgraph=whole)) if mode == "compile" else ours
        impls.append((f"nlgraph {key} ({form}, {mode})", fn, False))

    ref_name = f"fla {anchor}" if anchor else None
    rows = time_rows(impls, [q, k, v], b * t, dev, log, ref_name, compare=bool(same and anchor == same),
                      peer=peer[0] if peer else None)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "level": key, "form": form, "shape": [b, t, h, d], "dtype": dtype, "anchor": f"fla {anchor}" if anchor else None,
            "same_function": bool(same and anchor == same)}
    return {"meta": meta, "rows": rows}


def _titans_pytorch(level: Any, h: int, d: int, dev: torch.device, dt: torch.dtype, amp: bool, log):
    """titans-pytorch's ``NeuralMemory`` as a row ``(name, fn(q, k, v), is an anchor)`` for a deep
    (MLP) memory level: ``H`` heads of width ``D``, the level's hidden width and gradient chunk,
    reading ``q`` flattened to ``[B, T, H·D]`` (its own projections make k, v and q). Not the same
    function (its memory adds a LayerNorm and a residual, its rates differ): the peer whose speed
    issue 11 measures against. ``None`` (with a note) for other levels or without the package."""
    from .spec.schema import LevelSpec

    if not isinstance(level, LevelSpec) or level.memory.kind not in ("mlp", "residual_mlp"):
        return None
    try:
        from titans_pytorch import NeuralMemory

        from .levels.run import periods
        from .spec.schema import resolve_width

        hidden = resolve_width(level.memory.hidden, d)
        mem = NeuralMemory(dim=h * d, chunk_size=max(1, periods(level)[1]), heads=h, dim_head=d,
                           default_model_kwargs=dict(depth=2, expansion_factor=hidden / d)).to(dev)
    except Exception as e:  # noqa: BLE001 - an optional peer, never a dependency
        log(json.dumps({"note": f"titans-pytorch not available ({type(e).__name__}): its row is left out"}))
        return None

    def run(q_, k_, v_):
        with torch.autocast(dev.type, dtype=dt, enabled=amp):
            return mem(q_.flatten(2))[0].unflatten(-1, (h, d))

    return ("titans-pytorch NeuralMemory", run, True)


def _one_line(e: Exception) -> str:
    """A failure as a table cell: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _time_backward(fn, inputs: list[torch.Tensor], y: torch.Tensor, tokens: int, dev: torch.device,
                   row: dict[str, Any]) -> None:
    """``row``'s forward + backward figures: median ms, tokens/s and, on CUDA, the peak memory."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    grad = torch.randn_like(y)

    def step():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(grad)

    row["fwd_bwd_ms"] = median_ms(step, dev)
    row["tok_s"] = round(tokens / (row["fwd_bwd_ms"] / 1e3), 1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        row["peak_mib"] = round((torch.cuda.max_memory_allocated(dev) - base) / 2**20, 1)


def time_rows(impls: list[tuple[str, Any, bool]], inputs: list[torch.Tensor], tokens: int, dev: torch.device, log,
               ref_name: str | None, compare: bool, peer: str | None = None) -> list[dict[str, Any]]:
    """Time each ``(name, fn(*inputs), is an anchor)``: first call, forward, forward + backward (a
    random output gradient), peak memory on CUDA; ratios to the row named ``ref_name`` and, with
    ``compare`` (the same function), the relative error of the outputs against it. Anchors come
    first, so each later row is compared and logged as soon as it is measured (a run cut by a time
    limit still leaves the rows it finished)."""
    rows, outputs = [], {}
    for name, fn, is_anchor in impls:
        row: dict[str, Any] = {"name": name, "anchor": is_anchor}
        try:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                y = fn(*inputs)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            row["first_call_s"] = round(time.perf_counter() - t0, 3)
            outputs[name] = y
            with torch.no_grad():
                row["fwd_ms"] = median_ms(lambda: fn(*inputs), dev)
        except Exception as e:  # noqa: BLE001 - one failing implementation is a row that says so
            _report(name)
            row["error"] = _one_line(e)
        if "error" not in row:
            try:
                _time_backward(fn, inputs, y, tokens, dev, row)
            except Exception as e:  # noqa: BLE001 - a backward that fails keeps the row's forward
                # (fla refuses its gated backward on triton < 3.7.1 on Hopper: its forward is still the anchor's)
                _report(f"{name} (forward + backward)")
                row["fwd_bwd_error"] = _one_line(e)
        ref = next((r for r in rows if r["name"] == ref_name), None)
        if not is_anchor and compare and ref and name in outputs and ref_name in outputs:
            row["rel_err"] = rel_err(outputs[name], outputs[ref_name])
        if not is_anchor and ref and "fwd_ms" in row and "fwd_ms" in ref:
            row["x_anchor_fwd"] = round(row["fwd_ms"] / ref["fwd_ms"], 3)
            if "fwd_bwd_ms" in row and "fwd_bwd_ms" in ref:
                row["x_anchor_fwd_bwd"] = round(row["fwd_bwd_ms"] / ref["fwd_bwd_ms"], 3)
        other = next((r for r in rows if r["name"] == peer), None) if peer else None
        if not is_anchor and other and "fwd_bwd_ms" in row and "fwd_bwd_ms" in other:
            # how many times faster than the peer (issue 11 asks for at least 30x titans-pytorch)
            row["speedup_vs_peer_fwd_bwd"] = round(other["fwd_bwd_ms"] / row["fwd_bwd_ms"], 2)
        rows.append(row)
        log(json.dumps(row))
    return rows


def bench_layer(spec: Any, overrides: list[str], key: str, *, batch: int = 8, length: int = 2048,
                modes: tuple[str, ...] = ("eager", "compile"), device: str | None = None, fla: bool = True,
                log=print) -> dict[str, Any] | None:
    """Time the whole layer of entry ``key`` (projections, short convolutions, norms, gates, the
    memory and its output norm and gate: what the block's residual wraps) of the spec's first block
    on ``[B, T, d_model]`` inputs under bf16 autocast, next to fla's layer of the same kind and width
    (``fla.layers.DeltaNet`` / ``GatedDeltaNet`` with the spec's heads and head width, short
    convolutions, an output gate where the spec has one). The two are not the same function (norms,
    gates and initialisations differ), so there is no error column; issue 10 asks for at most 0.8x
    fla's time. ``None`` without CUDA when no ``device`` was asked for."""
    if device is None and not torch.cuda.is_available():
        return None
    impls, x, meta = layer_impls(spec, overrides, key, batch=batch, length=length, modes=modes, device=device,
                                 fla=fla, log=log)
    rows = time_rows(impls, [x], x.shape[0] * x.shape[1], x.device, log, meta["anchor"], compare=False)
    return {"meta": meta, "rows": rows}


def layer_impls(spec: Any, overrides: list[str], key: str, *, batch: int = 8, length: int = 2048,
                modes: tuple[str, ...] = ("eager", "compile"), device: str | None = None, fla: bool = True,
                log=print) -> tuple[list[tuple[str, Any, bool]], torch.Tensor, dict[str, Any]]:
    """What :func:`bench_layer` times: ``(impls, x, meta)``, each impl a ``(name, fn, is the
    anchor)`` taking ``x`` (``[B, T, d_model]``, float32; the calls run under bf16 autocast on
    CUDA), fla's layer first where it has one, then nlgraph's layer in each of ``modes``. Kept apart
    so a profiler can run the same calls (``benchmarks/profile_layer.py``)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from .lower import build
    from .model import Residual, reads_levels
    from .spec.loader import load_spec

    spec_obj = load_spec(spec, overrides)
    model = build(spec_obj, device=dev)
    entries = model.blocks[0].entries
    if key not in entries:
        from .errors import did_you_mean

        raise NLGraphError(f"the spec's first block has no entry '{key}' (entries: {', '.join(entries)})"
                           f"{did_you_mean(key, list(entries))}", path="--layer")
    inner = entries[key].inner if isinstance(entries[key], Residual) else entries[key]
    if reads_levels(inner):
        raise NLGraphError(f"entry '{key}' reads other levels' outputs, which only its block feeds it; bench "
                           "the whole spec (no --layer)", path="--layer")
    width = spec_obj.model.d_model
    b, t = batch, length
    x = torch.randn(b, t, width, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    amp = dev.type == "cuda"

    def ours(x_):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            return inner(x_, None)[0]

    impls: list[tuple[str, Any, bool]] = []
    level = spec_obj.levels.get(key)
    same = _same_function(level) if level is not None else None
    anchor = None
    try:  # fla is an optional anchor, never a dependency
        if not fla:
            raise LookupError("--anchor none")
        if same not in ("chunk_delta_rule", "chunk_gated_delta_rule", "chunk_kda"):
            raise LookupError(f"has no layer of level '{key}''s kind")
        heads = level.memory.heads if hasattr(level, "memory") else level.heads
        gate = getattr(getattr(level, "output", None), "gate", None) is not None
        if same == "chunk_gated_delta_rule":
            from fla.layers import GatedDeltaNet

            theirs = GatedDeltaNet(hidden_size=width, expand_v=1, head_dim=width // heads, num_heads=heads,
                                   use_gate=gate, use_short_conv=True, conv_size=4)
        elif same == "chunk_kda":  # its output gate and norm are always on, its decay gate low rank
            from fla.layers import KimiDeltaAttention

            theirs = KimiDeltaAttention(hidden_size=width, expand_v=1, head_dim=width // heads, num_heads=heads,
                                        use_short_conv=True, conv_size=4)
        else:
            from fla.layers import DeltaNet

            theirs = DeltaNet(hidden_size=width, num_heads=heads, use_beta=True, use_gate=gate, use_short_conv=True,
                              conv_size=4)
        theirs = theirs.to(dev)
        anchor = f"fla {type(theirs).__name__}"

        def fla_layer(x_):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                return theirs(x_)[0]

        impls.append((anchor, fla_layer, True))
    except Exception as e:  # noqa: BLE001 - any import or construction failure drops the fla row
        why = str(e) if isinstance(e, LookupError) else f"not available ({type(e).__name__}: {e})"
        log(json.dumps({"note": f"fla {why}: its row is left out"}))
    whole = all(lv.compiles for lv in model.plan.levels)  # as NLModel.compile_blocks decides
    for mode in modes:
        fn = torch.compile(ours, **compile_options(dev, fullgraph=whole)) if mode == "compile" else ours
        impls.append((f"nlgraph {key} layer ({mode})", fn, False))
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "layer": key, "forms": model.plan.executions(), "shape": [b, t, width], "anchor": anchor,
            "params": sum(p.numel() for p in inner.parameters())}
    return impls, x, meta


def level_table(res: dict[str, Any]) -> str:
    peer = any("speedup_vs_peer_fwd_bwd" in r for r in res["rows"])
    head = ["implementation", "first call s", "fwd ms", "fwd+bwd ms", "tok/s (f+b)", "x anchor fwd",
            "x anchor f+b", "peak MiB", "rel err vs anchor"] + (["f+b speed-up vs titans-pytorch"] if peer else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(r, k, fmt):
        return format(r[k], fmt) if r.get(k) is not None else "-"

    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} |" + " |" * (len(head) - 2))
            continue
        fb = f"failed: {r['fwd_bwd_error']}" if "fwd_bwd_error" in r else f(r, 'fwd_bwd_ms', '.3f')
        lines.append(f"| {r['name']} | {f(r, 'first_call_s', '.2f')} | {f(r, 'fwd_ms', '.3f')} | "
                     f"{fb} | {f(r, 'tok_s', ',.0f')} | {f(r, 'x_anchor_fwd', '.2f')} | "
                     f"{f(r, 'x_anchor_fwd_bwd', '.2f')} | {f(r, 'peak_mib', ',.0f')} | {f(r, 'rel_err', '.1e')} |"
                     + (f" {f(r, 'speedup_vs_peer_fwd_bwd', '.1f')} |" if peer else ""))
    return "\n".join(lines)


def table(res: dict[str, Any]) -> str:
    head = ["spec", "T", "B", "mode", "params", "first step s", "compile s", "ms/step", "tok/s", "vs anchor",
            "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['spec']} | {r['T']} | {r['B']} | {r['mode']} | {r['error']} |" + " |" * 6)
            continue
        ratio = f"{r['vs_anchor']:.3f}x" if "vs_anchor" in r else "-"
        mode = r["mode"] + (" + recompute" if r.get("recompute") else "")
        compile_s = f"{r['compile_s']:.2f}" if "compile_s" in r else "-"
        lines.append(f"| {r['spec']}{' (anchor)' if r['anchor'] else ''} | {r['T']} | {r['B']} | {mode} | "
                     f"{r['params']:,} | {r['first_step_s']:.2f} | {compile_s} | {r['ms']:.1f} | {r['tok_s']:,.0f} | "
                     f"{ratio} | {r.get('peak_gib', '-')} |")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    if not args.tf32:
        return _cmd_bench(args)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # the whole run, anchors included; put back after
    try:
        return _cmd_bench(args)
    finally:
        torch.set_float32_matmul_precision(before)


def _sweep(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's or layer's results at several lengths as one result: the first run's ``meta``
    with every run's ``shapes``, every row with its ``T`` and ``B``, and the runs themselves; a
    single run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    meta = dict(runs[0]["meta"], shapes=[r["meta"]["shape"] for r in runs])
    rows = [dict(row, B=r["meta"]["shape"][0], T=r["meta"]["shape"][1]) for r in runs for row in r["rows"]]
    return {"meta": meta, "rows": rows, "runs": runs}


def _cmd_bench(args) -> int:
    from .io import atomic_write

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.level and args.layer:
        raise NLGraphError("--level times a level alone and --layer a whole layer; give one", path="--layer")
    if args.recompute_blocks and (args.level or args.layer):
        where = "--level" if args.level else "--layer"
        raise NLGraphError(f"--recompute-blocks recomputes a model's blocks; {where} times one part of one: "
                           "drop one of them", path=where)
    if args.layer or args.level:
        # one level or layer at each length: B = tokens // T with --tokens (B·T fixed), else --batch
        lengths = args.lengths or [2048 if args.layer else 4096]
        default_batch = 8 if args.layer else 4
        modes = tuple(m for m in args.modes if not m.endswith("graph")) or ("eager",)
        runs = []
        for length in lengths:
            b = max(1, args.tokens // length) if args.tokens else (args.batch or default_batch)
            if args.layer:
                one = bench_layer(args.spec, list(args.overrides), args.layer, batch=b, length=length, modes=modes,
                                  device=args.device, fla=args.anchor != "none", log=log)
            else:
                one = bench_level(args.spec, list(args.overrides), args.level, batch=b, length=length,
                                  heads=args.heads, dim=args.dim, dtype=args.dtype, modes=modes, device=args.device,
                                  fla=args.anchor != "none", log=log)
            if one is None:
                break
            runs.append(one)
        res = _sweep(runs) if runs else None
    else:
        res = bench(args.spec, list(args.overrides), lengths=args.lengths or [2048], batch=args.batch or 8,
                    tokens=args.tokens, modes=args.modes, steps=args.steps, device=args.device,
                    precision=args.precision, anchor=None if args.anchor == "none" else args.anchor,
                    recompute_blocks=args.recompute_blocks, log=log)
    if res is None:
        print("nlgraph bench measures GPU speed and this machine has no CUDA device; nothing was run "
              "(pass --device cpu for a smoke run of the command)")
        return 0
    m = res["meta"]
    m["fp32_matmul"] = "high" if args.tf32 else "as set"  # "high": TF32 allowed (--tf32)
    # the process's NLGRAPH_* switches (docs/cli.md): which solve, tile or backward a figure ran on
    m["settings"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("NLGRAPH_")}
    settings = "".join(f", {k}={v}" for k, v in m["settings"].items())
    if args.layer or args.level:
        for run in res.get("runs", [res]):
            r = run["meta"]
            if args.layer:
                print(f"{r['device']}, torch {r['torch']}, layer {r['layer']} ({r['params']:,} parameters, forms "
                      f"{r['forms']}), B={r['shape'][0]} T={r['shape'][1]} d_model={r['shape'][2]}, bf16 autocast "
                      f"on CUDA; anchor {r['anchor'] or 'none'} (not the same function){settings}")
            else:
                print(f"{r['device']}, torch {r['torch']}, level {r['level']} in form {r['form']}, "
                      f"B={r['shape'][0]} T={r['shape'][1]} H={r['shape'][2]} D={r['shape'][3]} {r['dtype']}; "
                      f"anchor {r['anchor'] or 'none'}{' (same function)' if r['same_function'] else ''}{settings}")
            print(level_table(run))
    else:
        print(f"{m['device']}, torch {m['torch']}, {m['precision']}, median of {m['steps']} steps after the first"
              f"{settings}")
        print(table(res))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (json.dumps(res, indent=1) + "\n").encode())
    # an anchor's refused backward (fla's gated one on triton < 3.7.1, Hopper) is the anchor's limit,
    # said in the table; any failure of nlgraph's own rows is the command's
    return 1 if any("error" in r or ("fwd_bwd_error" in r and not r.get("anchor")) for r in res["rows"]) else 0


def add_parser(sub) -> None:
    from .cli import _add_spec_args

    p = sub.add_parser("bench", help="time a spec's training step on the GPU next to Transformer++",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    _add_spec_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="sequence lengths, each timed in turn (default 2048; with --level 4096); with --tokens "
                        "the batch at each is tokens // T")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; with --level 4)")
    p.add_argument("--level", default=None, metavar="KEY",
                   help="time this level of the spec alone against fla and SDPA (the anchors' shape by default)")
    p.add_argument("--layer", default=None, metavar="KEY",
                   help="time this entry's whole layer (projections, convolutions, norms, gates, memory) of the "
                        "first block against fla's layer of the same kind and width (B=8, T=2048 by default)")
    p.add_argument("--heads", type=int, default=16, help="--level: heads H (default 16)")
    p.add_argument("--dim", type=int, default=128, help="--level: head dim D of q, k and v (default 128)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="--level: input dtype (default bfloat16)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per step instead of --batch: B = tokens // T at every length (a sweep at fixed B·T)")
    p.add_argument("--modes", nargs="+", default=["eager", "graph"], help="eager, graph, compile, compile-graph (the compiled blocks' step replayed as CUDA graphs) "
                   "(default eager graph)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first (default 5)")
    p.add_argument("--device", default=None, help="cuda (default when present), cuda:1, or cpu for a smoke run")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--anchor", default="transformer_pp", help="the spec timed alongside ('none': no anchor; "
                   "with --level, no fla rows)")
    p.add_argument("--tf32", action="store_true",
                   help="let float32 matmuls run as TF32 on the tensor cores for the whole run, anchors included "
                        "(torch.set_float32_matmul_precision('high')): under bf16 autocast, the float32 work a "
                        "level keeps out of autocast")
    p.add_argument("--recompute-blocks", action="store_true",
                   help="the spec's blocks recompute their activations in the backward, as `nlgraph train "
                        "--recompute-blocks` (not the anchor's; not with the graph modes)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON")
