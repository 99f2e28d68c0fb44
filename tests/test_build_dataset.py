# The data builder and the CaseOps transform: python3 -m pytest -q tests/test_build_dataset.py
import sys

import pytest

import train_gpt as tg
from conftest import HANG_FACTOR, REPO, TEXT

sys.path.insert(0, str(REPO / "tools"))
import build_dataset as bd  # noqa: E402

TITLE, ALLCAPS, CAPNEXT, ESC = tg.CASEOPS_OPERATORS

# ----------------------------------------------------------------------------- the CaseOps transform

ADVERSARIAL = [
    "", "A", "I", "a", "NASA", "iPhone", "McDonald", "x2Y", "Éclair", "ÉCLAIR", "ß", "STRASSE ß",
    "The NASA Launch", "HTTPServer", "aBcDeF", "ABCdef", "123", "A1B2", "O'Neil", "U.S.A.",
    TITLE, ALLCAPS + "nasa", ESC, ESC + ESC, CAPNEXT + "x", "A" + TITLE + "b", "AB" + ESC + "cd",
    "x" * 5000, "Y" * 5000, "Ab" * 2000, ("Zz" + ESC) * 1000, "\n\n  Mixed\tCASE  text\n",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_caseops_round_trip(text):
    encoded = bd.caseops_encode(text)
    assert tg.caseops_decode(encoded) == text
    # no capital ASCII letter survives the rewrite, and every operator in the input is escaped
    assert not any("A" <= ch <= "Z" for ch in encoded)


def test_caseops_round_trip_on_fixture_text():
    for name in ("jargon.txt", "devil.txt"):
        text = (TEXT / name).read_text(encoding="utf-8")
        encoded = bd.caseops_encode(text)
        assert encoded != text and tg.caseops_decode(encoded) == text


def test_caseops_exact_rewrites():
    # the rules of the public record (PR #1626), spelled out
    assert bd.caseops_encode("The NASA Launch") == f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"
    assert bd.caseops_encode("iPhone") == f"i{CAPNEXT}phone"
    assert bd.caseops_encode("McDonald") == f"{TITLE}mc{CAPNEXT}donald"
    assert bd.caseops_encode("A I") == f"{TITLE}a {TITLE}i"
    assert bd.caseops_encode("x2Y") == f"x2{TITLE}y"
    assert bd.caseops_encode("Éclair") == "Éclair"  # only ASCII letters are rewritten
    assert bd.caseops_encode(f"a{TITLE}b") == f"a{ESC}{TITLE}b"


@pytest.mark.parametrize("text", ["", "lower case text, digits 123 and ß é ü.", "x" * 3000])
def test_caseops_identity_on_lower_case(text):
    assert bd.caseops_encode(text) == text and tg.caseops_decode(text) == text


@pytest.mark.parametrize("bad", [TITLE, f"a{ALLCAPS}", f"{CAPNEXT}1", f"{ESC}x", ESC, f"{ALLCAPS} word"])
def test_caseops_decode_rejects_malformed(bad):
    with pytest.raises(ValueError, match="caseops_decode: operator U\\+E00"):
        tg.caseops_decode(bad)


# ----------------------------------------------------------------------------- the builder

import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import hashlib  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402

from conftest import TOKENIZER, cpu_runtime, documents, read_tokens  # noqa: E402

VAL_DOCS = 40
# validation documents that exercise the transform and the byte counts: capitals of every kind,
# non-ASCII letters (2- and 3-byte UTF-8), digits and literal operator characters
SPECIAL = [f"Éclair NASA iPhone McDonald x2Y I A ß {TITLE}literal{ESC} and {ESC}{ESC} twice, 3.14 €",
           "ALL CAPS HEADLINE: STRASSE über ÜBER 日本語 OK"]


def fixture_documents() -> list[str]:
    """Single-line documents (paragraphs of the fixture texts with whitespace collapsed, so that the
    tokenizer's normalization leaves them as they are and their UTF-8 length is the one to expect)."""
    docs = []
    for name in ("devil.txt", "jargon.txt"):
        for para in (TEXT / name).read_text(encoding="utf-8").split("\n\n"):
            words = para.split()
            if len(words) >= 8:
                docs.append(" ".join(words))
    return SPECIAL + docs[:1200]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def build(tmp_path, docs, *extra, out="out"):
    """Runs the builder as a user would; returns (exit status, stdout, stderr, output folder)."""
    docs_file = write_jsonl(tmp_path / "docs.jsonl", docs)
    out_dir = tmp_path / out
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "build_dataset.py"), "--docs", str(docs_file),
         "--val-docs", str(VAL_DOCS), "--out", str(out_dir), "--threads", "1", *extra],
        capture_output=True, text=True, timeout=HANG_FACTOR * 300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout, proc.stderr, out_dir


