"""python3 tools/build_dataset.py --docs FILE.jsonl --vocab-size N [--caseops] --val-docs K --out DIR

Builds a dataset in the challenge's format from documents, for any SentencePiece vocabulary size,
optionally with CaseOps (the tokenizer track, PR #1626), and
prints `data_path:DIR` and `tokenizer_path:FILE` as its last lines, ready for
`DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=N python3 train_gpt.py`.

Input (--docs, one or more files): `*.jsonl` holds one JSON object per line with a `text` field (the
challenge's docs_selected.jsonl); any other file is UTF-8 plain text whose documents are separated
by blank lines. Order is kept: the first K documents are validation (K = --val-docs, default 50,000
like the challenge), the rest training.

Text: every document is first normalized with the tokenizer's own rule (nmt_nfkc, extra whitespace
and newlines collapsed to one space: what the challenge's tokenizers do to the text anyway, and what
decoding the tokens gives back). That normalized text is the document from then on: it is hashed,
tokenized, and decoding its tokens (then caseops_decode with --caseops) gives it back exactly, which
the builder checks for every validation document. Documents that normalize to nothing are dropped and
counted.

Bytes (the bpb denominator; manifest.json "val_bytes" says which, train_gpt.py logs it): a plain build
has no sidecar, so train_gpt.py counts the normalized text by its per-token rule, as for the
challenge's sp1024/sp8192 exports. A --caseops build's sidecar counts, like the public CaseOps export
(prepare_caseops_data.py of the 1.0611 record: each piece's surface in the raw document), the input
document's own UTF-8 bytes: a run of whitespace or a line break as written, a character NFKC rewrites
("\ufb01", "\u00bd", a non-breaking space) as it was, whitespace at either end of a document not at all.
`--val-bytes normalized` counts the normalized text instead (train_gpt.py proves a sidecar against the
decoded text, so it refuses the default's counts for any document whose whitespace or characters the
normalization changed). The tokens are the export's but where NFKC makes ASCII capitals ("\u2122" is
"TM", full-width letters): the export rewrites capitals before NFKC and spells those in byte pieces,
this builder after it, with operators; the bytes counted are the same.

Tokenizer: SentencePiece BPE with the challenge's settings (byte fallback, split digits, nmt_nfkc, no
dummy prefix, pad/bos/eos/unk = 0/1/2/3, character coverage 0.999), trained on the first
--tokenizer-docs training documents only (never on validation text); with --caseops on the rewritten
text, the four operators reserved as user-defined pieces. --tokenizer FILE reuses a model instead
(e.g. to compare CaseOps and plain text with one vocabulary); it is copied into DIR.

Output (DIR must be new or empty: the builder refuses to mix datasets). Everything is written into
.DIR.partial-PID beside DIR, which is renamed to DIR when the manifest is written, so an interrupted build
leaves no DIR; its first file is built_by_build_dataset.txt, and train_gpt.py refuses a folder that holds
it without manifest.json:
- fineweb_val_XXXXXX.bin, fineweb_train_XXXXXX.bin: 256 little-endian int32 (magic 20240520,
  version 1, token count) then uint16 tokens; BOS (1) before every document, no EOS; shards of
  --shard-tokens tokens (default 100,000,000 like the challenge; a document may continue into the
  next shard);
- with --caseops, fineweb_val_bytes_XXXXXX.bin beside each validation shard: the same header and
  length, one uint16 per validation token: the bytes of the document behind it (see Bytes; BOS and
  operators 0, an escaped literal operator 3);
- manifest.json: documents, tokens and bytes per split, dropped documents, sha256 and size of every
  file, the settings, the inputs' sha256 and the builder's version.

Leaks: a training document whose normalized text has the sha256 of a validation document's is
dropped (counted in the manifest as `train.dropped_duplicates_of_val`), and so is one that nearly
repeats a validation document (a character changed, a line added: see ValidationIndex; counted as
`train.dropped_near_duplicates_of_val`), so no validation text is trained on, even when the input
repeats it. train_gpt.py's own leak check sees only exact repeats.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator

import datasketch
import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt as tg  # noqa: E402  (the shard format and caseops_decode; importing it has no side effects)

BUILDER_VERSION = "2"  # 2: the CaseOps sidecar counts the input's bytes (val_bytes:original)
BOS_ID = 1
BATCH_DOCS = 512
PROGRESS_SECONDS = 10.0
# The bpb denominator (manifest.json "val_bytes"; train_gpt.py logs it): its convention, then what it counts.
VAL_BYTES = {
    "original": "original: the input document's UTF-8 bytes behind each token, as the public CaseOps export's "
                "sidecar counts them (prepare_caseops_data.py: SentencePiece piece surfaces; whitespace runs and "
                "NFKC-rewritten characters as written, whitespace at either end of a document not counted)",
    "normalized": "normalized: the UTF-8 bytes of the normalized text each token decodes to (case restored)",
    "rule": "rule: no sidecar; train_gpt.py's per-token rule on the decoded text, as for the challenge's plain "
            "exports",
}

# -----------------------------------------------------------------------------
# CaseOps, forward direction (the inverse, caseops_decode, is train_gpt.py's)

_CASEOPS_UNIT = re.compile("[A-Za-z]+|[\ue001-\ue004]")
TITLE, ALLCAPS, CAPNEXT, ESC = tg.CASEOPS_OPERATORS


def _caseops_rewrite(m: re.Match) -> str:
    unit = m.group()
    if unit in tg.CASEOPS_OPERATORS:
        return ESC + unit
    if unit.islower():
        return unit
    if len(unit) >= 2 and unit.isupper():
        return ALLCAPS + unit.lower()
    out = []
    for i, ch in enumerate(unit):
        if "A" <= ch <= "Z":
            out.append(TITLE if i == 0 else CAPNEXT)
        out.append(ch.lower())
    return "".join(out)


def caseops_encode(text: str) -> str:
    """CaseOps (`lossless_caps_caseops_v1` of the public record, see train_gpt.caseops_decode): over
    each maximal run of ASCII letters, a lower-case word is unchanged, an all-caps word of 2+ letters
    becomes ALLCAPS + the word in lower case, any other word gets TITLE before a capital first letter
    and CAPNEXT before each further capital, each written in lower case; a literal operator character
    becomes ESC + itself; everything else (digits, non-ASCII letters such as "É") is unchanged."""
    return _CASEOPS_UNIT.sub(_caseops_rewrite, text)


# -----------------------------------------------------------------------------
# Input


class BuildError(Exception):
    """A bad input or setting: main() prints it as one `error:` line."""


def read_documents(paths: list[Path]) -> Iterator[str]:
    """The raw documents of every input, in order (see the module docstring for the formats)."""
    for path in paths:
        if path.suffix == ".jsonl":
            with path.open("rb") as f:
                offset = 0  # where the line starts in the file, for the error below
                for line_no, raw in enumerate(f, 1):
                    line_start, offset = offset, offset + len(raw)
                    if not raw.strip():
                        continue
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise BuildError(f"{path}:{line_no}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset "
                                         f"{line_start + exc.start} of the file)") from None
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise BuildError(f"{path}:{line_no}: not a JSON object with a `text` field") from None
                    if not isinstance(text, str):
                        raise BuildError(f"{path}:{line_no}: `text` is not a string")
                    yield text
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise BuildError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            yield from (doc for doc in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text) if doc.strip())


def count_documents(paths: list[Path]) -> int:
    """Documents in the inputs (non-blank JSON lines, or blank-line separated blocks): for the ETA."""
    total = 0
    for path in paths:
        if path.suffix == ".jsonl":
            with path.open("rb") as f:
                total += sum(1 for line in f if line.strip())
        else:
            total += sum(1 for _ in read_documents([path]))
    return total


def batches(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Normalizer:
    """The tokenizer's text normalization (see the module docstring), as plain text."""

    def __init__(self, model_file: Path | None):
        self.sp = (spm.SentencePieceNormalizer(model_file=str(model_file)) if model_file else
                   spm.SentencePieceNormalizer(rule_name="nmt_nfkc", add_dummy_prefix=False))

    def __call__(self, docs: list[str]) -> list[str]:
        return [doc.replace("\u2581", " ") for doc in self.sp.normalize(docs)]

    def source_bytes(self, raw: str, doc: str) -> np.ndarray:
        """Per character of `doc` (this normalization of `raw`): the UTF-8 bytes of the raw text it stands
        for, by SentencePiece's own offsets, from which it reports a piece's surface: a collapsed run of
        whitespace is one space holding the run's bytes, a character NFKC rewrote holds the original's,
        whitespace at either end belongs to no character."""
        text, offsets = self.sp.normalize(raw, with_offsets=True)
        if text.replace("\u2581", " ") != doc:
            raise BuildError("the normalizer gave two texts for one document (a builder bug)")
        return np.diff(np.concatenate(([0], np.cumsum(utf8_lengths(raw))))[offsets])


