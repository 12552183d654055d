"""The ``nlgraph`` command line.

Exit codes: 0 ok, 1 invalid spec (or other user error, reported in one line), 2 usage error.
User errors never print a traceback; set ``NLGRAPH_DEBUG=1`` to see one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import NLGraphError
from .graph import GROUP_KINDS
from .io import atomic_write

__all__ = ["COMMANDS", "main"]

COMMANDS = ("validate", "show", "compile", "equiv", "train", "eval", "sample", "demo", "data", "bench", "list",
            "schema")
"""The sub-commands, in help order (pinned by a test)."""


class _UsageError(Exception):
    pass


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="a spec file (.yaml) or a library name such as 'hope'")
    p.add_argument(
        "overrides",
        metavar="KEY=VALUE",
        nargs="*",
        help="overrides applied after includes, e.g. model.d_model=256 levels.mixer.frequency=16",
    )
    _add_trust_args(p)


def _size(text: str) -> int:
    from .limits import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_trust_args(p: argparse.ArgumentParser) -> None:
    """Options that let a trusted spec reach further than a shared one may (docs/security.md)."""
    g = p.add_argument_group("trust and resource bounds (docs/security.md)")
    g.add_argument("--allow-outside-includes", metavar="DIR", action="append", default=[],
                   help="let includes name files inside DIR (repeatable); by default an include "
                   "stays inside the spec's folder or names a library spec or fragment")
    g.add_argument("--max-spec-bytes", metavar="SIZE", type=_size, default=None,
                   help="largest spec file to read (default 1M)")
    g.add_argument("--max-params", metavar="N", type=_size, default=None,
                   help="most parameters a model may have (default 1e10)")
    g.add_argument("--max-memory", metavar="SIZE", type=_size, default=None,
                   help="most memory a model may need, e.g. 200G (default: the device's memory)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlgraph",
        description="Declarative Nested Learning: validate, inspect and build specs of nested "
        "optimization levels.",
        epilog="Run 'nlgraph COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"nlgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check a spec and its level graph",
                       description="Load, validate and build the level graph of a spec; print one "
                       "line with its name and hash, or the first problem (exit 1).")
    _add_spec_args(p)
    p.add_argument("--all", action="store_true", help="list every problem found, not just the first")

    p = sub.add_parser("show", help="print the resolved spec, a table of levels, and draw the graph",
                       description="Print the resolved YAML (includes, interpolations, overrides and "
                       "defaults applied) and a table of levels; optionally draw the level graph.")
    _add_spec_args(p)
    p.add_argument("--graph", metavar="FILE", help="draw the level graph to FILE (.png, .svg, .pdf or .dot)")
    p.add_argument("--minimal", action="store_true", help="print only non-default fields in the YAML")
    p.add_argument("--no-yaml", action="store_true", help="do not print the resolved YAML")

    p = sub.add_parser("compile", help="lower a spec to a model and print its execution plan",
                       description="Build the model of a spec and print the plan: each level, its "
                       "recognised family, its execution form, its shapes and parameter count, and "
                       "the whole model's parameters. With --check, run one forward and backward "
                       "pass on random tokens (eager, or compiled with --torch-compile).")
    _add_spec_args(p)
    p.add_argument("--check", action="store_true", help="run a forward and backward pass on random tokens")
    p.add_argument("--torch-compile", action="store_true",
                   help="compile every block with torch.compile(fullgraph=True) for --check")
    p.add_argument("--device", default=None, help="the device the plan chooses forms for, e.g. 'triton' "
                   "for the delta rules on cuda (default: cuda if present, else cpu); a device this machine "
                   "lacks is planned without allocating (no --check)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32", "float64"],
                   help="parameter dtype the plan chooses forms for (default float32; the kernels refuse float64)")
    p.add_argument("--length", type=int, default=64, help="sequence length for --check (default 64)")

    p = sub.add_parser("equiv", help="check whether two specs compute the same function",
                       description="Build both specs (float64), share parameters where they "
                       "correspond, run both on random tokens and compare logits and every level's "
                       "output. Exit 0 if equivalent, 3 if they differ, 1 if a spec is invalid.")
    p.add_argument("spec_a", metavar="A", help="first spec (file or library name)")
    p.add_argument("spec_b", metavar="B", help="second spec (file or library name)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="overrides applied to both specs")
    p.add_argument("--seeds", type=int, default=3, help="random draws of weights and tokens (default 3)")
    p.add_argument("--length", type=int, default=32, help="sequence length (default 32)")
    p.add_argument("--tol", type=float, default=1e-8, help="relative tolerance (default 1e-8)")
    _add_trust_args(p)

    from .train.cli import add_parsers

    add_parsers(sub)

    from .data.cli import add_data_parser

    add_data_parser(sub)

    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)

    sub.add_parser("list", help="list the specs shipped in the library",
                   description="List the library specs usable by short name, with their descriptions.")

    p = sub.add_parser("schema", help="print the JSON schema of a spec",
                       description="Print the JSON schema of the spec language (for editors).")
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")
    p.add_argument("--markdown", action="store_true",
                   help="render the human spec reference (docs/reference/spec.md) instead of JSON")
    return parser


# --------------------------------------------------------------------------- commands


def _load(args: argparse.Namespace):
    from .errors import GraphError
    from .graph import build_graph
    from .spec.loader import load_raw, validate_raw

    # read and validate once (a large spec costs its parse, not three), then locate graph errors
    # in the files as build_graph does when it reads them itself
    raw, source = load_raw(args.spec, args.overrides)
    spec = validate_raw(raw, source)
    try:
        graph = build_graph(spec)
    except GraphError as e:
        if not e.path or e.file is not None:
            raise
        file, line, override = source.locate_dotted(e.path)
        msg = e.message + (f" (set by override '{override}')" if override else "")
        raise GraphError(msg, nodes=e.nodes, path=e.path, file=file, line=line) from None
    return spec, graph, source


def _cmd_validate(args: argparse.Namespace) -> int:
    spec, graph, source = _load(args)
    n_levels = sum(1 for _, d in graph.nodes(data=True) if d["kind"] not in ("embed", "head", *GROUP_KINDS))
    where = source.file or args.spec
    unused = graph.graph["unused"]
    note = f"; unused levels: {', '.join(unused)}" if unused else ""
    print(f"ok: {where}: {spec.name or 'spec'} (hash {graph.graph['hash']}, {n_levels} levels, "
          f"{len(spec.model.blocks)} block type{'s' if len(spec.model.blocks) > 1 else ''} "
          f"x{spec.model.repeat}){note}")
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def level_rows(graph) -> list[list[str]]:
    """Rows of the ``show`` table: one per level node in data-flow order."""
    from .families import describe_level, recognise
    from .graph import format_period, level_order

    rows = []
    for nid in level_order(graph):
        d = graph.nodes[nid]
        if d["kind"] in ("embed", "head", *GROUP_KINDS):
            continue
        spec = d["spec"]
        if d["kind"] == "adaptive":
            rows.append([nid, "adaptive projection", spec.kind, "(level's)", "(level's)", "-",
                         format_period(d["frequency"])])
            continue
        if d["kind"] == "optimizer":
            rows.append([nid, "optimizer level", spec.memory.kind, spec.objective.kind,
                         spec.optimizer.kind, spec.retention.kind if spec.retention else "-",
                         format_period(spec.frequency)])
            continue
        desc = describe_level(spec)
        freq = "every token (in context)" if d["kind"] == "attention" else format_period(d["frequency"])
        if d["kind"] == "level" and spec.gradient_point != "token":
            freq += f", grad @ {spec.gradient_point.chunk}-chunk"
        rows.append([nid, recognise(spec), desc["memory"], desc["objective"], desc["optimizer"],
                     desc["retention"], freq])
    return rows


def _cmd_show(args: argparse.Namespace) -> int:
    from .spec.loader import dump_spec

    if args.graph and os.path.splitext(args.graph)[1].lower() not in (".png", ".svg", ".pdf", ".dot"):
        raise _UsageError(f"--graph {args.graph}: use a .png, .svg, .pdf or .dot file")
    spec, graph, source = _load(args)
    if not args.no_yaml:
        print(f"# resolved spec: {source.file or args.spec}"
              + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
        print(dump_spec(spec, exclude_defaults=args.minimal), end="")
        print()
    g = graph.graph
    print(f"{spec.name or 'spec'}: hash {g['hash']}, d_model {g['d_model']}, vocab {g['vocab']}, "
          f"blocks {spec.model.blocks} x{spec.model.repeat}")
    print(_table(level_rows(graph), ["node", "family", "memory", "objective", "optimizer",
                                     "retention", "frequency"]))
    if g["unused"]:
        print(f"unused levels (defined, in no block): {', '.join(g['unused'])}")
    if args.graph:
        from .viz import draw_graph

        try:
            out = draw_graph(graph, args.graph)
        except ImportError as e:
            raise NLGraphError(str(e)) from None
        except OSError as e:
            raise NLGraphError(f"cannot write {args.graph}: {e.strerror}") from None
        print(f"graph drawn to {out}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .spec.loader import library_specs

    rows = []
    for name, path in library_specs().items():
        desc = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("description:"):
                desc = line.split(":", 1)[1].strip()
                break
        rows.append([name, desc])
    print(_table(rows, ["spec", "description"]))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from .spec.reference import render_reference
    from .spec.schema import Spec

    if args.markdown:
        text = render_reference()
    else:
        text = json.dumps(Spec.model_json_schema(by_alias=True), indent=2) + "\n"
    if args.out:
        try:
            atomic_write(Path(args.out), text.encode())
        except OSError as e:
            raise NLGraphError(f"cannot write {args.out}: {e.strerror}") from None
    else:
        print(text, end="")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    import time

    import torch

    from .lower import build, plan

    if args.length < 1:
        raise _UsageError(f"--length must be at least 1, got {args.length}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    p = plan(args.spec, args.overrides, device=device, dtype=dtype)
    # planning needs no device: without it, the model is laid out on `meta` for the parameter counts
    absent = torch.device(device).type == "cuda" and not torch.cuda.is_available()
    if absent and args.check:
        raise NLGraphError(f"--check runs on device '{device}', which this machine does not have; drop "
                           f"--check to see the plan for it, or pass --device cpu", path="--device")
    if args.check:
        from .limits import check_model_size
        from .spec.loader import current_options

        # before anything is allocated: weights, gradients and activations of the check's batch
        check_model_size(p.spec, device=device, batch=2, length=args.length, training=True,
                         limits=current_options().limits)
    try:
        if absent:
            from .model import NLModel

            with torch.device("meta"):
                model = NLModel(p.spec, plan=p)
        else:
            model = build(p, device=device, dtype=dtype)  # exactly the plan printed below
    except (RuntimeError, AssertionError) as e:
        raise NLGraphError(f"cannot build on device '{device}': {str(e).splitlines()[0]}") from None
    print(f"{p.spec.name or 'spec'}: hash {p.hash}")
    print(p.render(model))
    if p.device == "cuda":  # on the GPU, say what would run faster and why it does not
        for key, form, why in p.declined():
            print(f"note: level '{key}' does not run in form '{form}': {why}")
    if args.check:
        if args.torch_compile:
            model.compile_blocks()
        tokens = torch.randint(0, p.spec.model.vocab, (2, args.length), device=device)
        t0 = time.perf_counter()
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        if not torch.isfinite(loss):
            raise NLGraphError(f"the forward pass gave a non-finite loss ({loss.item()}); check the "
                               f"spec's rates and initial states")
        dt = time.perf_counter() - t0
        print(f"check: forward+backward on {tuple(tokens.shape)} tokens ok, loss {loss.item():.4f} "
              f"(ln vocab = {torch.log(torch.tensor(float(p.spec.model.vocab))).item():.4f}), "
              f"{dt:.2f} s{' incl. compile' if args.torch_compile else ''} on {device}")
    return 0


def _cmd_equiv(args: argparse.Namespace) -> int:
    from .equiv import compare

    if args.seeds < 1 or args.length < 1:
        raise _UsageError("--seeds and --length must be at least 1")
    try:
        report = compare(args.spec_a, args.spec_b, overrides=args.overrides, seeds=args.seeds,
                         length=args.length, tol=args.tol)
    except ValueError as e:
        raise NLGraphError(str(e)) from None
    print(report.render(args.spec_a, args.spec_b))
    return 0 if report.equivalent else 3


def _cmd_data(args: argparse.Namespace) -> int:
    from .data.cli import cli_data

    return cli_data(args)


_HANDLERS = {"validate": _cmd_validate, "show": _cmd_show, "compile": _cmd_compile, "equiv": _cmd_equiv,
             "data": _cmd_data, "list": _cmd_list, "schema": _cmd_schema}


def _handler(command: str):
    if command in _HANDLERS:
        return _HANDLERS[command]
    if command == "bench":
        from .bench import cmd_bench

        return cmd_bench
    from .train.cli import HANDLERS

    return HANDLERS[command]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nlgraph`` command; returns the exit code."""
    parser = _parser()
    # overrides may follow options (`show hope --no-yaml a.b=1`): collect KEY=VALUE leftovers
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from .limits import Limits
    from .spec.loader import load_options

    limits = Limits().raised(max_spec_bytes=getattr(args, "max_spec_bytes", None),
                             max_params=getattr(args, "max_params", None),
                             max_memory=getattr(args, "max_memory", None))
    done = False
    try:
        with load_options(allow_includes_from=getattr(args, "allow_outside_includes", ()), limits=limits):
            code = _handler(args.command)(args)
            done = True
            return code
    except _UsageError as e:
        parser.exit(2, f"nlgraph {args.command}: error: {e}\n")
    except NLGraphError as e:
        if os.environ.get("NLGRAPH_DEBUG"):
            raise
        lines = e.all_lines() if getattr(args, "all", False) else [e.render()]
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except OSError as e:
        # a path the user gave cannot be written or read (a file where a folder should be, no
        # permission, a full disk): one line, as for any other user error
        if os.environ.get("NLGRAPH_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path, its permissions and free space",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group(done)


def _close_process_group(done: bool = False) -> None:
    """Under torchrun, leave the process group before the interpreter exits: gloo's threads torn
    down at exit can abort a rank ("terminate called without an active exception") after its work
    is done and saved. After a command that finished on every rank, the ranks first meet at a
    barrier, so none tears its connections down while another (rank 0, still writing its last
    checkpoint and plot) is using them: a CI run aborted rank 0 that way with the teardown alone.
    After an error no barrier is taken (another rank may never arrive); a barrier that fails or
    times out (gloo: 300 s) is skipped, and the group is destroyed either way."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if done and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                from datetime import timedelta

                dist.monitored_barrier(timeout=timedelta(seconds=300))
            else:
                dist.barrier()
        except Exception:  # noqa: BLE001 - a rank that cannot meet the others still leaves the group
            pass
    dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