# planted leaks: validation documents repeated in the training part, once verbatim and once with
# whitespace that the normalization removes (same normalized text, so the same content hash); and two
# near duplicates (issue 24, item 3), which hash otherwise: one character changed, a line appended
PLANTED = 2
NEAR_PLANTED = 2
APPENDED_LINE = "\nThis line was added to a copy of the entry, with ten more words."


def near_duplicates(docs: list[str]) -> list[str]:
    """Of the first two validation documents of 60+ words: one with a letter changed, one with a line added."""
    first, second = [d for d in docs[:VAL_DOCS] if len(d.split()) >= 60][:2]
    middle = len(first) // 2 + first[len(first) // 2:].index("e")
    return [first[:middle] + "a" + first[middle + 1:], second + APPENDED_LINE]


@pytest.fixture(scope="module")
def caseops_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caseops")
    docs = fixture_documents()
    docs = docs + [docs[3], "  " + docs[7].replace(" ", "   ") + "\n\n"] + near_duplicates(docs)
    rc, out, err, folder = build(tmp, docs, "--vocab-size", "512", "--caseops", "--shard-tokens", "50000")
    assert rc == 0, err
    return docs, out, folder


def split_files(folder, pattern):
    return sorted(folder.glob(pattern))


def test_build_prints_paths_last(caseops_build):
    _, out, folder = caseops_build
    last = out.strip().splitlines()[-2:]
    assert last == [f"data_path:{folder.resolve()}", f"tokenizer_path:{folder.resolve() / 'tokenizer_sp512_caseops.model'}"]


def test_shards_read_back_with_train_gpt(caseops_build):
    docs, _, folder = caseops_build
    val = split_files(folder, "fineweb_val_[0-9]*.bin")
    train = split_files(folder, "fineweb_train_*.bin")
    assert len(val) == 1 and len(train) >= 2  # 50,000-token shards: the training split needs several
    for path in val + train:
        count = tg.read_shard_header(str(path))
        tokens = tg.load_shard(str(path), 512)
        assert len(tokens) == count
    val_tokens = np.concatenate([tg.load_shard(str(p), 512) for p in val])
    train_tokens = np.concatenate([tg.load_shard(str(p), 512) for p in train])
    assert val_tokens[0] == 1 and train_tokens[0] == 1 and 2 not in val_tokens  # BOS first, no EOS
    assert len(documents(val_tokens)) == VAL_DOCS
    assert len(documents(train_tokens)) == len(docs) - VAL_DOCS - PLANTED - NEAR_PLANTED
    assert all(tg.read_shard_header(str(p)) == 50_000 for p in train[:-1])