def utf8_lengths(text: str) -> np.ndarray:
    """The UTF-8 length of each character of text."""
    code = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return 1 + (code >= 0x80) + (code >= 0x800) + (code >= 0x10000)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Near duplicates: a validation document repeated in training with a character changed or a line added
# has another hash. Its set of word 5-grams (the shingles of FineWeb's own deduplication) is nearly the
# validation document's: a MinHash LSH index (datasketch) over the validation documents' shingles finds
# the candidates in about the time it takes to hash a document, and the Jaccard similarity of the two
# sets of shingle hashes, computed exactly, decides. The index looks for candidates from 0.5 on, so that
# MinHash's estimate (~0.04 standard deviation with 128 permutations) misses hardly any of 0.7.
NEAR_SHINGLE_WORDS = 5
NEAR_PERMUTATIONS = 128
NEAR_CANDIDATE = 0.5
NEAR_JACCARD = 0.7  # one changed word in 100 leaves 0.91; a 20-word line added to 100 words, 0.83


def shingle_hashes(doc: str) -> np.ndarray:
    """The sorted crc32 hashes of the lower-cased word 5-grams of doc (a shorter document is one shingle)."""
    words, k = doc.lower().split(), NEAR_SHINGLE_WORDS
    shingles = {" ".join(words[i:i + k]).encode() for i in range(max(1, len(words) - k + 1))}
    return np.unique(np.fromiter(map(zlib.crc32, shingles), dtype=np.uint32, count=len(shingles)))


