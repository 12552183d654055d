"""Compile check on the GPU: every named spec compiles block by block with fullgraph=True and trains
for N steps with no recompiles; eager and compiled logits agree. Prints a table.

    python benchmarks/compile_check.py hope titans gated_deltanet --steps 20 --length 512

``--cold`` measures compile time as a user meets it: each spec runs in a fresh process with an
empty inductor cache (the cold compile), then in a second fresh process on that cache (what a
later run pays), and the table gives where the cold compile went (Dynamo's tracing, inductor's
forward and backward graphs, the wait for the generated kernels to compile) and how many kernels
inductor generated, with how many of their launches sit inside the chunk loop's body (a
``while_loop`` runs its body once per chunk, so those launches repeat).

    python benchmarks/compile_check.py hope titans gated_deltanet --cold --steps 3 --length 64 \
        --d-model 64 --heads 2 --layers 1

``--profile-phases`` adds where the first compiled step's time went from a cProfile of it (Dynamo,
AOT autograd, inductor's graphs, the wait for their kernels, Triton's in-process compiles of
nlgraph's own kernels, autotuning), which works on torch versions whose compile counters are empty
(2.11 on the GPU machine).

Results and the command that made them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from nlgraph.lower import build
from nlgraph.model import HOST_OPS_AS_ATEN


def _precompiles() -> list[dict]:
    """nlgraph's precompiles (its Triton kernels compiled in parallel) in this process (key, launches,
    threads, seconds), if the kernels' package loaded."""
    mod = sys.modules.get("nlgraph.compilers.kernels._load")
    return list(getattr(mod, "PRECOMPILE_LOG", []))


def precision(args: argparse.Namespace) -> str:
    """``bf16`` or ``fp32``: ``--precision``, with ``auto`` as `nlgraph train` resolves it. In fp32 the
    kernels' products run in full precision (no tensor cores), which Triton compiles far more slowly:
    the Gated DeltaNet backward's ``_wy_bwd`` took 25.8 s in fp32 on an H100."""
    from nlgraph.train.loop import resolve_precision

    return resolve_precision(args.precision, args.device)


