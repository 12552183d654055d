"""Data: the default corpus, tokenizers, batching and synthetic tasks (MQAR, S-NIAH, formal languages).

Names load on first use, so ``import nlgraph.data`` (and the ``nlgraph`` command) does not import
torch or numpy until a batcher, task or tokenizer is asked for.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "corpus": ("CORPUS_SDIST", "DOMAINS", "Corpus", "cache_dir", "corpus_archive", "fetch_all",
               "fetch_corpus", "fetch_tokenizer", "load_corpus", "split_works", "tokenizer_dir"),
    "tokenizers": ("TOKENIZERS", "ByteTokenizer", "GPT2Tokenizer", "Tokenizer", "check_vocab",
                   "get_tokenizer"),
    "batching": ("TokenBatcher", "step_seed", "val_batches"),
    "tasks": ("FORMAL_LANGUAGES", "TASKS", "Task", "TaskBatcher", "formal", "get_task", "mqar", "niah",
              "sequence_accuracy", "token_accuracy"),
    "cli": ("add_data_parser", "cli_data", "cli_fetch"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'nlgraph.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