class ValidationIndex:
    """The validation documents, for telling which training documents to drop: equal ones (sha256 of the
    normalized text) and near duplicates (Jaccard similarity of the shingle sets >= NEAR_JACCARD)."""

    def __init__(self):
        self.hashes: set[str] = set()
        self.shingles: list[np.ndarray] = []
        self.lsh = datasketch.MinHashLSH(threshold=NEAR_CANDIDATE, num_perm=NEAR_PERMUTATIONS)
        self.empty = datasketch.MinHash(num_perm=NEAR_PERMUTATIONS, seed=1, hashfunc=int)  # already hashed

    def signature(self, shingles: np.ndarray) -> datasketch.MinHash:
        signature = self.empty.copy()
        signature.update_batch(shingles)
        return signature

    def add(self, doc: str) -> None:
        self.hashes.add(text_hash(doc))
        shingles = shingle_hashes(doc)
        self.lsh.insert(len(self.shingles), self.signature(shingles))
        self.shingles.append(shingles)

    def match(self, doc: str) -> str | None:
        """"dropped_duplicates_of_val", "dropped_near_duplicates_of_val", or None for a document to keep."""
        if text_hash(doc) in self.hashes:
            return "dropped_duplicates_of_val"
        mine = shingle_hashes(doc)
        for i in self.lsh.query(self.signature(mine)):
            shared = len(np.intersect1d(mine, self.shingles[i], assume_unique=True))
            if shared >= NEAR_JACCARD * (len(mine) + len(self.shingles[i]) - shared):
                return "dropped_near_duplicates_of_val"
        return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Iterator[str], prefix: Path, vocab_size: int, caseops: bool, threads: int) -> Path:
    settings = dict(
        model_type="bpe", vocab_size=vocab_size, character_coverage=0.999, byte_fallback=True,
        split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0,
        bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False, num_threads=threads,
        max_sentence_length=1 << 16, minloglevel=2)
    if caseops:
        settings["user_defined_symbols"] = list(tg.CASEOPS_OPERATORS)
    spm.SentencePieceTrainer.train(sentence_iterator=texts, model_prefix=str(prefix), **settings)
    prefix.with_suffix(".vocab").unlink(missing_ok=True)
    return prefix.with_suffix(".model")


