"""Build the English→Spanish verse pairs, the English LM corpus and their tokenizers.

Sources are the Debian SWORD modules under ``/usr/share/sword``, read with ``pysword``:
the KJV (``engKJV2006eb``), the World English Bible (``engWEB2015eb``) and the Reina-Valera
1909 (``spaRV1909eb``). All three are public domain.

Alignment. The KJV and RV1909 modules share the KJV versification, so pairs are made by
reference. The RV1909 text nevertheless follows Spanish verse divisions in a few places
(Num 12–13, 1 Chr 21, 1 Kgs 22, Job 38–41, Jonah 1–2 …): it leaves a verse empty or moves
text across verse boundaries, shifting the rest of the chapter. So a chapter is dropped
whole when either side has an empty verse, when the previous chapter ends in an empty verse
(the text spilled over), or when several of its verses have an implausible Spanish/English
length ratio; surviving verses must still pass that ratio one by one. The last verse of the
epistles is dropped too: RV1909 appends the subscription ("Fué escrita de Corinto …") that
the KJV keeps apart as a title.

The WEB uses the NRSVA versification: 3 John 1 and Revelation 12 have a different number of
verses, and some text is placed elsewhere (Rom 16:25-27 sits at the end of Rom 14). A WEB
verse is paired with RV1909 only where the KJV verse of the same reference was kept, the
chapter has as many verses in both versifications, the WEB chapter passes the same chapter
test against the KJV, and the WEB verse is 0.6–1.6× as long as the KJV verse (two English
renderings of one verse are close in length; a shifted verse is not). These pairs go to
train only: dev and test keep one pair per reference, the KJV one, so scores are comparable.

Split. :func:`split_of` is a pure function of the reference string, so every English
version of a verse, its Spanish and its LM line land in the same split, and no dev or test
verse is ever trained on by either model or by the tokenizers. Formulaic verses that recur
under other references are removed from train when they are a dev or test text, string for
string: a copy that differs in case or punctuation ("Y HABLÓ Jehová" at a chapter start),
or by a word or two (parallel passages), stays: in the shipped data 65 of the 1,207 test pairs
and 61 of the 1,487 LM test verses have a near-duplicate in train. `transformer.evaluate`
scores the test verses without them apart.

LM corpus. The WEB alone: one modern register (the KJV is archaic and already the
translator's main source). Protocanonical verses must pass the same WEB-vs-KJV checks, so a
reference means the same verse as in the pair files; the deuterocanon is included (no
Spanish counterpart, so it cannot hold a test verse) except Greek Esther, which repeats
Esther's verses under the same references.

Usage: ``python -m transformer.data build --out data``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import re
import time
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import sentencepiece as spm
import typer
from tqdm import tqdm

SWORD_PATH = Path("/usr/share/sword")
KJV = "engKJV2006eb"
WEB = "engWEB2015eb"
RV1909 = "spaRV1909eb"

Split = Literal["train", "dev", "test"]
SPLITS: tuple[Split, ...] = ("train", "dev", "test")
# sha256(ref) → bucket in [0, 10000): [0, 400) test, [400, 560) dev, the rest train.
# 4 % of the 31,102 KJV references is ~1,240 test verses, 1.6 % is ~500 dev verses.
SPLIT_BUCKETS = 10_000
TEST_BUCKETS = 400
DEV_BUCKETS = 160
SPLIT_RULE = (
    f"bucket = int.from_bytes(sha256(ref.encode()).digest()[:8], 'big') % {SPLIT_BUCKETS}; "
    f"test if bucket < {TEST_BUCKETS}, dev if bucket < {TEST_BUCKETS + DEV_BUCKETS}, else train"
)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPM_SEED = 1
SPM_THREADS = 2

# Length ratios use (len + 10) so that very short verses ("Jesus wept.") are not judged
# on a handful of characters. Aligned KJV/RV1909 verses: 99.8 % fall in 0.55–1.9.
ES_EN_RATIO = (0.5, 2.0)
WEB_KJV_RATIO = (0.6, 1.6)
# A chapter with this many verses outside the tighter band is shifted, not just loose.
ES_EN_CHAPTER_BAND = (0.6, 1.7)
WEB_KJV_CHAPTER_BAND = (0.7, 1.45)
CHAPTER_MAX_OUTLIERS = 0.05  # share of verses; at least 2 outliers are needed
# RV1909 appends a subscription to the last verse of these books.
SUBSCRIBED_BOOKS = frozenset(
    "Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb".split()  # noqa: SIM905
)
# Greek Esther reuses Esther's references for the same verses.
LM_EXCLUDED_BOOKS = frozenset({"EsthGr"})

PAIR_COLUMNS = ("ref", "source_module", "en", "es")


@dataclass(frozen=True)
class Pair:
    """One aligned verse: reference like ``Gen.1.1``, English module, English, Spanish."""

    ref: str
    source_module: str
    en: str
    es: str


# --- cleaning ------------------------------------------------------------------------------

_GAP = "\x00"
# Everything after the chapter-end marker is back matter (KJV subscriptions, the WEB
# glossary), not the verse.
_BACK_MATTER = re.compile(r"<chapter\b[^>]*\beID=.*", re.DOTALL)
# Dropped with their content: notes (with their readings and catch words), headings that
# are not scripture (canonical psalm titles stay: RV1909 has them in verse 1), speakers.
_DROP_ELEMENTS = re.compile(
    r"<(note|speaker|rdg|catchWord|figure|index)\b[^>]*?(?<!/)>.*?</\1>"
    r'|<title\b(?![^>]*canonical="true")[^>]*?(?<!/)>.*?</title>',
    re.DOTALL,
)
_WORD_TAGS = re.compile(r"</?w\b[^>]*>")
# RV1909 marks added words with <transChange> and often leaves no space around them
# ("ejército<tc>se llamaba</tc>Sísara"), but an added clitic belongs to the verb before it
# ("díjo<tc>le</tc>Dios" is "díjole Dios").
_TRANS_CHANGE = re.compile(r"(\w*)<transChange\b[^>]*>([^<]*)</transChange>(?=(\w?))")
_CLITICS = frozenset("lo la los las le les me te se nos os".split())  # noqa: SIM905
_VERB_HOST = re.compile(r"(?:[áéíóú]\w*[a-zñ]|[rd])$")
# Accented words that are not verbs (interrogatives, names): "Josué los circuncidó".
_NOT_HOSTS = frozenset(
    "cuánto cuántos cuánta cuántas cómo cuándo dónde qué quién josué jehová".split()  # noqa: SIM905
)
# Tags between words (lines, paragraphs, list items, milestones): a gap, since the reader
# would glue their neighbours.
_GAP_TAGS = re.compile(
    r"</?(?:l|lg|lb|p|div|item|list|milestone|chapter|title|verse|br|transChange)\b[^>]*>"
)
_ANY_TAG = re.compile(r"<[^>]*>")
# USFM markers that leaked into the OSIS text, e.g. "\nd LORD\+nd*" in the KJV.
_USFM = re.compile(r"\\\+?[a-z]+[0-9]*\*?")
# A gap at a word's edge next to a space or punctuation is no gap; between words, a space.
_GAP_NOT_NEEDED = re.compile(
    _GAP + r"+(?=[\s,.;:!?)\]”’…»]|$)|(?:(?<=[\s(\[“‘¿¡«])|^)" + _GAP + "+"
)
_DOUBLE_PUNCT = re.compile(r"([,;:])(?:\s*\1)+")  # "Bucita,, de la familia"
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[,;:!?](?:\s|$))")
_WHITESPACE = re.compile(r"\s+")
_MARKS = re.compile(r"[¶\[\]]")  # paragraph signs, editorial brackets ("[but] he that")


def _join_trans_change(match: re.Match[str]) -> str:
    before, added, glued_after = match.group(1), match.group(2), match.group(3)
    # A clitic glued to the word before joins it, unless that word is a known non-verb or,
    # when the next word is glued on too, does not look like a verb.
    attach = (
        bool(before)
        and added in _CLITICS
        and before.lower() not in _NOT_HOSTS
        and (not glued_after or _VERB_HOST.search(before) is not None)
    )
    return before + ("" if attach else _GAP) + added + _GAP


def clean_osis(raw: str) -> str:
    """Turn one verse of OSIS markup into plain NFC text with single spaces.

    pysword's own cleaner deletes notes and line markers without a trace, which glues the
    words around them ("only bornSon", "Godcreated"); here each leaves a gap that becomes a
    space unless a space or punctuation is already there.
    """
    text = _BACK_MATTER.sub("", raw)
    text = _DROP_ELEMENTS.sub(_GAP, text)
    text = _WORD_TAGS.sub("", text)
    text = _TRANS_CHANGE.sub(_join_trans_change, text)
    text = _GAP_TAGS.sub(_GAP, text)
    text = _ANY_TAG.sub("", text)
    text = _USFM.sub("", text)
    text = _MARKS.sub("", text)
    text = _WHITESPACE.sub(" ", text)
    text = _GAP_NOT_NEEDED.sub("", text)
    text = text.replace(_GAP, " ")
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()
    return _DOUBLE_PUNCT.sub(r"\1", _SPACE_BEFORE_PUNCT.sub("", text))


# --- reading the modules -------------------------------------------------------------------


@dataclass
class Bible:
    """A module's verses by reference (``Gen.1.1``) in canonical order, and its layout."""

    name: str
    verses: dict[str, str]
    chapter_lengths: dict[str, list[int]]  # OSIS book → verses per chapter
    conf: dict[str, str] = field(default_factory=dict)


