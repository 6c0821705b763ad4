"""Build the three bundled fine-tuning tasks (DESIGN.md section 11) from Debian-packaged data.

    apt-get install -y wordnet-base perl-doc
    python scripts/build_tasks.py     # assets/data/{domain,chat,classify}/ and assets/data/heldout_synsets.txt

  domain/    {"text"}: chunks of the Perl documentation (perl-doc), which the bundled model never saw in pretraining.
  chat/      {"messages"}: WordNet questions with one short exact answer (a synonym, an antonym, a noun's category).
  classify/  {"prompt","completion"}: the part of speech of a WordNet gloss; labels in classify/labels.json.

Every WordNet synset falls in one split for all tasks (wordnet.bucket), so no synset of a valid/test record is
trained on by another task. The synsets that valid/test records use are written to heldout_synsets.txt, and
build_corpus.py leaves them out of the pretraining corpus: the model has seen the train synsets' glosses but not
the held-out ones. Deterministic: the same packages give the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections import defaultdict
from pathlib import Path

from wordnet import Synset, bucket, read_synsets

ROOT = Path(__file__).resolve().parent.parent
PERL_POD = Path("/usr/share/perl/5.36/pod")
SPLITS = ("train", "valid", "test")
SIZES = {"train": 1600, "valid": 200, "test": 200}
POS_LABELS = ["noun", "verb", "adjective", "adverb"]
MAX_DEF = 90            # characters of a definition in a prompt, so prompts stay under ~60 tokens


# --- Perl POD to text -----------------------------------------------------------------------------------------

_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _format_code(code: str, body: str) -> str:
    if code in "XZ":
        return ""
    if code == "E":
        if body.isdigit():
            return chr(int(body))
        if body.startswith("0x"):
            return chr(int(body, 16))
        return _ENTITIES.get(body, "")
    if code == "L":
        text = body.split("|", 1)[0] if "|" in body else body
        # L<perlsyn/"For Loops"> -> For Loops in perlsyn (but a URL stays a URL)
        if "|" not in body and "/" in text and "://" not in text:
            page, section = text.split("/", 1)
            text = f"{section.strip(chr(34))} in {page}" if page else section.strip('"')
        return text
    return body                                       # B I C F S: keep the text


def strip_pod_codes(text: str) -> str:
    # C<< $a <=> $b >> first (multi-bracket, the body may hold single < >), then innermost-first single brackets.
    # The bodies' own < > are parked as \0 \1 so the single-bracket pass leaves them alone.
    text = re.sub(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}",
                  lambda m: _format_code(m[1], m[2]).replace("<", "\0").replace(">", "\1"), text, flags=re.S)
    pattern = re.compile(r"([A-Z])<([^<>]*)>")
    while True:
        new = pattern.sub(lambda m: _format_code(m[1], m[2]), text)
        if new == text:
            break
        text = new
    return text.replace("\0", "<").replace("\1", ">")


def pod_paragraphs(path: Path) -> list[str]:
    """Paragraphs of a .pod file as plain text: headings and items kept as lines, code blocks kept verbatim."""
    out, skipping = [], None
    for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
        if not para.strip():
            continue
        if para.startswith("="):
            command, _, rest = para[1:].partition(" ")
            command = command.strip()
            if command == "begin":
                skipping = rest.split()[0] if rest.split() else ""
            elif command == "end":
                skipping = None
            elif skipping is None and (command.startswith("head") or command == "item"):
                rest = strip_pod_codes(rest.strip())
                if rest and rest != "*" and not rest.isdigit() and rest != "NAME":
                    out.append(rest.rstrip(".") if command == "item" else rest)
            continue
        if skipping is not None:
            continue
        if para[0] in " \t":                               # verbatim: code, as it is
            out.append(para.rstrip())
        else:
            out.append(" ".join(strip_pod_codes(para).split()))
    return out


def domain_chunks(paras: list[str], lo: int = 250, hi: int = 600) -> list[str]:
    """Consecutive paragraphs joined into chunks of lo..hi characters; longer single paragraphs are cut at
    sentence ends."""
    pieces = []
    for p in paras:
        if len(p) <= hi:
            pieces.append(p)
            continue
        cur = ""
        for sent in re.split(r"(?<=[.!?])\s+", p):
            if cur and len(cur) + len(sent) + 1 > hi:
                pieces.append(cur)
                cur = ""
            cur = f"{cur} {sent}".strip()
        if cur:
            pieces.append(cur)
    chunks, cur = [], ""
    for p in pieces:
        if len(p) > hi:
            continue
        if cur and len(cur) + len(p) + 2 > hi:
            if len(cur) >= lo:
                chunks.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= lo:
            chunks.append(cur)
            cur = ""
    return chunks


def build_domain(rng: random.Random) -> dict[str, list[dict]]:
    # Left out: the perl5*delta release notes (many and alike), the Chinese/Japanese/Korean introductions and the
    # licence texts; the rest is the manual proper, in English.
    skip = {"perlcn", "perljp", "perlko", "perltw", "perlgpl", "perlartistic"}
    pods = sorted(p for p in PERL_POD.glob("*.pod")
                  if not re.fullmatch(r"perl\d+delta", p.stem) and p.stem not in skip)
    by_split: dict[str, list[str]] = defaultdict(list)
    for pod in pods:
        u = int.from_bytes(hashlib.sha1(f"perl:{pod.name}".encode()).digest()[:8], "big") / 2**64
        split = "valid" if u < 0.1 else "test" if u < 0.2 else "train"   # by file: no page in two splits
        chunks = domain_chunks(pod_paragraphs(pod))
        by_split[split].extend(c for c in chunks if sum(map(str.isascii, c)) > 0.97 * len(c))   # English only
    sizes = {"train": 1400, "valid": 150, "test": 150}
    return {s: [{"text": t} for t in rng.sample(by_split[s], min(sizes[s], len(by_split[s])))] for s in SPLITS}


# --- WordNet tasks --------------------------------------------------------------------------------------------

def _short(s: Synset) -> bool:
    return 8 <= len(s.definition) <= MAX_DEF and "(" not in s.definition


def _norm(word: str) -> str:
    return re.sub(r"[\s\-']", "", word.lower())


def chat_candidates(synsets: dict[str, Synset]) -> dict[str, list[tuple[str, str, str, frozenset[str]]]]:
    """(question, answer, synset asked about, all synsets used) per kind; each question has one exact answer."""
    kinds: dict[str, list] = {"synonym": [], "antonym": [], "category": []}
    for s in synsets.values():
        if not _short(s):
            continue
        # synonym: synsets of exactly two lemmas that differ in more than spelling, so the answer is unique
        if len(s.words) == 2 and _norm(s.words[0]) != _norm(s.words[1]):
            ask, ans = (s.words[0], s.words[1]) if int(s.key[1:]) % 2 == 0 else (s.words[1], s.words[0])
            kinds["synonym"].append(
                (f"Give a synonym of '{ask}' ({s.pos}: {s.definition}).", ans, s.key, frozenset({s.key})))
        # antonym: WordNet's lexical antonym of the first lemma (one per source word)
        for src, tkey, tidx in s.antonyms:
            t = synsets.get(tkey)
            if src == 0 and t is not None and 0 <= tidx < len(t.words):
                kinds["antonym"].append(
                    (f"Give the opposite of '{s.words[0]}' ({s.pos}: {s.definition}).", t.words[tidx], s.key,
                     frozenset({s.key, tkey})))
                break
        # category: a noun's lexicographer file (26 categories), e.g. animal, artifact, food
        if s.pos == "noun" and s.lexname != "noun.Tops":
            kinds["category"].append(
                (f"What kind of thing is '{s.words[0]}' ({s.definition})? Answer with one word.",
                 s.lexname.split(".")[1], s.key, frozenset({s.key})))
    return kinds


def _sample(pool: list, n: int, rng: random.Random) -> list:
    return rng.sample(pool, min(len(pool), n))


def build_wordnet_tasks(synsets, rng) -> tuple[dict[str, list[dict]], dict[str, list[dict]], set[str]]:
    """The chat and classify tasks. Held-out records first; then train records that share no synset with them."""
    # A record's split is the bucket of the synset it asks about. An antonym's answer synset may sit in another
    # bucket: it joins the held-out set, and train records that touch a held-out synset are dropped.
    chat_pool: dict[str, dict[str, list]] = {s: defaultdict(list) for s in SPLITS}
    for kind, items in chat_candidates(synsets).items():
        for q, a, asked, keys in items:
            chat_pool[bucket(asked)][kind].append((q, a, keys))
    cls_pool: dict[tuple[str, str], list[Synset]] = defaultdict(list)
    for s in synsets.values():
        if _short(s):
            cls_pool[bucket(s.key), s.pos].append(s)

    chat_mix = {"category": 0.5, "synonym": 0.3, "antonym": 0.2}
    chat: dict[str, list[dict]] = {}
    classify: dict[str, list[dict]] = {}
    heldout: set[str] = set()
    for split in ("valid", "test", "train"):
        records = []
        for kind, frac in chat_mix.items():
            pool = [x for x in sorted(chat_pool[split][kind], key=lambda x: x[:2]) if not (x[2] & heldout)]
            for q, a, keys in _sample(pool, round(SIZES[split] * frac), rng):
                records.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                if split != "train":
                    heldout |= keys
        rng.shuffle(records)
        chat[split] = records
        records = []
        for label in POS_LABELS:   # balanced: a quarter per label
            pool = [s for s in sorted(cls_pool[split, label], key=lambda s: s.key) if s.key not in heldout]
            for s in _sample(pool, SIZES[split] // len(POS_LABELS), rng):
                records.append({"prompt": f"Gloss: {s.definition}\nPart of speech:", "completion": label})
                if split != "train":
                    heldout.add(s.key)
        rng.shuffle(records)
        classify[split] = records
    return {s: chat[s] for s in SPLITS}, {s: classify[s] for s in SPLITS}, heldout


def write_task(folder: Path, splits: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    size = sum((folder / f"{s}.jsonl").stat().st_size for s in splits)
    print(f"{folder}: " + ", ".join(f"{s} {len(r)}" for s, r in splits.items())
          + f"  ({size / 1024:.0f} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    synsets = read_synsets()
    write_task(args.out / "domain", build_domain(random.Random(args.seed)))
    chat, classify, heldout = build_wordnet_tasks(synsets, random.Random(args.seed + 1))
    write_task(args.out / "chat", chat)
    write_task(args.out / "classify", classify)
    (args.out / "classify" / "labels.json").write_text(json.dumps(POS_LABELS) + "\n")
    heldout = sorted(heldout)
    (args.out / "heldout_synsets.txt").write_text("\n".join(heldout) + "\n")
    print(f"{len(heldout)} WordNet synsets held out of pretraining -> {args.out / 'heldout_synsets.txt'}")


if __name__ == "__main__":
    main()