def piece_lengths(sp: spm.SentencePieceProcessor) -> tuple[np.ndarray, np.ndarray]:
    """Per token id: the characters of text its piece spells (control pieces none, a byte piece one),
    and whether it is a byte piece that continues a UTF-8 character (0x80-0xBF)."""
    chars = np.zeros(sp.vocab_size(), dtype=np.int64)
    continues = np.zeros(sp.vocab_size(), dtype=bool)
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            chars[i], continues[i] = 1, 0x80 <= int(sp.id_to_piece(i)[3:5], 16) < 0xC0  # "<0xE6>"
        elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
            chars[i] = len(sp.id_to_piece(i))
    return chars, continues


_CASEOPS_MARK = re.compile("\ue004[\ue001-\ue004]|[\ue001-\ue004]")  # an operator, or ESC and the literal after it


def sidecar_counts(ids: list[int], lengths: tuple[np.ndarray, np.ndarray], text: str, char_bytes: np.ndarray
                   ) -> np.ndarray:
    """The sidecar's count for each of a document's tokens: the bytes (char_bytes, one per character of
    the document before CaseOps) of the characters its piece spells in the CaseOps text `text`. An
    operator is 0 bytes, a literal one after ESC is a character of the document, and a character that
    byte fallback spells in several tokens counts on its last, as in the public export
    (lossless_caps.surface_piece_original_byte_counts over SentencePiece's piece surfaces)."""
    chars, continues = lengths
    ids = np.asarray(ids)
    spelled = chars[ids]
    spelled[:-1][continues[ids[1:]]] = 0
    ends = np.cumsum(spelled)
    if ends[-1] != len(text):
        raise BuildError(f"the tokens spell {ends[-1]} characters of a {len(text)}-character text (a builder bug)")
    weights = np.zeros(len(text), dtype=np.int64)
    operator = np.zeros(len(text), dtype=bool)
    operator[[m.start() for m in _CASEOPS_MARK.finditer(text)]] = True
    weights[~operator] = char_bytes
    return np.diff(np.concatenate(([0], np.cumsum(weights)))[np.concatenate(([0], ends))])


def check_tokenizer(sp: spm.SentencePieceProcessor, path: Path, vocab_size: int, caseops: bool) -> None:
    if sp.vocab_size() != vocab_size:
        raise BuildError(f"{path}: {sp.vocab_size()} pieces, but --vocab-size {vocab_size} "
                         f"(a trained tokenizer is smaller when the text is too small for N pieces)")
    if vocab_size > 1 << 16:
        raise BuildError(f"--vocab-size {vocab_size}: shards store uint16 token ids (at most 65536)")
    if sp.bos_id() != BOS_ID:
        raise BuildError(f"{path}: BOS is id {sp.bos_id()}, the challenge's format needs {BOS_ID}")
    for op in tg.CASEOPS_OPERATORS if caseops else ():
        if sp.piece_to_id(op) == sp.unk_id() or len(sp.encode(op)) != 1:
            raise BuildError(f"{path}: CaseOps operator U+{ord(op):04X} is not a piece of its own "
                             f"(train with --caseops, or reuse a CaseOps tokenizer)")


# -----------------------------------------------------------------------------
# Shards


class ShardWriter:
    """Writes a split's token stream as fixed-size shards (the last one shorter), and, when given
    byte counts, the validation sidecar with the same boundaries."""

    def __init__(self, out: Path, split: str, shard_tokens: int, sidecar: bool):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.tokens = np.zeros(shard_tokens, dtype="<u2")
        self.counts = np.zeros(shard_tokens, dtype="<u2") if sidecar else None
        self.fill, self.index, self.files = 0, 0, []

    def add(self, ids: np.ndarray, counts: np.ndarray | None) -> None:
        pos = 0
        while pos < len(ids):
            take = min(self.shard_tokens - self.fill, len(ids) - pos)
            self.tokens[self.fill:self.fill + take] = ids[pos:pos + take]
            if self.counts is not None:
                self.counts[self.fill:self.fill + take] = counts[pos:pos + take]
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        header = np.zeros(256, dtype="<i4")
        header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, self.fill)
        parts = [(f"fineweb_{self.split}_{self.index:06d}.bin", self.tokens)]
        if self.counts is not None:
            parts.append((f"fineweb_{self.split}_bytes_{self.index:06d}.bin", self.counts))
        for name, array in parts:
            (self.out / name).write_bytes(header.tobytes() + array[:self.fill].tobytes())
            self.files.append(name)
        self.fill, self.index = 0, self.index + 1


