"""python3 tools/build_dataset.py --docs FILE.jsonl --vocab-size N [--caseops] --val-docs K --out DIR

Builds a dataset in the challenge's format from documents, for any SentencePiece vocabulary size,
optionally with CaseOps (the tokenizer track, FRONTIER.md "Tokenizer track: data and bytes"), and
prints `data_path:DIR` and `tokenizer_path:FILE` as its last lines, ready for
`DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=N python3 train_gpt.py`.

Input (--docs, one or more files): `*.jsonl` holds one JSON object per line with a `text` field (the
challenge's docs_selected.jsonl); any other file is UTF-8 plain text whose documents are separated
by blank lines. Order is kept: the first K documents are validation (K = --val-docs, default 50,000
like the challenge), the rest training.

Text: every document is first normalized with the tokenizer's own rule (nmt_nfkc, extra whitespace
and newlines collapsed to one space: what the challenge's tokenizers do to the text anyway, and what
decoding the tokens gives back). That normalized text is the document from then on: it is hashed,
its UTF-8 length is the byte count in the manifest and in the sidecar, and decoding its tokens (then
caseops_decode with --caseops) gives it back exactly, which the builder checks for every validation
document. Documents that normalize to nothing are dropped and counted.

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
  length, one uint16 per validation token: the token's UTF-8 bytes in the document (BOS and
  operators 0, an escaped literal operator 3), as in the public CaseOps export;
- manifest.json: documents, tokens and bytes per split, dropped documents, sha256 and size of every
  file, the settings, the inputs' sha256 and the builder's version.

Leaks: a training document whose normalized text has the sha256 of a validation document's is
dropped (and counted in the manifest as `train.dropped_duplicates_of_val`), so no validation text is
trained on, even when the input repeats it.
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
from pathlib import Path
from typing import Iterator

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt as tg  # noqa: E402  (the shard format and caseops_decode; importing it has no side effects)

BUILDER_VERSION = "1"
BOS_ID = 1
BATCH_DOCS = 512
PROGRESS_SECONDS = 10.0

# -----------------------------------------------------------------------------
# CaseOps, forward direction (the inverse, caseops_decode, is train_gpt.py's)

_CASEOPS_UNIT = re.compile("[A-Za-z]+|[\ue001-\ue004]")


def _caseops_rewrite(m: re.Match) -> str:
    unit = m.group()
    if unit in tg.CASEOPS_OPERATORS:
        return tg.CASEOPS_ESC + unit
    if unit.islower():
        return unit
    if len(unit) >= 2 and unit.isupper():
        return tg.CASEOPS_ALLCAPS + unit.lower()
    out = []
    for i, ch in enumerate(unit):
        if "A" <= ch <= "Z":
            out.append(tg.CASEOPS_TITLE if i == 0 else tg.CASEOPS_CAPNEXT)
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


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def token_byte_table(sp: spm.SentencePieceProcessor, caseops: bool) -> np.ndarray:
    """Per token id: its UTF-8 bytes in decoded text; control/unknown/unused pieces and the CaseOps
    operators 0 (an escaped literal operator is fixed up in token_bytes)."""
    table = np.zeros(sp.vocab_size(), dtype=np.int64)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            table[i] = 1
        elif not (caseops and piece in tg.CASEOPS_OPERATORS):
            table[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def token_bytes(ids: list[int], table: np.ndarray, esc_id: int | None) -> np.ndarray:
    """The sidecar's counts for one document's tokens: an operator is 0 bytes, except the one right
    after an (unescaped) ESC, which is that operator literally in the text (3 UTF-8 bytes)."""
    counts = table[ids]
    if esc_id is not None and esc_id in ids:
        i = 0
        while i < len(ids) - 1:
            if ids[i] == esc_id:
                counts[i + 1] = len(tg.CASEOPS_ESC.encode("utf-8"))  # every operator is 3 bytes
                i += 2
            else:
                i += 1
    return counts


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
    p.add_argument("--tokenizer", type=Path, help="reuse this SentencePiece model instead of training one")
    p.add_argument("--val-docs", type=int, default=50_000, help="the first K documents are validation (default 50,000, the challenge's)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not hold shards or a manifest)")
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


def normalized_documents(paths: list[Path], normalize: Normalizer, stats: dict) -> Iterator[str]:
    """The non-empty normalized documents, in order; counts the dropped empty ones."""
    for batch in batches(read_documents(paths), BATCH_DOCS):
        for doc in normalize(batch):
            if doc:
                yield doc
            else:
                stats["dropped_empty"] += 1


def split_documents(paths, normalize, val_docs: int, stats: dict, val_hashes: set | None = None
                    ) -> Iterator[tuple[str, str]]:
    """(split, document) in order: the first val_docs documents, then the training ones, without
    those whose text hash is a validation document's (when val_hashes is given, counted)."""
    for n, doc in enumerate(normalized_documents(paths, normalize, stats)):
        if n < val_docs:
            yield "val", doc
        elif val_hashes is not None and text_hash(doc) in val_hashes:
            stats["dropped_duplicates_of_val"] += 1
        else:
            yield "train", doc


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

    # validation first: its hashes decide which training documents are duplicates
    scratch = {"dropped_empty": 0, "dropped_duplicates_of_val": 0}
    val_hashes = set()
    for split, doc in split_documents(a.docs, normalize, a.val_docs, scratch):
        if split != "val":
            break
        val_hashes.add(text_hash(doc))

    name = f"tokenizer_sp{a.vocab_size}{'_caseops' if a.caseops else ''}"
    t_tok = time.time()
    if a.tokenizer is None:
        def training_texts() -> Iterator[str]:
            taken = 0
            for split, doc in split_documents(a.docs, normalize, a.val_docs, dict(scratch), val_hashes):
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
    table = token_byte_table(sp, a.caseops)
    esc_id = sp.piece_to_id(tg.CASEOPS_ESC) if a.caseops else None

    stats = {"dropped_empty": 0, "dropped_duplicates_of_val": 0}
    splits = {s: {"docs": 0, "tokens": 0, "bytes": 0} for s in ("val", "train")}
    writers = {"val": ShardWriter(out, "val", a.shard_tokens, a.caseops),
               "train": ShardWriter(out, "train", a.shard_tokens, False)}
    progress = Progress(total_docs, "encoding")
    t_enc, cpu_enc, done = time.time(), time.process_time(), 0
    for batch in batches(split_documents(a.docs, normalize, a.val_docs, stats, val_hashes), BATCH_DOCS):
        encoded = sp.encode([transform(doc) for _, doc in batch], num_threads=a.threads)
        for (split, doc), ids in zip(batch, encoded):
            ids = [BOS_ID] + ids
            counts = None
            if split == "val":
                check_val_document(sp, doc, ids, a.caseops, splits["val"]["docs"])
                counts = token_bytes(ids, table, esc_id) if a.caseops else None
                if counts is not None and int(counts.sum()) != len(doc.encode("utf-8")):
                    raise BuildError(f"validation document {splits['val']['docs']}: sidecar sum {int(counts.sum())} "
                                     f"!= {len(doc.encode('utf-8'))} UTF-8 bytes (a builder bug)")
            writers[split].add(np.asarray(ids, dtype=np.int64), counts)
            s = splits[split]
            s["docs"], s["tokens"], s["bytes"] = s["docs"] + 1, s["tokens"] + len(ids), s["bytes"] + len(doc.encode("utf-8"))
        done += len(batch)
        progress.update(done + stats["dropped_empty"] + stats["dropped_duplicates_of_val"])
    for w in writers.values():
        w.flush()
    encode_seconds, encode_cpu_seconds = time.time() - t_enc, time.process_time() - cpu_enc
    if splits["train"]["docs"] == 0:
        raise BuildError(f"--docs: every training document was empty or a duplicate of a validation document")
    docs_per_s = total_docs / max(encode_seconds, 1e-9)
    print(f"encoded {total_docs:,} documents in {encode_seconds:.1f} s ({encode_cpu_seconds:.1f} s of CPU): "
          f"{docs_per_s:,.0f} docs/s with {a.threads} thread(s); 10 M documents would take "
          f"~{1e7 / docs_per_s / 3600:.2f} h here (plus tokenizer training: {tokenizer_seconds:.1f} s on this input)",
          flush=True)
    for split, s in splits.items():
        print(f"{split}: {s['docs']:,} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes, "
              f"{s['tokens'] / max(s['bytes'], 1):.4f} tokens/byte (BOS included)", flush=True)
    print(f"dropped: {stats['dropped_empty']} empty documents, {stats['dropped_duplicates_of_val']} training "
          f"documents equal to a validation document", flush=True)

    files = writers["val"].files + writers["train"].files + [tokenizer.name]
    manifest = {
        "builder": "tools/build_dataset.py", "builder_version": BUILDER_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"vocab_size": a.vocab_size, "caseops": a.caseops,
                     "text_transform": "lossless_caps_caseops_v1" if a.caseops else "identity",
                     "val_docs": a.val_docs, "shard_tokens": a.shard_tokens,
                     "tokenizer_docs": a.tokenizer_docs, "reused_tokenizer": str(a.tokenizer) if a.tokenizer else None,
                     "normalization": "nmt_nfkc, extra whitespace removed (the tokenizer's own)",
                     "bos_id": BOS_ID, "eos": False},
        "inputs": [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in a.docs],
        "documents_in_input": total_docs,
        "splits": {"val": splits["val"],
                   "train": {**splits["train"], "dropped_duplicates_of_val": stats["dropped_duplicates_of_val"]}},
        "dropped_empty": stats["dropped_empty"],
        "val_sidecar": "fineweb_val_bytes_*.bin" if a.caseops else None,
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
