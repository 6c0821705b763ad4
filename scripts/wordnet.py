"""Read WordNet 3.0 data files (Debian package wordnet-base) into plain synset records.

Shared by build_tasks.py and build_corpus.py so both see the same synsets and the same held-out split.
The format is wndb(5WN): one synset a line,
    offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt ptr_symbol offset pos source/target(hex) ... | gloss
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj", "adverb": "data.adv"}
POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
POS_LETTER = {"noun": "n", "verb": "v", "adjective": "a", "adverb": "r"}

# lexnames(5WN): lexicographer file number -> name.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")   # syntactic markers on adjectives: big(a), galore(ip)


@dataclass
class Synset:
    key: str                        # "n00001740": pos letter (a for satellites too) + offset, unique across files
    pos: str                        # noun / verb / adjective / adverb
    lexname: str                    # noun.animal, verb.motion, adj.all, ...
    words: list[str]                # lemmas with spaces for underscores
    definition: str                 # the gloss without its quoted examples
    examples: list[str]
    # (index of the word here, key of the target synset, index of the antonym there)
    antonyms: list[tuple[int, str, int]] = field(default_factory=list)


def _split_gloss(gloss: str) -> tuple[str, list[str]]:
    # "definition; more definition; "example one"; "example two"" (quotes may be unbalanced in a few entries).
    examples = re.findall(r'"([^"]+)"', gloss)
    head = gloss.split('"', 1)[0] if '"' in gloss else gloss
    definition = head.strip().rstrip(";").strip()
    return definition, [e.strip() for e in examples if e.strip()]


def read_synsets(directory: Path = WORDNET_DIR) -> dict[str, Synset]:
    """All synsets of the four data files, keyed by pos letter + offset."""
    out: dict[str, Synset] = {}
    for pos, name in FILES.items():
        letter = POS_LETTER[pos]
        with open(directory / name, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):         # licence header
                    continue
                data, _, gloss = line.partition(" | ")
                fields = data.split()
                offset, lexnum, w_cnt = fields[0], int(fields[1]), int(fields[3], 16)
                words = [_ADJ_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(w_cnt)]
                i = 4 + 2 * w_cnt
                p_cnt = int(fields[i])
                antonyms = []
                for j in range(p_cnt):
                    symbol, target, tpos, st = fields[i + 1 + 4 * j: i + 5 + 4 * j]
                    if symbol == "!":
                        tletter = "a" if tpos == "s" else tpos
                        antonyms.append((int(st[:2], 16) - 1, tletter + target, int(st[2:], 16) - 1))
                definition, examples = _split_gloss(gloss.strip())
                out[letter + offset] = Synset(letter + offset, pos, LEXNAMES[lexnum], words, definition, examples,
                                              antonyms)
    return out


def bucket(key: str, salt: str = "lcsb-wordnet-split") -> str:
    """The split a synset belongs to in every task: ~4% valid, ~4% test, the rest train. Stable across runs."""
    u = int.from_bytes(hashlib.sha1(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64
    return "valid" if u < 0.04 else "test" if u < 0.08 else "train"


def corpus_line(s: Synset, synsets: dict[str, Synset]) -> str:
    """How a synset appears in the pretraining corpus: `words (pos): definition; "examples". Opposite: ...`"""
    line = f"{', '.join(s.words)} ({s.pos}): {s.definition}"
    if s.examples:
        line += "; " + "; ".join(f'"{e}"' for e in s.examples)
    opposites = []
    for src, tkey, tidx in s.antonyms:
        target = synsets.get(tkey)
        if target is not None and 0 <= src < len(s.words) and 0 <= tidx < len(target.words):
            opposites.append(f"{s.words[src]} is the opposite of {target.words[tidx]}")
    if opposites:
        line += ". " + "; ".join(opposites)
    return line + "."