class Progress:
    def __init__(self, total: int, what: str):
        self.total, self.what, self.start, self.last = total, what, time.time(), time.time()

    def update(self, done: int, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"{self.what}: {done:,}/{self.total:,} documents, {rate:,.0f} docs/s, ETA {eta:,.0f} s", flush=True)


# -----------------------------------------------------------------------------
# The build


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=Path, nargs="+", required=True, help="*.jsonl with a `text` field per line, or plain text files (documents separated by blank lines)")
    p.add_argument("--vocab-size", type=int, required=True, help="SentencePiece vocabulary size (equal to the reused tokenizer's with --tokenizer)")
    p.add_argument("--caseops", action="store_true", help="rewrite capitals with the CaseOps operators; write the validation byte sidecar")
    p.add_argument("--val-bytes", choices=("original", "normalized"), default="original",
                   help="with --caseops, what the sidecar counts: the input document's bytes behind each token "
                        "(default, the public export's) or the normalized text's (what the tokens decode to)")
    p.add_argument("--tokenizer", type=Path, help="reuse this SentencePiece model instead of training one")
    p.add_argument("--val-docs", type=int, default=50_000, help="the first K documents are validation (default 50,000, the challenge's)")
    p.add_argument("--out", type=Path, required=True, help="output folder, new or empty (built beside it, renamed to it when complete)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100,000,000, the challenge's)")
    p.add_argument("--tokenizer-docs", type=int, default=200_000, help="train the tokenizer on at most this many training documents (default 200,000)")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="threads for SentencePiece training and encoding")
    a = p.parse_args(argv)
    for path in a.docs:
        if not path.is_file():
            raise BuildError(f"--docs {path}: no such file")
    if a.tokenizer is not None and not a.tokenizer.is_file():
        raise BuildError(f"--tokenizer {a.tokenizer}: no such file")
    for name in ("vocab_size", "val_docs", "shard_tokens", "tokenizer_docs", "threads"):
        if getattr(a, name) < 1:
            raise BuildError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be at least 1")
    if a.vocab_size > 1 << 16:
        raise BuildError(f"--vocab-size {a.vocab_size}: shards store uint16 token ids (at most 65536)")
    existing = sorted(a.out.iterdir()) if a.out.is_dir() else []
    if existing:
        raise BuildError(f"--out {a.out}: already holds {existing[0].name} (and {len(existing) - 1} more); "
                         f"refusing to mix datasets, choose a new or empty folder")
    if a.out.exists() and not a.out.is_dir():
        raise BuildError(f"--out {a.out}: exists and is not a folder")
    return a


def normalized_documents(paths: list[Path], normalize: Normalizer, stats: dict) -> Iterator[tuple[str, str]]:
    """(raw, normalized) of the documents that normalize to some text, in order; counts the dropped empty ones."""
    for batch in batches(read_documents(paths), BATCH_DOCS):
        for raw, doc in zip(batch, normalize(batch)):
            if doc:
                yield raw, doc
            else:
                stats["dropped_empty"] += 1


def split_documents(paths, normalize, val_docs: int, stats: dict, val_index: ValidationIndex | None = None
                    ) -> Iterator[tuple[str, str, str]]:
    """(split, raw, normalized document) in order: the first val_docs documents, then the training ones,
    without those equal or nearly equal to a validation document (when val_index is given; counted)."""
    for n, (raw, doc) in enumerate(normalized_documents(paths, normalize, stats)):
        if n < val_docs:
            yield "val", raw, doc
        elif val_index is not None and (dropped := val_index.match(doc)):
            stats[dropped] += 1
        else:
            yield "train", raw, doc


