"""Build the pretraining corpus of the bundled model from freely licensed text in Debian packages.

    apt-get install -y python3.11-doc wordnet-base
    python scripts/build_tasks.py                  # first: it decides which WordNet synsets are held out
    python scripts/build_corpus.py --out /tmp/lcsb-corpus

Writes OUT/train.jsonl and OUT/valid.jsonl, one {"text": document} a line (not committed: ~20 MB):
  - the Python 3.11 documentation sources (python3.11-doc, .rst.txt), reST markup stripped roughly;
  - WordNet 3.0 synsets (wordnet-base) as lines `words (pos): definition; "examples". X is the opposite of Y.`,
    shuffled and grouped 40 to a document, without the synsets in assets/data/heldout_synsets.txt (those of the
    fine-tuning tasks' valid/test records);
  - for one in ten of those synsets, a ChatML turn pair asking what a word means, so the model has seen the
    chat template's special tokens before fine-tuning (the tasks ask other questions: synonyms, antonyms,
    categories, parts of speech).
About 2% of the documents of each source (chosen by a hash of their name) form the validation slice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

from wordnet import corpus_line, read_synsets

ROOT = Path(__file__).resolve().parent.parent
PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")

# Directives whose indented body is dropped with them; the rest keep their body (notes, code, descriptions).
_DROP_BODY = {"index", "toctree", "moduleauthor", "sectionauthor", "highlight", "include", "literalinclude",
              "currentmodule", "tabularcolumns", "only", "testsetup", "testcleanup", "productionlist", "raw",
              "image", "figure", "audit-event", "availability", "module", "list-table", "csv-table", "table"}
_SIGNATURE = {"function", "method", "class", "data", "attribute", "exception", "decorator", "classmethod",
              "staticmethod", "coroutinemethod", "coroutinefunction", "opcode", "cmdoption", "envvar",
              "pdbcommand", "describe", "object", "program", "option", "decoratormethod", "abstractmethod"}
_LABEL = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "versionadded": "New in version",
          "versionchanged": "Changed in version", "deprecated": "Deprecated since version",
          "deprecated-removed": "Deprecated since version", "impl-detail": "CPython implementation detail:"}


def _role(m: re.Match) -> str:
    text = m[1]
    if text.endswith(">") and " <" in text:      # :ref:`title <label>`
        return text[: text.rindex(" <")]
    text = text.lstrip("!")
    if text.startswith("~"):                       # :func:`~os.path.join` shows as join()
        text = text[1:].rsplit(".", 1)[-1]
    return text


def strip_inline(line: str) -> str:
    line = re.sub(r":[\w:.+-]+:`([^`]+)`", _role, line)
    line = re.sub(r"`([^`<]+?)\s*<[^>`]+>`__?", r"\1", line)          # `text <url>`_
    line = re.sub(r"``(.+?)``", r"\1", line)
    line = re.sub(r"`([^`]+)`_{0,2}", r"\1", line)
    line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
    line = re.sub(r"(?<![\w*])\*(\S.*?)\*(?!\w)", r"\1", line)
    line = re.sub(r"\s*\[#[\w-]*\]_", "", line)
    line = re.sub(r"\|(\w[\w -]*)\|", r"\1", line)
    return re.sub(r"(\S)::$", r"\1:", line)


def strip_rst(text: str) -> str:
    out: list[str] = []
    drop_indent: int | None = None          # inside a dropped directive body: lines indented deeper than this
    in_options = False
    for raw in text.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if drop_indent is not None:
            if not line or indent > drop_indent:
                continue
            drop_indent = None
        if in_options:                       # :synopsis: ... right under a directive
            if line.strip().startswith(":") and indent > 0:
                continue
            in_options = False
        stripped = line.strip()
        if re.fullmatch(r"([=\-~^\"'`#*+<>_.])\1{2,}", stripped):       # heading under/overline, transition
            continue
        m = re.match(r"\.\.\s+([\w:-]+)::\s*(.*)$", stripped)
        if m:
            name, arg = m[1].split(":")[-1], m[2]
            in_options = True
            if name in _DROP_BODY:
                drop_indent = indent
            elif name in _SIGNATURE and arg:
                out.append(" " * indent + arg)
            elif name in _LABEL:
                out.append(" " * indent + (f"{_LABEL[name]} {strip_inline(arg)}".strip()
                                           + (":" if name.startswith(("version", "deprec")) else "")))
            elif arg and name not in {"code-block", "doctest", "testcode", "testoutput", "sourcecode"}:
                out.append(" " * indent + strip_inline(arg))
            continue
        if stripped == ".." or stripped.startswith(".. "):   # comment, target (.. _label:), substitution
            drop_indent = indent
            continue
        if stripped == "::":
            continue
        out.append(strip_inline(line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def is_valid(name: str, fraction: float = 0.02) -> bool:
    return int.from_bytes(hashlib.sha1(f"corpus:{name}".encode()).digest()[:8], "big") / 2**64 < fraction


def chat_turn(question: str, answer: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/lcsb-corpus"))
    ap.add_argument("--heldout", type=Path, default=ROOT / "assets" / "data" / "heldout_synsets.txt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.heldout.is_file():
        raise SystemExit(f"{args.heldout} is missing: run scripts/build_tasks.py first")
    heldout = set(args.heldout.read_text().split())
    rng = random.Random(args.seed)
    docs: dict[str, list[str]] = {"train": [], "valid": []}
    counts = {}

    files = sorted(PY_DOCS.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no .rst.txt under {PY_DOCS}: apt-get install -y python3.11-doc")
    for f in files:
        name = str(f.relative_to(PY_DOCS))
        if name.startswith("whatsnew/changelog"):      # a list of issue titles, not prose
            continue
        text = strip_rst(f.read_text(encoding="utf-8", errors="replace"))
        if len(text) > 200:
            docs["valid" if is_valid(name) else "train"].append(text)
    counts["python-docs"] = sum(len(d) for d in docs["train"] + docs["valid"])

    synsets = read_synsets()
    kept = [s for key, s in sorted(synsets.items()) if key not in heldout]
    rng.shuffle(kept)
    lines = [corpus_line(s, synsets) for s in kept]
    for i in range(0, len(lines), 40):
        docs["valid" if is_valid(f"wordnet:{i}") else "train"].append("\n".join(lines[i:i + 40]))
    turns = [chat_turn(f"What does '{s.words[0]}' mean?", s.definition) for s in kept[::10]]
    for i in range(0, len(turns), 8):
        docs["valid" if is_valid(f"chat:{i}") else "train"].append("".join(turns[i:i + 8]))
    counts["wordnet"] = sum(map(len, lines)) + sum(map(len, turns))

    args.out.mkdir(parents=True, exist_ok=True)
    for split, items in docs.items():
        rng.shuffle(items)
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for d in items:
                fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        print(f"{args.out / (split + '.jsonl')}: {len(items)} documents, {sum(map(len, items)) / 1e6:.1f} M chars")
    print(f"sources: {', '.join(f'{k} {v / 1e6:.1f} M chars' for k, v in counts.items())}; "
          f"{len(heldout)} held-out synsets left out, {len(kept)} kept")


if __name__ == "__main__":
    main()
