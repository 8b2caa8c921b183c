"""Example task: statistics of one text file (real CPU work: tokenising, counting, hashing,
and compressing to measure redundancy).  procqueue calls `process(path)` once per input:

    procqueue map examples/wordstats.py examples/inputs -j 2 --stats > results.jsonl
"""
from __future__ import annotations

import collections
import hashlib
import re
import zlib

WORD = re.compile(r"[a-z']+")


def process(path: str) -> dict[str, object]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    words = WORD.findall(text.lower())
    counts = collections.Counter(words)
    data = text.encode()
    return {
        "words": len(words),
        "distinct": len(counts),
        "top": counts.most_common(3),
        "sentences": text.count("."),
        "compression_ratio": round(len(zlib.compress(data, 9)) / max(len(data), 1), 4),
        "sha256": hashlib.sha256(data).hexdigest()[:16],
    }


if __name__ == "__main__":  # never runs under procqueue: the script is imported, not run
    import sys
    print(process(sys.argv[1]))