def ref_of(book: str, chapter: int, verse: int) -> str:
    """The reference string used everywhere: OSIS book, chapter, verse joined by dots."""
    return f"{book}.{chapter}.{verse}"


def read_bible(name: str, sword_path: Path = SWORD_PATH) -> Bible:
    """Read and clean every verse of one module (empty verses are kept as "")."""
    from pysword.modules import SwordModules  # only the build needs pysword

    modules = SwordModules(str(sword_path))
    confs = modules.parse_modules()
    bible = modules.get_bible_from_module(name)
    # zText modules are compressed per book and pysword inflates the book again for every
    # verse; remembering the last blocks makes a full read ~20× faster.
    if hasattr(bible, "_decompressed_text"):
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    verses: dict[str, str] = {}
    lengths: dict[str, list[int]] = {}
    books = [b for section in bible.get_structure().get_books().values() for b in section]
    for book in tqdm(books, desc=name, unit="book", leave=False):
        texts = list(bible.get_iter(books=book.name, clean=False))
        if len(texts) != sum(book.chapter_lengths):
            raise RuntimeError(f"{name} {book.osis_name}: {len(texts)} verses read")
        it = iter(texts)
        for chapter, count in enumerate(book.chapter_lengths, 1):
            for verse in range(1, count + 1):
                verses[ref_of(book.osis_name, chapter, verse)] = clean_osis(next(it))
        lengths[book.osis_name] = list(book.chapter_lengths)
    conf = {k: v for k, v in confs[name].items() if k in ("description", "versification")}
    conf.update(version=confs[name].get("version", ""))
    return Bible(name, verses, lengths, conf)