def build(a: argparse.Namespace) -> tuple[Path, Path]:
    """Writes the dataset into a folder beside --out, which becomes --out by one rename when it is complete:
    an interrupted build leaves no --out (and its unfinished folder, named .OUT.partial-PID, holds the
    marker and no manifest, which train_gpt.py refuses). Returns (the data folder, the tokenizer)."""
    for stale in sorted(a.out.parent.glob(f".{a.out.name}.partial-*")):
        print(f"note: {stale} is the unfinished folder of an interrupted build; nothing uses it, delete it", flush=True)
    work = a.out.parent / f".{a.out.name}.partial-{os.getpid()}"  # same file system: the rename is atomic
    work.mkdir(parents=True)
    try:
        (work / tg.BUILD_MARKER).write_text("built by tools/build_dataset.py; the build is complete when "
                                            "manifest.json is here (written last)\n", encoding="utf-8")
        tokenizer = write_dataset(a, work)
        os.replace(work, a.out)  # onto nothing or an empty folder (parse_args refused any other)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return a.out.resolve(), (a.out / tokenizer.name).resolve()


def write_dataset(a: argparse.Namespace, out: Path) -> Path:
    """The tokenizer, the shards and, last, manifest.json, in `out`; returns the tokenizer's path."""
    t_start = time.time()
    transform = caseops_encode if a.caseops else (lambda text: text)
    print(f"counting documents in {len(a.docs)} input file(s)", flush=True)
    total_docs = count_documents(a.docs)
    if total_docs <= a.val_docs:
        raise BuildError(f"--val-docs {a.val_docs}: the input has only {total_docs} documents, none would be left for training")
    normalize = Normalizer(a.tokenizer)

    # validation first: it decides which training documents are (near) duplicates
    scratch = {"dropped_empty": 0, "dropped_duplicates_of_val": 0, "dropped_near_duplicates_of_val": 0}
    val_index = ValidationIndex()
    for split, _, doc in split_documents(a.docs, normalize, a.val_docs, scratch):
        if split != "val":
            break
        val_index.add(doc)

    name = f"tokenizer_sp{a.vocab_size}{'_caseops' if a.caseops else ''}"
    t_tok = time.time()
    if a.tokenizer is None:
        def training_texts() -> Iterator[str]:
            taken = 0
            for split, _, doc in split_documents(a.docs, normalize, a.val_docs, dict(scratch), val_index):
                if split == "train":
                    yield transform(doc)
                    taken += 1
                    if taken == a.tokenizer_docs:
                        return
        print(f"training a {a.vocab_size}-piece BPE on up to {a.tokenizer_docs:,} training documents", flush=True)
        tokenizer = train_tokenizer(training_texts(), out / name, a.vocab_size, a.caseops, a.threads)
    else:
        tokenizer = out / (name + ".model")
        shutil.copyfile(a.tokenizer, tokenizer)
    tokenizer_seconds = time.time() - t_tok
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    check_tokenizer(sp, a.tokenizer or tokenizer, a.vocab_size, a.caseops)
    lengths = piece_lengths(sp)

    stats = dict.fromkeys(scratch, 0)
    splits = {s: {"docs": 0, "tokens": 0, "bytes": 0} for s in ("val", "train")}
    writers = {"val": ShardWriter(out, "val", a.shard_tokens, a.caseops),
               "train": ShardWriter(out, "train", a.shard_tokens, False)}
    progress = Progress(total_docs, "encoding")
    t_enc, cpu_enc, done = time.time(), time.process_time(), 0
    for batch in batches(split_documents(a.docs, normalize, a.val_docs, stats, val_index), BATCH_DOCS):
        texts = [transform(doc) for _, _, doc in batch]
        for (split, raw, doc), text, ids in zip(batch, texts, sp.encode(texts, num_threads=a.threads)):
            ids = [BOS_ID] + ids
            counts, n_bytes = None, len(doc.encode("utf-8"))
            if split == "val":
                check_val_document(sp, doc, ids, a.caseops, splits["val"]["docs"])
            if split == "val" and a.caseops:  # the sidecar: its sum is the denominator
                char_bytes = normalize.source_bytes(raw, doc) if a.val_bytes == "original" else utf8_lengths(doc)
                counts, n_bytes = sidecar_counts(ids, lengths, text, char_bytes), int(char_bytes.sum())
            writers[split].add(np.asarray(ids, dtype=np.int64), counts)
            s = splits[split]
            s["docs"], s["tokens"], s["bytes"] = s["docs"] + 1, s["tokens"] + len(ids), s["bytes"] + n_bytes
        done += len(batch)
        progress.update(done + sum(stats.values()))
    for w in writers.values():
        w.flush()
    encode_seconds, encode_cpu_seconds = time.time() - t_enc, time.process_time() - cpu_enc
    if splits["train"]["docs"] == 0:
        raise BuildError("--docs: every training document was empty or a duplicate of a validation document")
    docs_per_s = total_docs / max(encode_seconds, 1e-9)
    print(f"encoded {total_docs:,} documents in {encode_seconds:.1f} s ({encode_cpu_seconds:.1f} s of CPU): "
          f"{docs_per_s:,.0f} docs/s with {a.threads} thread(s); 10 M documents would take "
          f"~{1e7 / docs_per_s / 3600:.2f} h here (plus tokenizer training: {tokenizer_seconds:.1f} s on this input)",
          flush=True)
    for split, s in splits.items():
        print(f"{split}: {s['docs']:,} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes, "
              f"{s['tokens'] / max(s['bytes'], 1):.4f} tokens/byte (BOS included)", flush=True)
    print(f"dropped: {stats['dropped_empty']} empty documents, {stats['dropped_duplicates_of_val']} training "
          f"documents equal to a validation document, {stats['dropped_near_duplicates_of_val']} nearly equal to one "
          f"(word {NEAR_SHINGLE_WORDS}-gram Jaccard similarity >= {NEAR_JACCARD})", flush=True)

    files = writers["val"].files + writers["train"].files + [tokenizer.name]
    manifest = {
        "builder": "tools/build_dataset.py", "builder_version": BUILDER_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"vocab_size": a.vocab_size, "caseops": a.caseops,
                     "text_transform": "lossless_caps_caseops_v1" if a.caseops else "identity",
                     "val_docs": a.val_docs, "shard_tokens": a.shard_tokens,
                     "tokenizer_docs": a.tokenizer_docs, "reused_tokenizer": str(a.tokenizer) if a.tokenizer else None,
                     "normalization": "nmt_nfkc, extra whitespace removed (the tokenizer's own)",
                     "bos_id": BOS_ID, "eos": False,
                     "near_duplicates": {"shingle_words": NEAR_SHINGLE_WORDS, "jaccard": NEAR_JACCARD,
                                         "minhash_permutations": NEAR_PERMUTATIONS, "lsh_threshold": NEAR_CANDIDATE,
                                         "datasketch": datasketch.__version__}},
        "inputs": [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in a.docs],
        "documents_in_input": total_docs,
        "splits": {"val": splits["val"],
                   "train": {**splits["train"], **{k: v for k, v in stats.items() if k.endswith("_of_val")}}},
        "dropped_empty": stats["dropped_empty"],
        "val_sidecar": "fineweb_val_bytes_*.bin" if a.caseops else None,
        "val_bytes": VAL_BYTES[a.val_bytes if a.caseops else "rule"],
        "tokenizer": tokenizer.name,
        "seconds": {"tokenizer": round(tokenizer_seconds, 2), "encode": round(encode_seconds, 2),
                    "encode_cpu": round(encode_cpu_seconds, 2),
                    "total": round(time.time() - t_start, 2)},
        "files": {name: {"bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name)} for name in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return tokenizer


def check_val_document(sp: spm.SentencePieceProcessor, doc: str, ids: list[int], caseops: bool, index: int) -> None:
    """Decoding a validation document's tokens (and restoring its capitals) must give it back."""
    decoded = sp.decode(ids)
    if caseops:
        decoded = tg.caseops_decode(decoded)
    if decoded != doc:
        at = next((i for i, (x, y) in enumerate(zip(decoded, doc)) if x != y), min(len(decoded), len(doc)))
        raise BuildError(f"validation document {index}: decoding its tokens does not give it back "
                         f"(first difference at character {at}: {doc[at:at + 20]!r} vs {decoded[at:at + 20]!r})")


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse_args(sys.argv[1:] if argv is None else argv)
        data_path, tokenizer_path = build(a)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing written (the unfinished folder beside --out was removed)", file=sys.stderr)
        return 130
    print(f"data_path:{data_path}")
    print(f"tokenizer_path:{tokenizer_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