def val_documents_with_bytes(folder):
    tokens = np.concatenate([read_tokens(p) for p in split_files(folder, "fineweb_val_[0-9]*.bin")])
    sidecar = np.concatenate([read_tokens(p) for p in split_files(folder, "fineweb_val_bytes_*.bin")])
    assert len(sidecar) == len(tokens)
    starts = list(np.flatnonzero(tokens == 1)) + [len(tokens)]
    return [(tokens[a:b], sidecar[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def test_sidecar_counts_the_original_bytes_of_each_document(caseops_build):
    docs, _, folder = caseops_build
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer_sp512_caseops.model"))
    pairs = val_documents_with_bytes(folder)
    assert len(pairs) == VAL_DOCS
    for original, (tokens, counts) in zip(docs, pairs):
        assert counts[0] == 0  # BOS
        assert int(counts.sum()) == len(original.encode("utf-8"))
        assert tg.caseops_decode(sp.decode(tokens[1:].tolist())) == original
    # the operators are pieces of their own and count 0 bytes, except an escaped literal one
    ids = [sp.piece_to_id(op) for op in tg.CASEOPS_OPERATORS]
    tokens, counts = pairs[0]
    ops = np.isin(tokens, ids)
    assert ops.sum() > 10 and set(counts[ops].tolist()) == {0, 3}


# The bytes convention (issue 24, item 4). The public CaseOps export (records/track_10min_16mb/
# 2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/prepare_caseops_data.py) rewrites the raw
# document, tokenizes it, and counts for each token the original bytes of its piece's surface: the span of the
# raw text SentencePiece reports for it. Documents as they come: paragraphs, line breaks, indentation, runs of
# spaces, characters NFKC rewrites, byte fallback, literal operators, whitespace at both ends.
RAW_SPECIAL = ["  Leading and trailing whitespace, two  spaces,\ttabs and\n\nparagraphs. \n",
               "Ligatures \ufb01ne and \ufb02ow, a non\u00a0breaking space, \u00bd and \u2122, Windows\r\nlines.",
               f"Byte fallback \U0001f999 and \U0001d11e, \u65e5\u672c\u8a9e, {TITLE}literal{ESC} operators\n\n\n  end"]


def multiline_documents() -> list[str]:
    """Runs of three paragraphs of the fixture texts, as written (wrapped lines, indentation)."""
    paras = [p for name in ("devil.txt", "jargon.txt") for p in (TEXT / name).read_text(encoding="utf-8").split("\n\n")
             if len(p.split()) >= 8]
    return ["\n\n".join(paras[i:i + 3]) for i in range(0, 1200, 3)]


@pytest.fixture(scope="module")
def raw_caseops_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raw_caseops")
    docs = RAW_SPECIAL + multiline_documents()
    rc, out, err, folder = build(tmp, docs, "--vocab-size", "512", "--caseops")
    assert rc == 0, err
    return docs, folder, spm.SentencePieceProcessor(model_file=str(folder / "tokenizer_sp512_caseops.model"))


def test_the_caseops_sidecar_counts_the_input_bytes_behind_each_token(raw_caseops_build):
    docs, folder, sp = raw_caseops_build
    pairs = val_documents_with_bytes(folder)
    sums = [int(counts.sum()) for _, counts in pairs]
    assert sums == [len(doc.strip().encode("utf-8")) for doc in docs[:VAL_DOCS]]
    decoded = [len(tg.caseops_decode(sp.decode(tokens[1:].tolist())).encode("utf-8")) for tokens, _ in pairs]
    assert sum(sums) > sum(decoded) * 1.01  # on this text the two conventions differ: the test can tell them apart
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["val_bytes"].startswith("original: ") and manifest["splits"]["val"]["bytes"] == sum(sums)
    lines = []
    tg.check_manifest(dataclasses.replace(tg.Hyperparameters(), data_path=str(folder), vocab_size=512),
                      cpu_runtime(lines.append), [])
    assert lines[-1] == f"data_val_bytes: {bd.VAL_BYTES['original']}"
    # train_gpt.py takes the default build: the sidecar's total is the denominator, the decoded text's beside it
    h = dataclasses.replace(tg.Hyperparameters(), data_path=str(folder), vocab_size=512,
                            tokenizer_path=str(folder / "tokenizer_sp512_caseops.model"))
    lines = []
    val = tg.load_validation(h, sp, cpu_runtime(lines.append))
    source = next(line for line in lines if line.startswith("val_bytes_source:"))
    assert source.startswith(f"val_bytes_source:sidecar_original val_split_bytes:{sum(sums)} "
                             f"decoded_text_bytes:{sum(decoded)} "), source
    assert val.num_bytes == sum(sums)


def records_surface_counts(sp, raw: str) -> tuple[list[int], list[int]]:
    """(ids, per-token bytes) the public exporter's way: tokenize the rewritten raw document and count each
    piece's surface, an operator 0 bytes unless ESC makes it a literal (written here from its description)."""
    pieces = sp.encode_as_proto(bd.caseops_encode(raw)).pieces
    counts, escaped = [], False
    for piece in pieces:
        n = 0
        for ch in piece.surface:
            if ch in tg.CASEOPS_OPERATORS and not escaped:
                escaped = ch == ESC
                continue
            n, escaped = n + len(ch.encode("utf-8")), False
        counts.append(n)
    return [piece.id for piece in pieces], counts


def test_the_sidecar_is_the_public_exporters_count_token_by_token(raw_caseops_build):
    pytest.importorskip("google.protobuf", reason="SentencePiece reports piece surfaces only through protobuf")
    docs, folder, sp = raw_caseops_build
    differ = []
    for i, (doc, (tokens, counts)) in enumerate(zip(docs, val_documents_with_bytes(folder))):
        ids, expected = records_surface_counts(sp, doc)
        assert int(counts.sum()) == sum(expected)
        if tokens[1:].tolist() == ids:
            assert counts[1:].tolist() == expected
        else:
            differ.append(i)
    # The one document whose tokens differ: NFKC turns "\u2122" into "TM" after the export's CaseOps rewrite (so
    # its tokenizer spells two capitals in byte pieces) and before ours (an ALLCAPS operator and "tm").
    assert differ == [1]


def test_the_normalized_convention_is_an_option_that_train_gpt_accepts(tmp_path):
    """--val-bytes normalized: what the tokens decode to. train_gpt.py proves such a sidecar against the
    decoded text, document by document, and takes this build of multi-line documents."""
    docs = multiline_documents()[:120]
    rc, _, err, folder = build(tmp_path, docs, "--vocab-size", "512", "--caseops", "--val-bytes", "normalized")
    assert rc == 0, err
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer_sp512_caseops.model"))
    assert [int(c.sum()) for _, c in val_documents_with_bytes(folder)] == \
        [len(" ".join(d.split()).encode("utf-8")) for d in docs[:VAL_DOCS]]
    h = dataclasses.replace(tg.Hyperparameters(), data_path=str(folder), vocab_size=512,
                            tokenizer_path=str(folder / "tokenizer_sp512_caseops.model"))
    lines = []
    tg.load_validation(h, sp, cpu_runtime(lines.append))
    assert f"data_val_bytes: {bd.VAL_BYTES['normalized']}" in lines


def test_the_near_duplicate_bench_runs_on_the_sample(tmp_path):
    """bench/near_duplicates.py (the figure in logs/data/near_duplicates_proxy.txt) on the bundled sample,
    with a validation document planted in training with one token changed."""
    from conftest import SAMPLE, write_shard
    val = read_tokens(SAMPLE / "fineweb_val_000000.bin")
    starts = list(tg.document_starts(val)) + [len(val)]
    doc = next(val[s:e].copy() for s, e in zip(starts, starts[1:]) if e - s > 300)
    doc[len(doc) // 2] = doc[len(doc) // 2 + 1]
    write_shard(tmp_path / "fineweb_val_000000.bin", val)
    write_shard(tmp_path / "fineweb_train_000000.bin", np.concatenate((read_tokens(SAMPLE / "fineweb_train_000000.bin"), doc)))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "near_duplicates.py"), "--data", str(tmp_path),
                           "--tokenizer", str(TOKENIZER)], capture_output=True, text=True, timeout=HANG_FACTOR * 120)
    assert proc.returncode == 0, proc.stderr
    assert "nearly equal to one, not equal (word 5-gram Jaccard >= 0.7): 1, repeating 1 distinct" in proc.stdout


def test_caseops_sidecar_has_the_shard_header(caseops_build):
    _, _, folder = caseops_build
    for path in split_files(folder, "fineweb_val_bytes_*.bin"):
        twin = folder / path.name.replace("val_bytes_", "val_")
        assert tg.read_shard_header(str(path)) == tg.read_shard_header(str(twin))


def normalized_hash(text):
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def test_no_validation_document_in_training(caseops_build):
    docs, out, folder = caseops_build
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer_sp512_caseops.model"))
    train = np.concatenate([read_tokens(p) for p in split_files(folder, "fineweb_train_*.bin")])
    train_hashes = {normalized_hash(tg.caseops_decode(sp.decode(d))) for d in documents(train)}
    val_hashes = {normalized_hash(d) for d in docs[:VAL_DOCS]}
    assert not train_hashes & val_hashes
    assert f"{PLANTED} training documents equal to a validation document, {NEAR_PLANTED} nearly equal to one" in out
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["splits"]["train"]["dropped_duplicates_of_val"] == PLANTED
    assert manifest["splits"]["train"]["dropped_near_duplicates_of_val"] == NEAR_PLANTED
    near = {normalized_hash(d) for d in near_duplicates(docs)}
    assert len(near) == NEAR_PLANTED and not train_hashes & near  # the near duplicates are not trained on


def test_near_duplicates_are_found_and_other_documents_are_not():
    """The index on its own: the kinds of near duplicate a copy-paste makes, and documents that share
    words or a passage but are not copies."""
    docs = fixture_documents()[2:VAL_DOCS]
    index = bd.ValidationIndex()
    for doc in docs:
        index.add(doc)
    long_doc = max(docs, key=len)
    words = long_doc.split()
    for copy in [*near_duplicates(fixture_documents()), long_doc.upper(), " ".join(words[:-3]),
                 long_doc.replace(words[len(words) // 2], "changed", 1)]:
        assert index.match(copy) == "dropped_near_duplicates_of_val", copy[:60]
    assert index.match(long_doc) == "dropped_duplicates_of_val"
    half = " ".join(words[:len(words) // 2])  # half of a document: Jaccard ~0.5
    for other in [*fixture_documents()[VAL_DOCS:VAL_DOCS + 300], half, " ".join(reversed(words))]:
        assert index.match(other) is None, other[:60]


def test_manifest(caseops_build):
    docs, _, folder = caseops_build
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = {p.name for p in folder.glob("*.bin")}
    assert set(manifest["files"]) == shards | {"tokenizer_sp512_caseops.model"}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for split, pattern in (("val", "fineweb_val_[0-9]*.bin"), ("train", "fineweb_train_*.bin")):
        tokens = sum(tg.read_shard_header(str(p)) for p in split_files(folder, pattern))
        assert manifest["splits"][split]["tokens"] == tokens
    assert manifest["splits"]["val"]["docs"] == VAL_DOCS
    assert manifest["splits"]["val"]["bytes"] == sum(len(d.encode("utf-8")) for d in docs[:VAL_DOCS])
    assert manifest["splits"]["train"]["docs"] == len(docs) - VAL_DOCS - PLANTED - NEAR_PLANTED
    s = manifest["settings"]
    assert (s["vocab_size"], s["caseops"], s["val_docs"], s["text_transform"]) == (512, True, VAL_DOCS, "lossless_caps_caseops_v1")
    assert manifest["builder_version"] == bd.BUILDER_VERSION and manifest["val_sidecar"] == "fineweb_val_bytes_*.bin"


def test_refuses_to_overwrite(caseops_build, tmp_path):
    _, _, folder = caseops_build
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    docs_file = write_jsonl(tmp_path / "d.jsonl", fixture_documents()[:60])
    rc = bd.main(["--docs", str(docs_file), "--vocab-size", "512", "--val-docs", "10", "--out", str(folder)])
    assert rc == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_refusal_message_names_the_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fineweb_train_000000.bin").write_bytes(b"")
    docs_file = write_jsonl(tmp_path / "d.jsonl", ["a b c"] * 3)
    assert bd.main(["--docs", str(docs_file), "--vocab-size", "300", "--val-docs", "1", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and str(tmp_path / "out") in err and "refusing" in err and "\n" not in err


# An interrupted build (issue 24, item 1): the builder killed once the first validation shard is written,
# as kill -9, an out-of-memory kill or a lost machine would stop it.
KILLED_BUILD = """
import os, signal, sys
sys.path.insert(0, {tools!r})
import build_dataset as bd
flush = bd.ShardWriter.flush
def flush_then_die(self):
    flush(self)
    if self.split == "val" and self.files:
        os.kill(os.getpid(), signal.SIGKILL)
bd.ShardWriter.flush = flush_then_die
sys.exit(bd.main(sys.argv[1:]))
"""


def test_an_interrupted_build_leaves_no_dataset_and_its_folder_is_refused(tmp_path, run_script):
    from conftest import assert_one_line_error
    docs_file = write_jsonl(tmp_path / "docs.jsonl", fixture_documents()[:300])
    out = tmp_path / "data"
    args = ["--docs", str(docs_file), "--vocab-size", "1024", "--tokenizer", str(TOKENIZER), "--val-docs",
            str(VAL_DOCS), "--shard-tokens", "1000", "--out", str(out), "--threads", "1"]
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD.format(tools=str(REPO / "tools")), *args],
                            capture_output=True, text=True, timeout=HANG_FACTOR * 120)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()  # the folder the user named appears only complete
    [partial] = tmp_path.glob(".data.partial-*")
    assert (partial / tg.BUILD_MARKER).is_file() and (partial / "fineweb_val_000000.bin").is_file()
    assert not (partial / "fineweb_val_000001.bin").exists() and not (partial / "manifest.json").exists()
    # pointed at the unfinished folder (part of the validation split), train_gpt.py refuses it in one line
    run = run_script({"DATA_PATH": str(partial), "TOKENIZER_PATH": str(TOKENIZER)})
    assert_one_line_error(run, f"DATA_PATH={partial}: an unfinished build")
    # the next build of the same folder completes, and says what the leftover folder is
    rebuilt = subprocess.run([sys.executable, str(REPO / "tools" / "build_dataset.py"), *args],
                             capture_output=True, text=True, timeout=HANG_FACTOR * 120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"note: {partial} is the unfinished folder of an interrupted build" in rebuilt.stdout
    assert (out / "manifest.json").is_file() and (out / tg.BUILD_MARKER).is_file()
    assert list(tmp_path.glob(".data.partial-*")) == [partial]  # only the killed build's is left


def test_a_build_that_fails_leaves_nothing(tmp_path):
    docs_file = write_jsonl(tmp_path / "d.jsonl", fixture_documents()[:100])
    assert bd.main(["--docs", str(docs_file), "--vocab-size", "1024", "--caseops", "--tokenizer", str(TOKENIZER),
                    "--val-docs", "10", "--out", str(tmp_path / "o")]) == 1  # a plain tokenizer for CaseOps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_plain_build_with_a_reused_tokenizer(tmp_path):
    """--tokenizer: the bundled sp1024 model, plain text: no sidecar, and the validation split's bytes
    under train_gpt's own byte rule equal the documents' UTF-8 length."""
    docs = fixture_documents()[:300]
    rc, out, err, folder = build(tmp_path, docs, "--vocab-size", "1024", "--tokenizer", str(TOKENIZER))
    assert rc == 0, err
    assert not list(folder.glob("fineweb_val_bytes_*")) and (folder / "tokenizer_sp1024.model").read_bytes() == TOKENIZER.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    tokens = tg.load_shard(str(folder / "fineweb_val_000000.bin"), 1024)
    tables = tg.byte_tables(sp)
    assert int(tg.target_bytes(tokens[:-1], tokens[1:], tables).sum()) == sum(len(d.encode()) for d in docs[:VAL_DOCS])


def test_caseops_with_a_plain_tokenizer_is_refused(tmp_path):
    rc, _, err, _ = build(tmp_path, fixture_documents()[:100], "--vocab-size", "1024", "--caseops", "--tokenizer", str(TOKENIZER))
    assert rc == 1 and err.startswith("error: ") and "CaseOps operator" in err and str(TOKENIZER) in err


@pytest.mark.parametrize("case", ["missing", "no_text", "too_few", "vocab"])
def test_bad_input_is_one_error_line(tmp_path, case):
    docs_file = write_jsonl(tmp_path / "d.jsonl", ["one doc", "two doc", "three"])
    args = {"missing": ["--docs", str(tmp_path / "nope.jsonl"), "--vocab-size", "300"],
            "no_text": ["--docs", str(docs_file), "--vocab-size", "300"],
            "too_few": ["--docs", str(docs_file), "--vocab-size", "300", "--val-docs", "3"],
            "vocab": ["--docs", str(docs_file), "--vocab-size", "70000"]}[case]
    if case == "no_text":
        docs_file.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "build_dataset.py"), *args, "--val-docs", "1",
                           "--out", str(tmp_path / "o")] if case != "too_few" else
                          [sys.executable, str(REPO / "tools" / "build_dataset.py"), *args, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=HANG_FACTOR * 60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ")
    assert {"missing": "nope.jsonl", "no_text": "d.jsonl:2", "too_few": "--val-docs 3", "vocab": "--vocab-size 70000"}[case] in lines[0]


def test_a_jsonl_line_that_is_not_utf8_names_the_file_line_and_byte_offset(tmp_path):
    """Issue 24, item 10: one byte of Latin-1 in a JSON line (docs exported by another tool)."""
    good = '{"text": "one document"}\n'.encode()
    docs_file = tmp_path / "d.jsonl"
    docs_file.write_bytes(good + b'{"text": "caf\xe9"}\n' + good)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "build_dataset.py"), "--docs", str(docs_file),
                           "--vocab-size", "300", "--val-docs", "1", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=HANG_FACTOR * 60)
    offset = len(good) + len(b'{"text": "caf')
    assert proc.returncode == 1 and proc.stderr == f"error: {docs_file}:2: not UTF-8 (byte 0xe9 at byte offset {offset} of the file)\n"


def test_plain_text_input_splits_on_blank_lines(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("First doc\nstill first.\n\n \nSecond doc.\n\n\nThird.\n", encoding="utf-8")
    assert list(bd.read_documents([text])) == ["First doc\nstill first.", "Second doc.", "Third.\n"]
    assert bd.count_documents([text]) == 3


def test_caseops_dataset_trains_and_scores_against_the_original_bytes(caseops_build, run_script):
    """End to end: train_gpt.py on the CaseOps build; its bpb denominator is the validation
    documents' UTF-8 length, counted here without the builder or the sidecar."""
    docs, _, folder = caseops_build
    run = run_script({"PRESET": "smoke", "DATA_PATH": str(folder), "VOCAB_SIZE": "512", "ITERATIONS": "4",
                      "TOKENIZER_PATH": str(folder / "tokenizer_sp512_caseops.model"), "EVAL_STRIDE": "0"})
    assert run.returncode == 0, run.explain()
    expected = sum(len(d.encode("utf-8")) for d in docs[:VAL_DOCS])
    assert f"val_bytes:{expected} " in run.body


def test_train_gpt_logs_the_manifest_and_refuses_a_validation_file_changed_since_the_build(caseops_build, tmp_path):
    _, _, folder = caseops_build
    h = dataclasses.replace(tg.Hyperparameters(), data_path=str(folder), vocab_size=512,
                            tokenizer_path=str(folder / "tokenizer_sp512_caseops.model"))
    sp = tg.load_tokenizer(h)
    lines = []
    tg.load_validation(h, sp, cpu_runtime(lines.append))
    [line] = [line for line in lines if line.startswith("data_manifest:")]
    assert "builder:tools/build_dataset.py" in line and "vocab_size:512 caseops:True" in line
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    shard = changed / "fineweb_val_000000.bin"
    data = bytearray(shard.read_bytes())
    data[-2:] = data[-4:-2]  # one token, header untouched
    shard.write_bytes(bytes(data))
    with pytest.raises(tg.RunError, match=r"manifest\.json: fineweb_val_000000\.bin is not the file the manifest lists"):
        tg.load_validation(dataclasses.replace(h, data_path=str(changed)), sp, cpu_runtime())


def test_an_unfinished_build_is_named_before_its_missing_shards(tmp_path):
    """The builder's marker without its manifest is an unfinished build, whatever the folder lacks: the
    message says so even where no validation shard was written yet (it used to say only 'no shards')."""
    folder = tmp_path / "built"
    folder.mkdir()
    (folder / tg.BUILD_MARKER).write_text("tools/build_dataset.py\n")
    h = tg.dataclasses.replace(tg.Hyperparameters(), data_path=str(folder))
    for split in ("val", "train"):
        with pytest.raises(tg.RunError, match=rf"DATA_PATH={folder}: an unfinished build"):
            tg.find_shards(h, split)
