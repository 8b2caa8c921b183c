"""Generate the example batch: N text files of pseudo-random English-like prose.

    python3 examples/make_inputs.py examples/inputs [--files 200] [--words 20000]
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

WORDS = ("the of and to in is was for on that with as by at from his her it an were are "
         "which this be or have had not but what all when there can more one their would so "
         "process worker queue batch result error signal memory thread pool crash timeout "
         "python parallel journal limit rate input output schedule supervisor").split()


def make(directory: Path, files: int, words: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        sentences = text.replace(" the ", ". The ").split(". ")
        (directory / f"doc{i:04d}.txt").write_text(".\n".join(sentences) + ".\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--words", type=int, default=20000)
    args = parser.parse_args()
    make(args.directory, args.files, args.words)
    print(f"wrote {args.files} files to {args.directory}")
