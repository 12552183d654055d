"""nlgraph's Triton kernels compiled for sm_90 (Hopper) on any machine, without a GPU: registers,
spills, shared memory against the H200's limit, wgmma use and compile seconds, at the shapes a level
launches them with.

A kernel that asks for more shared memory than the GPU has compiles and then fails at its first
launch there (``OutOfResources``): the per-channel delta rule's backward at Dk=128 and chunk 64 did,
on the H200, after its checks had passed through Triton's CPU interpreter, which has no such limit.
This finds that before a GPU session. It runs in two steps:

1. record: each case below (``--cases``) runs its op forward and backward on CPU through Triton's
   interpreter at the model's head dims and chunk (a short sequence), and every kernel launch is
   recorded: the kernel, the constexpr values, the argument types and the launch's warps and stages.
   The interpreter has no bfloat16, so a 16-bit ``--dtype`` is recorded in float16 (the same
   constexprs) and the compile step types the 16-bit pointers as asked.
2. compile: each distinct launch is compiled for sm_90 (triton ships ptxas and cuobjdump) with the
   configs the GPU would run: for the autotuned per-head delta-rule kernels, every config their
   autotuner may pick at that launch (warps, the V block of the chunk recurrences, and for
   bfloat16 the pipelining depth of the ``SM90_BF16`` entry for its widths); for Titans' MLP memory,
   the warps and stages its launch names; for the others, the warps and stages their launch names
   (the per-channel forms' backward kernels: 8 warps) or Triton's defaults (4 warps, 3 stages);
   ``--plain-warps`` compiles the plain kernels at other counts.

The cases: the delta rule plain and gated (per head), linear attention per head, GLA and KDA (per
key channel), Titans' MLP memory (hidden 4·D, at the largest chunk the plan runs at that head dim on
CUDA), the online recurrence kernel (momentum, updates that read the state; a ``[D, D]`` state),
the short convolution (4 taps, ``4·D`` channels, SiLU) and the chunk walk (HOPE's two layers of a
hidden-2x residual MLP, ``[2D, D]`` and ``[D, 2D]``, momentum, retention, one slot reading).

    python benchmarks/kernel_resources.py                      # every case, D=128, chunk 64
    python benchmarks/kernel_resources.py --cases kda gla --json out.json

Exit status 1 when a kernel does not compile or needs more shared memory than ``--smem-limit``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_launch.py
from _launch import PLAIN  # noqa: E402

# the H200's (and H100's) shared memory per block with the opt-in carve-out: 227 KiB
SMEM_LIMIT = 232448
MODULES = ("_delta_rule_triton", "_linear_attention_triton", "_delta_rule_channel_triton", "_mlp_memory_triton",
           "_recurrence_triton", "_short_conv_triton", "_chunk_walk_triton", "_solve_lower_triton")
CASES = ("delta_rule", "gated_delta_rule", "linear_attention", "gla", "kda", "mlp_memory", "recurrence",
         "short_conv", "chunk_walk", "solve_lower")
_TYPES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.int32": "i32",
          "torch.int64": "i64"}


# --------------------------------------------------------------------------- step 1: record

def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


class _Recorder:
    """Stands in for one interpreted kernel: ``kernel[grid](...)`` records the launch, then runs it."""

    def __init__(self, kernel, module: str, name: str, log: list):
        self.kernel, self.module, self.name, self.log = kernel, module, name, log
        self.params = list(inspect.signature(kernel.fn).parameters.values())

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            bound = dict(zip((p.name for p in self.params), args)) | kwargs  # launch options are not params
            consts, types = {}, {}
            for p in self.params:
                if p.name not in bound:
                    continue  # a constexpr with a default, left to it
                value = bound[p.name]
                if _is_constexpr(p):
                    consts[p.name] = value
                elif hasattr(value, "dtype") and hasattr(value, "data_ptr"):
                    types[p.name] = "*" + _TYPES[str(value.dtype)]
                elif isinstance(value, bool):
                    types[p.name] = "u1"
                elif isinstance(value, int):
                    types[p.name] = "i32"
                else:
                    types[p.name] = "fp32"
            opts = {o: kwargs[o] for o in ("num_warps", "num_stages") if o in kwargs}  # launch options
            self.log.append({"module": self.module, "kernel": self.name, "constexprs": consts, "types": types,
                             "options": opts})
            return launch(*args, **kwargs)

        return call


def _patch(log: list) -> None:
    import importlib

    for mod_name in MODULES:
        mod = importlib.import_module(f"nlgraph.compilers.kernels.{mod_name}")
        holder = mod.kernels()
        for name in [n for n in vars(holder) if not n.startswith("_")]:  # a namespace's or a class's
            kernel = getattr(holder, name)
            if hasattr(kernel, "fn"):
                setattr(holder, name, _Recorder(kernel, mod_name, name, log))


def _run_case(case: str, d: int, dv: int, chunk: int, t: int, dt) -> None:
    import torch

    from nlgraph.compilers.kernels import chunk_delta_rule
    from nlgraph.compilers.kernels.linear_attention import chunk_linear_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, t, 1, d, generator=gen).to(dt).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(1, t, 1, d, generator=gen), dim=-1).to(dt).requires_grad_()
    v = torch.randn(1, t, 1, dv, generator=gen).to(dt).requires_grad_()
    beta = torch.rand(1, t, 1, generator=gen).requires_grad_()
    head = torch.log(0.9 + 0.1 * torch.rand(1, t, 1, generator=gen)).requires_grad_()
    channel = torch.log(0.9 + 0.1 * torch.rand(1, t, 1, d, generator=gen)).requires_grad_()
    h0 = torch.zeros(1, 1, d, dv).requires_grad_()
    if case == "mlp_memory":
        _run_mlp_memory(d, chunk, t, dt)
        return
    if case == "recurrence":
        _run_recurrence(d, chunk, dt)
        return
    if case == "chunk_walk":
        _run_chunk_walk(d, chunk, dt)
        return
    if case == "solve_lower":  # a chunk solve of hope_large_chunk (256 rows), forward and transposed
        from nlgraph.compilers.kernels.solve_lower import solve_unit_lower

        a = (torch.eye(256) + 0.01 * torch.randn(256, 256, generator=gen).tril(-1)).requires_grad_()
        solve_unit_lower(a, torch.randn(2, 256, 64, generator=gen).requires_grad_()).sum().backward()
        return
    if case == "short_conv":
        from nlgraph.compilers.kernels.short_conv import short_conv

        x = torch.randn(2, t, 4 * d, generator=gen).to(dt).requires_grad_()  # channels: a model's q, k, v
        w = (0.3 * torch.randn(4 * d, 4, generator=gen)).requires_grad_()
        short_conv(x, w, act="silu").float().square().sum().backward()
        short_conv(x, w, act="silu", l2=d).float().square().sum().backward()  # a stream's L2 norm fused
        return
    if case in ("delta_rule", "gated_delta_rule", "kda"):
        g = {"delta_rule": None, "gated_delta_rule": head, "kda": channel}[case]
        o, ht = chunk_delta_rule(q, k, v, beta, g, h0, output_final_state=True, scale=1.0, chunk=chunk)
    else:
        g = head if case == "linear_attention" else channel
        o, ht = chunk_linear_attention(q, k, v, g, h0, output_final_state=True, scale=1.0, chunk=chunk)
    (o.float().square().sum() + ht.square().sum()).backward()


# Titans' MLP memory's warps and hidden block (``--mlp-warps``, ``--mlp-block``; None: the wrapper's
# defaults) and its layouts (``--mlp-splits``: 0 one program per head, n one launch per chunk with n
# hidden blocks a program)
MLP_LAUNCH: dict = {"warps": None, "block_f": None}
MLP_SPLITS: list = [0, 1]


def _run_mlp_memory(d: int, chunk: int, t: int, dt) -> None:
    """Titans' MLP memory (hidden 4·D) at the largest chunk ≤ ``chunk`` the plan runs on CUDA at this
    head dim, with the block of hidden units and warps a model launches, in both kernel layouts."""
    from nlgraph.compilers.kernels.mlp_memory import chunk_mlp_memory, random_inputs, why_not_on_cuda

    while chunk > 16 and why_not_on_cuda(chunk, d) is not None:
        chunk //= 2
    (q, k, v), gates, state = random_inputs(1, t, 1, d, 4 * d)
    q, k, v = (x.to(dt).requires_grad_() for x in (q, k, v))
    gates = [x.float().requires_grad_() for x in gates]
    state = [x.float().requires_grad_() for x in state]
    for split in MLP_SPLITS:
        y, new = chunk_mlp_memory(q, k, v, *gates, tuple(state), chunk=chunk, split=split, **MLP_LAUNCH)
        (y.float().square().sum() + sum(s.square().sum() for s in new)).backward()


def _run_recurrence(d: int, chunk: int, dt) -> None:
    """The online recurrence kernel with every input (momentum, updates that read the state), a
    state ``[D, D]``, ``chunk`` tokens a chunk; then the reads', the chunk systems' and the transfer
    products' kernels with momentum."""
    import torch

    from nlgraph.compilers.kernels.recurrence import online_gates, online_prepare, online_reads, online_recurrence

    gen = torch.Generator().manual_seed(0)

    def r(*s, dtype=torch.float32):
        return (0.3 * torch.randn(*s, generator=gen)).to(dtype).requires_grad_()

    c = 3  # chunks

    def rows():  # [B, H, C, n, D] in the operands' dtype
        return r(1, 1, c, chunk, d, dtype=dt)

    out = online_recurrence(w0=r(1, 1, d, d), s0=r(1, 1, d, d), u=rows(), xt=rows(), ge=r(1, 1, c), p1=rows(),
                            yt=rows(), ze=r(1, 1, c), ye=r(1, 1, c), p2=rows())
    sum(x.float().square().sum() for x in out if x is not None).backward()
    # the reads from the chunk starts (NLGRAPH_RECURRENCE_READS=kernel), with momentum
    reads = online_reads(q=rows(), k=rows(), a=r(1, 1, c, chunk), bz=r(1, 1, c, chunk), m=r(1, 1, c, chunk, chunk),
                         ws=r(1, 1, c, d, d), ss=r(1, 1, c, d, d), es=r(1, 1, c, chunk, d))
    reads.square().sum().backward()
    # the chunk systems (NLGRAPH_RECURRENCE_PREPARE=kernel), with momentum
    sys_out = online_prepare(rows(), rows(), r(1, 1, c, chunk), r(1, 1, c, chunk, chunk), r(1, 1, c, chunk),
                             r(1, 1, c, chunk), rows())
    sum(x.float().square().sum() for x in sys_out).backward()
    # the transfer products (NLGRAPH_RECURRENCE_GATES=kernel), a read after the write
    pieces = online_gates(r(1, 1, c, chunk), r(1, 1, c, chunk), True)
    sum(x.square().sum() for x in pieces.values() if x is not None).backward()