# --- split ---------------------------------------------------------------------------------


def split_of(ref: str) -> Split:
    """The split of a verse reference: a fixed hash, so it never depends on run or order."""
    digest = hashlib.sha256(ref.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % SPLIT_BUCKETS
    if bucket < TEST_BUCKETS:
        return "test"
    if bucket < TEST_BUCKETS + DEV_BUCKETS:
        return "dev"
    return "train"


# --- alignment -----------------------------------------------------------------------------


def length_ratio(target: str, source: str) -> float:
    """len(target)/len(source), smoothed by 10 characters for very short verses."""
    return (len(target) + 10) / (len(source) + 10)


def _within(ratio: float, band: tuple[float, float]) -> bool:
    return band[0] <= ratio <= band[1]


def _chapters(bible: Bible) -> Iterator[tuple[str, int, list[str]]]:
    for book, lengths in bible.chapter_lengths.items():
        for chapter, count in enumerate(lengths, 1):
            yield book, chapter, [ref_of(book, chapter, v) for v in range(1, count + 1)]


def aligned_chapters(
    source: Bible, target: Bible, chapter_band: tuple[float, float]
) -> set[tuple[str, int]]:
    """Chapters of ``source`` whose verses line up one to one with ``target``.

    A chapter fails when a verse is empty on either side or missing in ``target``, when
    the previous chapter ends in an empty verse (its text moved here), or when at least 2
    and at least ``CHAPTER_MAX_OUTLIERS`` of its verses have a length ratio outside
    ``chapter_band``.
    """
    kept: set[tuple[str, int]] = set()
    spilled = False
    for book, chapter, refs in _chapters(source):
        if chapter == 1:
            spilled = False
        tgt = [target.verses.get(r, "") for r in refs]
        src = [source.verses[r] for r in refs]
        empty = any(not s or not t for s, t in zip(src, tgt, strict=True))
        outliers = sum(
            not _within(length_ratio(t, s), chapter_band) for s, t in zip(src, tgt, strict=True)
        )
        limit = max(2, CHAPTER_MAX_OUTLIERS * len(refs))
        if not empty and not spilled and outliers < limit:
            kept.add((book, chapter))
        spilled = not src[-1] or not tgt[-1]
    return kept


def _chapter_key(ref: str) -> tuple[str, int]:
    book, chapter, _ = ref.split(".")
    return book, int(chapter)


def web_chapters(kjv: Bible, web: Bible) -> set[tuple[str, int]]:
    """Chapters where a WEB reference means the same verse as the KJV one.

    Same number of verses in both versifications, and the chapter passes
    :func:`aligned_chapters` against the KJV.
    """
    same_layout = {
        (book, chapter)
        for book, lengths in kjv.chapter_lengths.items()
        for chapter, count in enumerate(lengths, 1)
        if chapter <= len(web.chapter_lengths.get(book, []))
        and web.chapter_lengths[book][chapter - 1] == count
    }
    return same_layout & aligned_chapters(kjv, web, WEB_KJV_CHAPTER_BAND)


def align_pairs(kjv: Bible, rv: Bible, web: Bible | None = None) -> dict[Split, list[Pair]]:
    """KJV→RV1909 pairs by reference, plus safe WEB→RV1909 pairs in train (see module doc).

    Formulaic verses recur word for word under other references ("And the LORD spake unto
    Moses, saying,"), so a train pair whose English or Spanish is also a dev or test text
    is dropped. Only the same string is: near-duplicates stay (see the module doc).
    """
    kjv_ok = aligned_chapters(kjv, rv, ES_EN_CHAPTER_BAND)
    last_verses = {
        ref_of(book, len(lengths), lengths[-1])
        for book, lengths in kjv.chapter_lengths.items()
        if book in SUBSCRIBED_BOOKS
    }
    web_ok = web_chapters(kjv, web) if web is not None else set()
    pairs: dict[Split, list[Pair]] = {s: [] for s in SPLITS}
    for ref, en in kjv.verses.items():
        es = rv.verses.get(ref, "")
        key = _chapter_key(ref)
        if (
            key not in kjv_ok
            or ref in last_verses
            or not _within(length_ratio(es, en), ES_EN_RATIO)
        ):
            continue
        split = split_of(ref)
        pairs[split].append(Pair(ref, kjv.name, en, es))
        if web is None or split != "train" or key not in web_ok:
            continue
        web_en = web.verses.get(ref, "")
        if (
            web_en
            and web_en != en
            and _within(length_ratio(web_en, en), WEB_KJV_RATIO)
            and _within(length_ratio(es, web_en), ES_EN_RATIO)
        ):
            pairs[split].append(Pair(ref, web.name, web_en, es))
    held_out = {text for s in ("dev", "test") for p in pairs[s] for text in (p.en, p.es)}
    pairs["train"] = [p for p in pairs["train"] if p.en not in held_out and p.es not in held_out]
    return pairs


def lm_lines(web: Bible, kjv: Bible) -> dict[Split, list[str]]:
    """WEB verses for the LM, split by reference (see module doc for what is left out).

    As for the pairs, a train line that is also a dev or test line is dropped.
    """
    same = web_chapters(kjv, web)
    lines: dict[Split, list[str]] = {s: [] for s in SPLITS}
    for ref, text in web.verses.items():
        book = ref.split(".")[0]
        if not text or book in LM_EXCLUDED_BOOKS:
            continue
        if book in kjv.chapter_lengths:
            kjv_text = kjv.verses.get(ref, "")
            if _chapter_key(ref) not in same or not kjv_text:
                continue
            if not _within(length_ratio(text, kjv_text), WEB_KJV_RATIO):
                continue
        lines[split_of(ref)].append(text)
    held_out = {*lines["dev"], *lines["test"]}
    lines["train"] = [line for line in lines["train"] if line not in held_out]
    return lines


# --- files ---------------------------------------------------------------------------------


def write_pairs(pairs: Iterable[Pair], path: Path) -> int:
    """Write a header and one tab-separated pair per line; returns the number of pairs."""
    n = 0
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(PAIR_COLUMNS)
        for p in pairs:
            writer.writerow((p.ref, p.source_module, p.en, p.es))
            n += 1
    return n


def load_pairs(path: Path | str) -> list[Pair]:
    """Read a ``pairs.*.tsv`` file (or the test fixture) written by :func:`write_pairs`."""
    with Path(path).open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or tuple(header) != PAIR_COLUMNS:
            raise ValueError(f"{path}: expected header {PAIR_COLUMNS}, got {header}")
        return [Pair(*row) for row in reader if row]


def write_lines(lines: Iterable[str], path: Path) -> int:
    """Write one text per line; returns the number of lines."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    return n


def load_lines(path: Path | str) -> list[str]:
    """Read an ``lm.*.txt`` file: one verse per line, empty lines skipped."""
    with Path(path).open(encoding="utf-8") as f:
        return [s for s in (line.rstrip("\n") for line in f) if s]


def train_sentencepiece(
    texts: Iterable[str], prefix: Path | str, vocab_size: int, model_type: str = "unigram"
) -> Path:
    """Train a SentencePiece model on ``texts``; writes ``prefix.model``/``.vocab``.

    Ids are fixed (pad 0, unk 1, bos 2, eos 3) to match ``TransformerConfig``; the seed
    and thread count are fixed so that the same texts give the same model.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(SPM_SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=SPM_THREADS,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


# --- CLI -----------------------------------------------------------------------------------

app = typer.Typer(
    add_completion=False, help="Build the Bible verse pairs, LM corpus and tokenizers."
)

# Verses whose raw markup exercises the cleaner; the fixture always includes them.
FIXTURE_TRICKY = (
    "Gen.1.1",  # WEB: a footnote between "God" and "created"
    "John.3.16",  # WEB: "only born</q><note/><q>Son"
    "Exod.17.16",  # KJV: leaked USFM "\\nd LORD"
    "1John.2.23",  # KJV: editorial brackets "[but]"
    "Ps.3.1",  # canonical psalm title kept in both languages
    "Judg.4.2",  # RV1909: "ejército<tc>se llamaba</tc>Sísara"
    "1Kgs.3.5",  # RV1909: clitic "díjo<tc>le</tc>Dios"
    "Ps.149.1",  # RV1909: "alabanza<tc>sea</tc>en"
    "Josh.5.4",  # RV1909: "Josué<tc>los</tc> circuncidó" (not a clitic)
    "Job.32.2",  # RV1909: "Bucita,, de la familia"
    "Song.1.2",  # WEB: a <speaker> label dropped
    "Ezra.8.2",  # WEB: list items
)


@app.callback()
def main() -> None:
    """Build the Bible corpora and tokenizers (see the module docstring)."""


@app.command()
def fixture(
    data: Annotated[Path, typer.Option(help="Output folder of `build`.")] = Path("data"),
    out: Annotated[Path, typer.Option(help="Fixture file.")] = Path("tests/fixtures/verses.tsv"),
    size: Annotated[int, typer.Option(help="Number of pairs.")] = 400,
    max_chars: Annotated[int, typer.Option(help="Longest en+es kept.")] = 300,
) -> None:
    """Write a small deterministic sample of real pairs for the tests."""
    pairs = [p for split in SPLITS for p in load_pairs(data / f"pairs.{split}.tsv")]
    chosen = [p for p in pairs if p.ref in FIXTURE_TRICKY]
    quota = {"test": size // 5, "dev": size // 10}
    quota["train"] = size - len(chosen) - quota["test"] - quota["dev"]
    taken = dict.fromkeys(quota, 0)

    def order(p: Pair) -> bytes:
        return hashlib.sha256(f"fixture:{p.ref}:{p.source_module}".encode()).digest()

    for p in sorted(pairs, key=order):
        split = split_of(p.ref)
        if p in chosen or len(p.en) + len(p.es) > max_chars or taken[split] >= quota[split]:
            continue
        chosen.append(p)
        taken[split] += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    n = write_pairs(sorted(chosen, key=lambda p: (split_of(p.ref), order(p))), out)
    typer.echo(f"{out}: {n} pairs, {out.stat().st_size} bytes")


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("data"),
    sword: Annotated[Path, typer.Option(help="SWORD library with mods.d/.")] = SWORD_PATH,
    vocab_size: Annotated[int, typer.Option(help="SentencePiece vocabulary size.")] = 8000,
) -> None:
    """Read the modules, write pairs, LM text, tokenizers and stats.json under OUT."""
    start = time.perf_counter()
    if not (sword / "mods.d").is_dir():
        raise typer.BadParameter(f"no SWORD modules in {sword} (apt install sword-text-kjv …)")
    bibles = {name: read_bible(name, sword) for name in tqdm([KJV, WEB, RV1909], desc="modules")}
    kjv, web, rv = bibles[KJV], bibles[WEB], bibles[RV1909]
    pairs = align_pairs(kjv, rv, web)
    lm = lm_lines(web, kjv)

    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"pairs": {}, "lm_lines": {}}
    for split in SPLITS:
        rows = pairs[split]
        write_pairs(rows, out / f"pairs.{split}.tsv")
        by_module: dict[str, int] = defaultdict(int)
        for p in rows:
            by_module[p.source_module] += 1
        stats["pairs"][split] = {
            "pairs": len(rows),
            "refs": len({p.ref for p in rows}),
            "by_module": dict(by_module),
        }
        stats["lm_lines"][split] = write_lines(lm[split], out / f"lm.{split}.txt")

    train = pairs["train"]
    translator_text = sorted({p.en for p in train} | {p.es for p in train})
    with tqdm(total=2, desc="sentencepiece") as bar:
        train_sentencepiece(translator_text, out / "spm" / "translator", vocab_size)
        bar.update()
        train_sentencepiece(lm["train"], out / "spm" / "lm", vocab_size)
        bar.update()

    stats.update(
        modules={name: b.conf for name, b in bibles.items()},
        non_empty_verses={name: sum(map(bool, b.verses.values())) for name, b in bibles.items()},
        kjv_rv_chapters_kept=len(aligned_chapters(kjv, rv, ES_EN_CHAPTER_BAND)),
        kjv_chapters=sum(len(c) for c in kjv.chapter_lengths.values()),
        split_rule=SPLIT_RULE,
        filters={
            "es_en_ratio": ES_EN_RATIO,
            "web_kjv_ratio": WEB_KJV_RATIO,
            "es_en_chapter_band": ES_EN_CHAPTER_BAND,
            "web_kjv_chapter_band": WEB_KJV_CHAPTER_BAND,
            "chapter_max_outliers": CHAPTER_MAX_OUTLIERS,
        },
        sentencepiece={
            "model_type": "unigram",
            "vocab_size": vocab_size,
            "ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
            "translator_sentences": len(translator_text),
            "lm_sentences": len(lm["train"]),
            "seed": SPM_SEED,
            "threads": SPM_THREADS,
        },
        seconds=round(time.perf_counter() - start, 1),
    )
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    typer.echo(json.dumps({k: stats[k] for k in ("pairs", "lm_lines", "seconds")}, indent=2))


if __name__ == "__main__":
    app()
