"""Write worker/data/devils_dictionary.txt from Debian's dict-devil package.

    apt-get install dict-devil && python scripts/make_devils_dictionary.py

Ambrose Bierce, The Devil's Dictionary (1911): public domain, its copyright has expired (Debian's
/usr/share/doc/dict-devil/copyright; the text carries the notice "A Public Domain Text, Copyright Expired").
It is the real English the small pretrained GPT-2 reads beside the project's generated text
(worker/pretraining.py). The dictd file is reflowed: one paragraph per line, paragraphs separated by a blank
line, runs of spaces collapsed, so the model learns sentences rather than 70-column line breaks and
indentation. The dictd header before the Internet Wiretap notice and the index line at the end are dropped.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

SOURCE = Path("/usr/share/dictd/devil.dict.dz")  # dictzip is gzip-compatible
OUT = Path(__file__).resolve().parents[1] / "worker" / "data" / "devils_dictionary.txt"
START = "The Internet Wiretap 1st Online Edition of"
INDEX_LINE = "abcdefghijklmnopqrstuvwxyz"


def reflow(text: str) -> str:
    """One line per paragraph, single spaces, blank lines between paragraphs."""
    paragraphs = []
    for block in text.split("\n\n"):
        line = " ".join(block.split())
        if line and line != INDEX_LINE:
            paragraphs.append(line)
    return "\n\n".join(paragraphs) + "\n"


def main() -> int:
    if not SOURCE.is_file():
        print(f"{SOURCE} is missing: apt-get install dict-devil", file=sys.stderr)
        return 1
    raw = gzip.decompress(SOURCE.read_bytes()).decode("ascii")
    text = reflow(raw[raw.index(START) :])
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