def _run_chunk_walk(d: int, chunk: int, dt) -> None:
    """The chunk walk at HOPE's two layer shapes (hidden 2·D), every input, one row of the stack
    reading before the write. The stack's depth and the chunk length are runtime arguments (the
    backward's checkpoint stride ``K`` is not: one stride of tokens sets it), so one row of the
    stack compiles the same kernels as HOPE's five (which the interpreter walks for minutes at D 128)."""
    import torch

    from nlgraph.compilers.kernels.chunk_walk import CHECKPOINT, chunk_walk

    gen = torch.Generator().manual_seed(0)
    nn, chunk = 1, min(chunk, CHECKPOINT)

    def r(*s, dtype=dt):
        return (0.3 * torch.randn(*s, generator=gen)).to(dtype).requires_grad_()

    for o, i in ((2 * d, d), (d, 2 * d)):
        x = r(nn, chunk, i)
        out = chunk_walk(r(nn, o, i, dtype=torch.float32), r(nn, o, i, dtype=torch.float32), x, x, r(nn, chunk),
                         r(nn, chunk, o), r(nn, chunk), r(nn, chunk), r(1, chunk, i), read="before", rows=(0, 1))
        sum(t.float().square().sum() for t in out).backward()


def record(cases: list[str], d: int, dv: int, chunk: int, dtype: str = "bfloat16") -> list[dict]:
    """The distinct kernel launches of ``cases`` in ``dtype`` (run in this process, which must have
    ``TRITON_INTERPRET=1`` set before triton was imported; float16 stands in for bfloat16, which the
    interpreter lacks: both take the same constexprs)."""
    import torch

    dt = torch.float32 if dtype == "float32" else torch.float16
    log: list[dict] = []
    _patch(log)
    for case in cases:
        start = len(log)
        _run_case(case, d, dv, chunk, 2 * chunk + 5, dt)  # two full chunks and a partial one
        for row in log[start:]:
            row["case"] = case
    seen, out = set(), []
    for row in log:
        key = json.dumps([row["module"], row["kernel"], row["constexprs"], row["types"], row["options"]],
                         sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


# --------------------------------------------------------------------------- step 2: compile

def _configs(module: str, name: str, plain_warps: tuple[int, ...] | None = None, all_warps: bool = False,
             options: dict | None = None, consts: dict | None = None,
             bf16: bool = True) -> list[tuple[dict, int, int]]:
    """(constexpr overrides, warps, stages) the GPU may run this kernel with; ``plain_warps``: warp
    counts for the kernels without an autotuner, to see what another count would do (``None``: as
    they launch; for linear attention's and the per-channel delta rule's kernels the counts replace
    even a count their launch names, as ``benchmarks/_launch.py`` does when timing); ``all_warps``:
    every count the autotuned kernels' environment allows (``NLGRAPH_TRITON_WARPS``), also those a
    kernel leaves out."""
    options = options or {}
    stages = options.get("num_stages", 3)
    if plain_warps is not None and module in PLAIN:
        return [({}, w, stages) for w in plain_warps]
    if "num_warps" in options:  # the launch names its warps (Titans' MLP memory by its tile, the backward
        return [({}, options["num_warps"], stages)]  # kernels of the per-channel forms, the chunk walk)
    if module != "_delta_rule_triton":  # stages as the launch names them (the LA backward: 1)
        # plain @triton.jit: Triton's defaults are 4 warps, 3 stages
        return [({}, w, stages) for w in (plain_warps or (4,))]
    from nlgraph.compilers.kernels import _delta_rule_triton as kmod

    # the configs the autotuner may choose at this launch: the kernel's own and, for bfloat16 inputs,
    # the one SM90_BF16 names for its widths (its configs for other widths are pruned there; the
    # combinations offered only under NLGRAPH_TRITON_AUTOTUNE=1 are not)
    consts = consts or {}
    own = {c for c in kmod.offered_configs(name) if kmod.own_config(name, *c)}
    if all_warps:  # the kernel's own value blocks at every count the environment allows
        own |= {(bv, w, 2) for bv, _, _ in own for w in kmod._WARPS}
    choice = kmod.bf16_choice(name, consts.get("K", 0), consts.get("V", -1), consts.get("GK", False)) if bf16 else None
    offered = own | ({choice} if choice is not None else set())
    return [({} if bv is None else {"BV": bv}, w, n) for bv, w, n in sorted(offered, key=lambda c: (c[0] or 0, *c[1:]))]


def _source(module: str, name: str):
    import importlib

    mod = importlib.import_module(f"nlgraph.compilers.kernels.{module}")
    fn = getattr(mod, "_SOURCES", {}).get(name) or getattr(mod.kernels(), name)
    while hasattr(fn, "fn"):  # an Autotuner wraps a JITFunction, which wraps the Python function
        fn = fn.fn
    return fn


def sm90(fn, types: dict, consts: dict, warps: int, stages: int) -> dict:
    """Compile the Python kernel ``fn`` for sm_90 and read its registers, stack (spill) bytes, shared
    memory, and the counts of tensor-core (wgmma: HGMMA; mma.sync: HMMA) and local-memory (LDL/STL)
    instructions in its SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn).parameters)
    cx = {p: consts[p] for p in params if p in consts}
    sig = {p: "constexpr" if p in cx else types[p] for p in params if p in cx or p in types}
    # specialised as a launch is whose pointers are 16-byte aligned (torch's allocations) and whose
    # integers (T, NT, B·H ...) are multiples of 16, as at T = 2048 or 4096 with B·H a multiple of 16:
    # the layouts, vector widths and so the shared memory depend on it (other lengths compile
    # another variant, not checked here)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if p in sig and (sig[p].startswith("*") or sig[p] == "i32")}
    t0 = time.perf_counter()
    cx_paths = {(params.index(p),): v for p, v in cx.items()}
    ck = triton.compile(ASTSource(triton.jit(fn), sig, constexprs=cx_paths, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    row = {"compile_s": round(time.perf_counter() - t0, 2), "smem": ck.metadata.shared}
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True).stdout
    for key in ("REG", "STACK"):
        m = re.search(key + r":(\d+)", res)
        row[key.lower()] = int(m.group(1)) if m else None
    # HGMMA: Hopper's wgmma; HMMA: the mma.sync of earlier GPUs (16-row tiles fall back to it)
    row.update({op: sass.count(op) for op in ("HGMMA", "HMMA", "LDL", "STL")})
    return row


def compile_rows(launches: list[dict], dtype: str, smem_limit: int, plain_warps: tuple[int, ...] | None = None,
                 all_warps: bool = False, heads: int = 16, emit=print) -> list[dict]:
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    rows = []
    for launch in launches:
        fn = _source(launch["module"], launch["kernel"])
        types = {p: ("*" + short if t == "*fp16" else t) for p, t in launch["types"].items()}
        for extra, warps, stages in _configs(launch["module"], launch["kernel"], plain_warps, all_warps,
                                             launch.get("options"), launch["constexprs"], dtype == "bfloat16"):
            consts = launch["constexprs"] | extra
            if "H" in consts:  # recorded at one head; a model's count (a constexpr in some kernels)
                consts["H"] = heads
            row = {"case": launch["case"], "module": launch["module"].strip("_"), "kernel": launch["kernel"],
                   "K": consts.get("K", consts.get("D")), "V": consts.get("V"), "C": consts.get("C"),
                   "BV": consts.get("BV", consts.get("BF")),
                   "warps": warps, "stages": stages}
            try:
                row.update(sm90(fn, types, consts, warps, stages))
                row["fits"] = row["smem"] <= smem_limit
            except Exception as e:  # noqa: BLE001  (a kernel that does not compile is the finding)
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}"
                row["fits"] = False
            rows.append(row)
            emit(json.dumps(row))
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'case':18} {'kernel':16} {'K':>4} {'C':>3} {'BV':>3} {'w':>2} {'st':>2} {'reg':>4} {'stack':>6} " \
           f"{'smem':>7} {'HGMMA':>5} {'HMMA':>5} {'LDL':>5} {'STL':>5} {'comp s':>6}  note"
    lines = [head]
    for r in rows:
        note = r.get("error", "") or ("" if r["fits"] else "over the shared-memory limit")
        lines.append(f"{r['case']:18} {r['kernel']:16} {r['K'] or '-':>4} {r['C'] or '-':>3} {r['BV'] or '-':>3} "
                     f"{r['warps']:>2} {r['stages']:>2} {r.get('reg', '-'):>4} {r.get('stack', '-'):>6} "
                     f"{r.get('smem', '-'):>7} {r.get('HGMMA', '-'):>5} {r.get('HMMA', '-'):>5} {r.get('LDL', '-'):>5} "
                     f"{r.get('STL', '-'):>5} "
                     f"{r.get('compile_s', '-'):>6}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", choices=CASES, default=list(CASES))
    ap.add_argument("--dim", type=int, default=128, help="head dim of the keys (Dk)")
    ap.add_argument("--value-dim", type=int, default=None, help="head dim of the values (default: --dim)")
    ap.add_argument("--chunk", type=int, default=64, help="the chunk asked for (the per-channel kernels run 32)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--heads", type=int, default=16, help="heads per layer, for the kernels that take H as a constexpr")
    ap.add_argument("--smem-limit", type=int, default=SMEM_LIMIT)
    ap.add_argument("--plain-warps", default=None,
                    help="warp counts for the kernels without an autotuner, e.g. 4,8 (default: as they launch: "
                         "4 unless the launch names its own)")
    ap.add_argument("--all-warps", action="store_true",
                    help="the autotuned kernels at every warp count NLGRAPH_TRITON_WARPS allows, also those left out")
    ap.add_argument("--json", default=None)
    ap.add_argument("--channel-chunk", type=int, default=None,
                    help="record the per-channel kernels at this chunk instead of _load.CHANNEL_CHUNK (32), to see "
                         "why that choice is there")
    ap.add_argument("--mlp-warps", type=int, default=None, help="Titans' MLP memory's warps (default: the wrapper's)")
    ap.add_argument("--mlp-block", type=int, default=None,
                    help="Titans' MLP memory's hidden block (default: the wrapper's)")
    ap.add_argument("--mlp-splits", default="0,1", help="Titans' MLP memory's layouts, e.g. 0,1,2 (default 0,1)")
    ap.add_argument("--record-only", action="store_true", help=argparse.SUPPRESS)  # the subprocess of step 1
    args = ap.parse_args(argv)
    if args.record_only:
        MLP_LAUNCH.update(warps=args.mlp_warps, block_f=args.mlp_block)
        MLP_SPLITS[:] = [int(x) for x in args.mlp_splits.split(",")]
        if args.channel_chunk:
            from nlgraph.compilers.kernels import _load

            _load.CHANNEL_CHUNK = args.channel_chunk
        print(json.dumps(record(args.cases, args.dim, args.value_dim or args.dim, args.chunk, args.dtype)))
        return 0
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, __file__, "--record-only", "--dim", str(args.dim), "--value-dim",
           str(args.value_dim or args.dim), "--chunk", str(args.chunk), "--dtype", args.dtype, "--cases", *args.cases]
    if args.channel_chunk:
        cmd += ["--channel-chunk", str(args.channel_chunk)]
    for flag, value in (("--mlp-warps", args.mlp_warps), ("--mlp-block", args.mlp_block),
                        ("--mlp-splits", args.mlp_splits)):
        if value is not None:
            cmd += [flag, str(value)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        print("kernel_resources: recording the launches through the interpreter failed", file=sys.stderr)
        return 1
    launches = json.loads(done.stdout.strip().splitlines()[-1])
    warps = tuple(int(w) for w in args.plain_warps.split(",")) if args.plain_warps else None
    rows = compile_rows(launches, args.dtype, args.smem_limit, warps, args.all_warps, args.heads,
                        emit=lambda line: None)
    print(table(rows))
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), (json.dumps({"dim": args.dim, "value_dim": args.value_dim or args.dim,
                                                   "chunk": args.chunk, "dtype": args.dtype,
                                                   "smem_limit": args.smem_limit, "rows": rows}, indent=1)
                                       + "\n").encode())
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