def check(name: str, args: argparse.Namespace) -> dict:
    torch._dynamo.reset()
    counters.clear()
    device = args.device
    torch.manual_seed(0)
    overrides = [f"vars.d_model={args.d_model}", f"vars.layers={args.layers}", f"vars.heads={args.heads}"]
    model = build(name, overrides=overrides, device=device)
    tokens = torch.randint(0, model.spec.model.vocab, (args.batch, args.length + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    # --host-cpp: inductor's C++ kernels for the graphs' CPU tensors, as before nlgraph asked for
    # ATen calls on accelerators (nlgraph.model.HOST_OPS_AS_ATEN): the comparison row
    model.compile_blocks(**({"options": {k: False for k in HOST_OPS_AS_ATEN}} if args.host_cpp else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bf16 = precision(args) == "bf16"

    def autocast():  # as `nlgraph train` runs the forward: bf16 autocast on CUDA by default
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> float:
        with autocast():
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # the training step first: its compile is what `nlgraph train` waits for; the no-grad forward
    # (a second graph, compiled after the timing) only checks the values against eager
    n_precompiles = len(_precompiles())
    t0 = time.perf_counter()
    _progress(f"{name}: compiling the training step")
    profiler = None
    trace = SubprocessTrace() if args.trace_subprocesses else contextlib.nullcontext()
    if args.profile_phases:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    with trace:  # restores what it patched if the step raises
        loss0 = loss = step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    phases = _phases()
    if args.trace_subprocesses:
        phases["subprocesses"] = trace.summary()
    precompiles = _precompiles()[n_precompiles:]  # this spec's, not an earlier spec's in this process
    if precompiles:
        phases["precompiles"] = precompiles
    if profiler is not None:
        profiler.disable()
        phases["profiled"] = profiled_phases(profiler, compile_s)
    _progress(f"{name}: training step compiled in {compile_s:.1f} s {json.dumps(phases)}")
    with torch.no_grad(), autocast():
        compiled = model(x).float()
        blocks, model._compiled = model._compiled, None  # the plain blocks, at the same weights
        try:
            eager = model(x).float()
        finally:
            model._compiled = blocks
    err = (compiled - eager).abs().max().item() / eager.abs().max().item()
    _progress(f"{name}: no-grad forward compiled at {time.perf_counter() - t0:.1f} s")
    graphs_after_first = counters["stats"]["unique_graphs"]
    times = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(args.steps - 1):
            t = time.perf_counter()
            loss = step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return {
        "spec": name,
        "precision": "bf16" if bf16 else "fp32",
        "params": sum(p.numel() for p in model.parameters()),
        "graphs": graphs_after_first,
        "recompiles": counters["stats"]["unique_graphs"] - graphs_after_first,
        "compile_s": compile_s,
        "step_ms": 1000 * sorted(times)[len(times) // 2] if times else float("nan"),
        "rel_err": err,
        "loss": f"{loss0:.3f} -> {loss:.3f}",
        **phases,
    }


class SubprocessTrace:
    """Every child process this process starts (its command, shortened, and seconds from start to
    exit), every kernel Triton's JIT compiles in this process, as for nlgraph's own ``@triton.jit``
    kernels (name, warps, seconds; its ``ptxas`` child is inside), and every one of torch's file locks waited for or held longer than 10 ms in all (the lock's
    file name, seconds waiting, seconds held; a lock's region may hold a child process): where a
    compile from the cache spends time that is neither tracing nor kernels. Only children started
    through ``subprocess.Popen`` and waited for are seen (not inductor's compile-worker pool, nor
    multiprocessing), and ``children_s`` sums their seconds, so children that overlap count twice."""

    def __init__(self) -> None:
        self.children: list[dict] = []
        self.locks: list[dict] = []
        self.triton: list[dict] = []
        self._jit = None

    def __enter__(self) -> SubprocessTrace:
        from torch.utils import _filelock

        trace = self
        self._popen_init, self._popen_wait = subprocess.Popen.__init__, subprocess.Popen.wait
        self._lock_enter, self._lock_cls = _filelock.FileLock.__enter__, _filelock.FileLock

        def init(popen, args, *a, **kw):
            popen._trace_t0 = time.perf_counter()
            words = [str(w) for w in (args if isinstance(args, (list, tuple)) else [args])]
            popen._trace_cmd = " ".join(w if len(w) < 80 else w[:37] + "..." + w[-37:] for w in words)[:400]
            return trace._popen_init(popen, args, *a, **kw)

        def wait(popen, *a, **kw):
            rc = trace._popen_wait(popen, *a, **kw)
            if not getattr(popen, "_trace_done", False) and hasattr(popen, "_trace_t0"):
                popen._trace_done = True
                trace.children.append({"cmd": popen._trace_cmd, "s": round(time.perf_counter() - popen._trace_t0, 3)})
            return rc

        def enter(lock, *a, **kw):
            t = time.perf_counter()
            out = trace._lock_enter(lock, *a, **kw)
            lock._trace_t = time.perf_counter()
            lock._trace_wait = lock._trace_t - t
            return out

        def exit_(lock, *a, **kw):
            out = trace._lock_exit(lock, *a, **kw)
            if hasattr(lock, "_trace_t"):
                held = time.perf_counter() - lock._trace_t
                if lock._trace_wait + held > 0.01:
                    trace.locks.append({"lock": Path(str(getattr(lock, "lock_file", "?"))).name,
                                        "wait_s": round(lock._trace_wait, 3), "held_s": round(held, 3)})
            return out

        subprocess.Popen.__init__, subprocess.Popen.wait = init, wait
        self._lock_exit = self._lock_cls.__exit__
        self._lock_cls.__enter__, self._lock_cls.__exit__ = enter, exit_
        try:  # Triton's compiles in this process (a kernel's ptxas runs are inside its compile)
            from triton.runtime.jit import JITFunction
        except ImportError:
            JITFunction = None
        if JITFunction is not None:
            self._jit, self._jit_compile = JITFunction, JITFunction._do_compile

            def do_compile(fn, key, signature, device, constexprs, options, *a, **kw):
                t = time.perf_counter()
                out = None
                try:
                    out = trace._jit_compile(fn, key, signature, device, constexprs, options, *a, **kw)
                    return out
                finally:
                    # a compile handed to precompile's thread pool returns a future at once: its
                    # seconds are in the run's "precompiles", not here
                    trace.triton.append({"kernel": getattr(getattr(fn, "fn", None), "__name__", repr(fn)),
                                         "warps": getattr(options, "num_warps", None),
                                         "s": round(time.perf_counter() - t, 3),
                                         **({"precompiled": True} if hasattr(out, "future") else {})})

            JITFunction._do_compile = do_compile
        return self

    def __exit__(self, *exc) -> None:
        subprocess.Popen.__init__, subprocess.Popen.wait = self._popen_init, self._popen_wait
        self._lock_cls.__enter__, self._lock_cls.__exit__ = self._lock_enter, self._lock_exit
        if self._jit is not None:
            self._jit._do_compile = self._jit_compile

    def summary(self) -> dict:
        return {"children": len(self.children), "children_s": round(sum(c["s"] for c in self.children), 2),
                "lock_waits_s": round(sum(w["wait_s"] for w in self.locks), 2),
                "lock_held_s": round(sum(w["held_s"] for w in self.locks), 2),
                "slowest_children": sorted(self.children, key=lambda c: -c["s"])[:12],
                "slowest_locks": sorted(self.locks, key=lambda w: -(w["wait_s"] + w["held_s"]))[:12],
                "triton_compiles": len(self.triton), "triton_precompiled": sum(1 for c in self.triton if c.get("precompiled")),
                "triton_compile_s": round(sum(c["s"] for c in self.triton), 2),
                "slowest_triton_compiles": sorted(self.triton, key=lambda c: -c["s"])[:20]}


def _progress(msg: str) -> None:
    """A timestamped line on stderr: a --cold child killed by its timeout still shows how far it got."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


#: Dynamo's compile-time counters reported, by the label of the column (they nest: inductor's
#: forward and backward include their wait for the kernels' compilation)
PHASES = {"trace_s": "bytecode_tracing", "inductor_fwd_s": "compile_fx.<locals>.fw_compiler_base",
          "inductor_bwd_s": "compile_fx.<locals>.bw_compiler", "kernel_wait_s": "async_compile.wait"}


def _phases() -> dict:
    """This process's compile phases from dynamo's compile-time metrics, in seconds (0 where a phase
    did not run, e.g. everything from a warm cache), and under ``compile_times`` every recorded
    phase by its name (the names differ between torch versions)."""
    from torch._dynamo import utils

    seen = {name: round(sum(values), 2) for name, values in
            getattr(utils, "compilation_time_metrics", {}).items() if values}
    if not seen:  # a torch without the dict: parse its text report
        for line in utils.compile_times(repr="str", aggregate=True).splitlines():
            name, _, value = line.rpartition(",")
            try:
                seen[name.strip()] = float(value)
            except ValueError:
                continue
    row = {label: round(seen.get(key, 0.0), 1) for label, key in PHASES.items()}
    row["compile_times"] = dict(sorted(seen.items(), key=lambda kv: -kv[1])[:25])
    return row


#: Functions whose cumulative time under cProfile is a phase of the first compiled step, on any torch
#: version that has them. They nest: Dynamo's compile holds AOT autograd, which holds inductor's
#: forward graphs; the backward graphs compile at the first backward, outside Dynamo's compile but
#: inside ``compile_fx_inner``, which holds the wait for their kernels. nlgraph's own Triton kernels
#: compile in-process at their first launch, and the delta-rule kernels autotune there.
PROFILED = {"dynamo_compile_s": ("torch/_dynamo/convert_frame.py", "_compile"),
            "aot_autograd_s": ("torch/_functorch/aot_autograd.py", "aot_module_simplified"),
            "inductor_graphs_s": ("torch/_inductor/compile_fx.py", "compile_fx_inner"),
            "inductor_kernel_wait_s": ("torch/_inductor/async_compile.py", "wait"),
            "triton_compile_in_process_s": ("triton/compiler/compiler.py", "compile"),
            "triton_autotune_s": ("triton/runtime/autotuner.py", "_bench")}


def profiled_phases(profiler, wall_s: float) -> dict:
    """Where the first compiled step's time went, from a cProfile of it (version-independent, unlike
    dynamo's counters, which torch 2.11 does not fill): seconds in each :data:`PROFILED` function
    (inclusive; 0 where absent), the step's wall time under the profiler (which inflates Python-heavy
    phases such as tracing), and the 25 torch / triton / nlgraph functions with the most inclusive
    time, for names this list misses."""
    import pstats

    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    row = {label: 0.0 for label in PROFILED}
    top = []
    for (file, line, func), (_, _, _, ct, _) in stats.items():
        path = file.replace("\\", "/")
        for label, (suffix, name) in PROFILED.items():
            if func == name and path.endswith(suffix):
                row[label] += ct
        if any(part in path for part in ("/torch/", "/triton/", "/nlgraph/", "/compilers/")):
            top.append((ct, f"{path.rsplit('/site-packages/', 1)[-1]}:{line}({func})"))
    row = {k: round(v, 2) for k, v in row.items()}
    row["profiled_wall_s"] = round(wall_s, 2)
    row["top"] = [[round(ct, 2), where] for ct, where in sorted(top, reverse=True)[:25]]
    return row


def kernel_counts(cache_dir: Path) -> dict:
    """Distinct kernels inductor generated under ``cache_dir`` (Triton or C++; one that two graphs
    share, identical but for its name, counts once, as it compiles once), and how many kernel
    launches the generated code makes inside loop bodies (``*_body_graph_*`` functions: once per
    chunk)."""
    made = re.compile(r"^(\w+) = async_compile\.(triton|cpp|cpp_pybinding)\(", re.M)
    sources: set[int] = set()
    cpp: set[int] = set()
    in_body = 0
    for f in cache_dir.rglob("*.py"):
        text = f.read_text(errors="replace")
        found = list(made.finditer(text))
        if not found:
            continue
        # a kernel's source runs to the next kernel's definition, the last one's to the wait for them
        last = text.find("async_compile.wait", found[-1].end())
        ends = [m.start() for m in found[1:]] + [last if last >= 0 else len(text)]
        for m, end in zip(found, ends):
            key = hash(text[m.start():end].replace(m.group(1), ""))
            sources.add(key)
            if m.group(2) != "triton":
                cpp.add(key)
        names = {m.group(1) for m in found}
        for body in re.finditer(r"^def \w*body_graph\w*\(args\):\n(.*?)(?=^\S)", text, re.M | re.S):
            in_body += sum(len(re.findall(rf"\b{re.escape(n)}\b[\.\[(]", body.group(1))) for n in names)
    # C++ kernels in a CUDA model's graphs are host-side work (a CPU tensor's arithmetic): each
    # makes a process build or load C++ and check the CPU's vector instructions, cached or not
    return {"kernels": len(sources), "cpp_kernels": len(cpp), "launches_in_loop_bodies": in_body}


def cold(name: str, args: argparse.Namespace) -> dict:
    """``name`` compiled in a fresh process on an empty inductor cache, then again in another fresh
    process on that cache: the cold row with ``cached_compile_s`` and the kernel counts."""
    with tempfile.TemporaryDirectory() as d:
        # nlgraph's own Triton kernels (and their autotuning choices) live in Triton's cache, not
        # inductor's: an empty Triton cache too, or a GPU's cold compile would not be cold
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(d) / "inductor"),
               "TRITON_CACHE_DIR": str(Path(d) / "triton")}
        rows = []
        for _ in range(2):
            out = Path(d) / "row.json"
            cmd = [sys.executable, __file__, name, "--child-json", str(out), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--length", str(args.length), "--d-model", str(args.d_model),
                   "--heads", str(args.heads), "--layers", str(args.layers), "--device", args.device,
                   "--precision", args.precision]
            if args.profile_phases:
                cmd.append("--profile-phases")
            if args.trace_subprocesses:
                cmd.append("--trace-subprocesses")
            if args.host_cpp:
                cmd.append("--host-cpp")
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
            except subprocess.TimeoutExpired as e:
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
                seen = [ln for ln in err.splitlines() if ln.startswith("[")][-3:]
                raise RuntimeError(f"the child process ran past --child-timeout {args.child_timeout} s; "
                                   f"its last progress: {' | '.join(seen) or 'none'}") from None
            if done.returncode != 0 or not out.exists():
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"the child process failed (rc {done.returncode}): {tail[0][:300]}")
            rows.append(json.loads(out.read_text()))
            out.unlink()
        row = rows[0]
        row["cached_compile_s"] = rows[1]["compile_s"]
        if "profiled" in rows[1]:
            row["cached_profiled"] = rows[1]["profiled"]
        if "subprocesses" in rows[1]:
            row["cached_subprocesses"] = rows[1]["subprocesses"]
        row.update(kernel_counts(Path(d) / "inductor"))
        return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--verbose", action="store_true", help="print the whole error of a failed spec")
    p.add_argument("--cold", action="store_true",
                   help="each spec in fresh processes: cold compile on an empty inductor cache, then from it")
    p.add_argument("--child-timeout", type=float, default=1800, help="--cold: seconds a child process may take")
    p.add_argument("--profile-phases", action="store_true",
                   help="profile the first compiled step (cProfile): seconds in Dynamo, AOT autograd, inductor, "
                        "the kernel wait, Triton's in-process compiles and autotuning, on any torch version")
    p.add_argument("--trace-subprocesses", action="store_true",
                   help="record the child processes, file locks and Triton JIT compiles of the first compiled step")
    p.add_argument("--host-cpp", action="store_true",
                   help="compile the graphs' CPU tensors to C++ kernels on a GPU too (inductor's default)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA (what `nlgraph train` runs there), fp32 on CPU")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.child_json:  # one spec for --cold's parent: its row as JSON, errors as the exit status
        # the phases are this process's, so they are the one spec's compile alone
        Path(args.child_json).write_text(json.dumps(check(args.specs[0], args)))
        return 0
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"B={args.batch} T={args.length} d_model={args.d_model} heads={args.heads} layers={args.layers} "
          f"steps={args.steps}, {precision(args)}, fullgraph=True, fail_on_recompile after step 1"
          + (", each spec cold (empty inductor cache) then cached, in fresh processes" if args.cold else ""))
    header = f"{'spec':<16} {'params':>10} {'graphs':>6} {'recompiles':>10} {'compile+step1 s':>15} {'step ms':>9} {'rel err':>9}  loss"
    if args.cold:
        header += ("  | cached s | trace s | inductor fwd s | inductor bwd s | kernel wait s | kernels "
                   "| C++ kernels | launches in loop bodies")
    print(header)
    ok = True
    rows = []
    for name in args.specs:
        try:
            r = cold(name, args) if args.cold else check(name, args)
            rows.append(r)
            line = (f"{r['spec']:<16} {r['params']:>10,} {r['graphs']:>6} {r['recompiles']:>10} "
                    f"{r['compile_s']:>15.1f} {r['step_ms']:>9.1f} {r['rel_err']:>9.1e}  {r['loss']}")
            if args.cold:
                line += (f"  | {r['cached_compile_s']:.1f} | {r['trace_s']} | {r['inductor_fwd_s']} | "
                         f"{r['inductor_bwd_s']} | {r['kernel_wait_s']} | {r['kernels']} | {r['cpp_kernels']} | "
                         f"{r['launches_in_loop_bodies']}")
            print(line)
            for key in ("subprocesses", "cached_subprocesses"):
                if key in r:
                    t = r[key]
                    print(f"  {key.replace('_', ' ')}: {t['children']} children, {t['children_s']} s; "
                          f"locks waited {t['lock_waits_s']} s, held {t['lock_held_s']} s; "
                          f"{t['triton_compiles']} Triton compiles here, {t['triton_compile_s']} s; slowest: {json.dumps(t['slowest_children'][:5])}")
            if r.get("precompiles"):
                pre = r["precompiles"]
                print(f"  precompiles (kernels compiled in parallel): {len(pre)}, {round(sum(e['s'] for e in pre), 2)} s in all "
                      f"({sum(len(e.get('launches', [])) for e in pre)} launches; "
                      f"{sum(1 for e in pre if 'error' in e)} failed)")
            for key in ("profiled", "cached_profiled"):
                if key in r:
                    shown = {k: v for k, v in r[key].items() if k != "top"}
                    print(f"  {key.replace('_', ' ')} (cProfile, seconds, nested): {json.dumps(shown)}")
            ok &= r["recompiles"] == 0
        except Exception as e:  # report and continue with the next spec
            ok = False
            rows.append({"spec": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            print(f"{name:<16} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            if args.verbose:
                print(str(e)[:4000])
        sys.stdout.flush()
    if args.json:
        from nlgraph.io import atomic_write

        meta = {"torch": torch.__version__, "device": args.device, "B": args.batch, "T": args.length,
                "d_model": args.d_model, "heads": args.heads, "layers": args.layers, "cold": args.cold,
                "host_cpp": args.host_cpp, "precision": precision(args),
                "autotune": os.environ.get("NLGRAPH_TRITON_AUTOTUNE", "0")}
        atomic_write(Path(args.json), json.dumps({**meta, "rows": rows}, indent=1).encode())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
