"""The package's code calls no torch function that the GPU machine's Dynamo (torch 2.11) refuses to
trace. CI runs torch 2.13, whose Dynamo traces more, so a compiled model can pass here and fail
there: ``torch.amp.is_autocast_available`` (a C function, "marked as skipped" in 2.11) in the
transfer products broke every compiled Titans on the GPU machine for a day. Direct ``torch._C``
calls are the same kind of risk. Comments and docstrings may name them."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what torch 2.11's Dynamo refuses (or may refuse) inside a compiled region
REFUSED = ("torch._C.", "torch.amp.is_autocast_available", "torch.is_autocast_available")


def _code(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of the code on each line: comments and string literals left out."""
    out: dict[int, list[str]] = {}
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    for tok in tokens:
        if tok.type in (tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE):
            continue
        out.setdefault(tok.start[0], []).append(tok.string)
    return [(n, "".join(parts)) for n, parts in sorted(out.items())]


def test_no_call_the_gpu_machines_dynamo_refuses():
    found = []
    files = sorted((ROOT / "nlgraph").rglob("*.py")) + sorted((ROOT / "compilers").rglob("*.py"))
    assert len(files) > 50
    for path in files:
        for line, code in _code(path):
            for name in REFUSED:
                if name in code:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not found, "calls torch 2.11's Dynamo refuses to trace:\n" + "\n".join(found)


def test_the_scan_sees_a_call_and_skips_comments(tmp_path):
    """The scan itself: a call is found, the same text in a comment or a docstring is not."""
    f = tmp_path / "m.py"
    f.write_text('"""torch.amp.is_autocast_available in a docstring"""\n'
                 "# torch._C._foo in a comment\n"
                 "ok = torch.amp.is_autocast_available(dev)\n")
    hits = [(n, c) for n, c in _code(f) if any(name in c for name in REFUSED)]
    assert [n for n, _ in hits] == [3]
