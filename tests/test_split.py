# The validation split proved before training: python3 -m pytest -q tests/test_split.py
"""Which split is scored, whether its bytes are the text's, whether the tokenizer is the shards', whether
there is anything to score, and whether validation text sits in the training data. Each kind of fault
is built from the bundled fixtures and must stop the run with one line (or, for a leak, warn)."""
import io
import json

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt as tg
from conftest import SAMPLE, TEXT, TOKENIZER, assert_one_line_error, cpu_runtime, read_tokens, tiny_hparams, write_shard


def sample_copy(folder, val=None, train=None):
    """A DATA_PATH like the bundled sample, with the validation and/or training tokens replaced."""
    folder.mkdir(exist_ok=True)
    write_shard(folder / "fineweb_val_000000.bin", read_tokens(SAMPLE / "fineweb_val_000000.bin") if val is None else val)
    for i in range(2):
        own = read_tokens(SAMPLE / f"fineweb_train_{i:06d}.bin")
        write_shard(folder / f"fineweb_train_{i:06d}.bin", own if train is None else train[i])
    return folder


def load(folder, sp=None, **overrides):
    lines = []
    h = tiny_hparams(data_path=str(folder), **overrides)
    val = tg.load_validation(h, sp or tg.load_tokenizer(h), cpu_runtime(lines.append))
    return val, lines


def field(lines, key):
    line = next(line for line in lines if key + ":" in line)
    return line.split(key + ":")[1].split()[0]


# ----------------------------------------------------------------------------- 1: which split


def test_a_fifth_of_the_documents_is_a_custom_split_with_its_own_count_and_hash(tmp_path):
    tokens = read_tokens(SAMPLE / "fineweb_val_000000.bin")
    starts = tg.document_starts(tokens)
    fifth = tokens[:starts[len(starts) // 5]]  # the first 20% of the documents, header rewritten to match
    whole_val, whole = load(sample_copy(tmp_path / "whole"))
    part_val, part = load(sample_copy(tmp_path / "part", val=fifth))
    assert field(part, "val_split") == field(whole, "val_split") == "custom"
    assert int(field(part, "val_split_docs")) == len(starts) // 5
    assert int(field(part, "val_split_targets")) == len(fifth) - 1 == part_val.split_targets
    assert field(part, "val_split_sha256") != field(whole, "val_split_sha256")


def test_official_splits_are_recognised_by_vocabulary_sidecar_documents_and_count():
    assert tg.split_name(1024, False, 50_000, 62_021_632) == "fineweb_sp1024"
    assert tg.split_name(1024, False, 50_000, 62_021_632 + 900) == "fineweb_sp1024"  # logs cut to whole windows
    assert tg.split_name(8192, False, 50_000, 40_540_160) == "fineweb_sp8192"
    assert tg.split_name(8192, True, 50_000, 47_851_520) == "fineweb_sp8192_caseops"
    assert tg.split_name(1024, False, 10_000, 62_021_632) == "custom"  # a fifth of the documents
    assert tg.split_name(1024, False, 50_000, 12_404_326) == "custom"
    assert tg.split_name(8192, False, 50_000, 47_851_520) == "custom"  # CaseOps tokens without the sidecar
    assert tg.split_name(8192, True, 50_000, 40_540_160) == "custom"


# ----------------------------------------------------------------------------- 2: the bytes are the text's


@pytest.fixture(scope="module")
def indenting_sp() -> spm.SentencePieceProcessor:
    """A BPE that keeps indentation (pieces of several space markers), as people train to keep code."""
    lines = [line for line in TEXT.joinpath("jargon.txt").read_text(encoding="utf-8")[:200_000].splitlines()
             if line.strip()] + ["    indented code", "        deeper   indent", "a    b    c"] * 100
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=1024, model_type="bpe", byte_fallback=True,
        split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def encode_documents(sp, texts):
    return np.array([t for text in texts for t in [tg.BOS_ID] + sp.encode(text)], dtype=np.int64)


def test_pieces_of_several_space_markers_count_one_byte_per_space(indenting_sp):
    texts = ["    def f(x):\n        return x", "  two leading", "a    b    c", "    indented code here",
             " one leading space", "end with spaces   "]
    tokens = encode_documents(indenting_sp, texts)
    pieces = [indenting_sp.id_to_piece(int(t)) for t in tokens]
    assert any(p.count("\u2581") >= 4 for p in pieces), "the text should use a piece of four markers"
    assert not tg.strips_leading_space(indenting_sp)
    per_token = np.concatenate(([0], tg.target_bytes(tokens[:-1], tokens[1:], tg.byte_tables(indenting_sp))))
    starts = tg.document_starts(tokens)
    ends = np.append(starts[1:], len(tokens))
    counted = [int(per_token[s + 1:e].sum()) for s, e in zip(starts, ends)]
    assert counted == [len(t.encode("utf-8")) for t in texts]  # decoding keeps every space here


def test_a_custom_tokenizer_that_keeps_spaces_is_scored_right_end_to_end(tmp_path, indenting_sp):
    texts = [p for p in TEXT.joinpath("devil.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()][:120]
    texts = ["    " + t.replace("\n", "\n    ") for t in texts]  # indented: runs of spaces everywhere
    tokens = encode_documents(indenting_sp, texts)
    folder = sample_copy(tmp_path / "d", val=tokens, train=[tokens[:1000] % 1000 + 4, tokens[:10] % 1000 + 4])
    model_file = tmp_path / "indent.model"
    model_file.write_bytes(indenting_sp.serialized_model_proto())
    val, lines = load(folder, tokenizer_path=str(model_file))
    assert val.num_bytes == sum(len(t.encode("utf-8")) for t in texts)
    assert field(lines, "val_bytes_source") == "rule"


def test_a_tokenizer_of_the_right_size_but_not_the_shards_is_refused(tmp_path, indenting_sp):
    other = tmp_path / "other.model"
    other.write_bytes(indenting_sp.serialized_model_proto())  # 1024 pieces too, trained on other text
    with pytest.raises(tg.RunError, match=r"TOKENIZER_PATH=.*other\.model: validation document 0 .*re-encode"):
        load(sample_copy(tmp_path / "d"), tokenizer_path=str(other))


def sidecar_folder(tmp_path, counts):
    folder = sample_copy(tmp_path / "d")
    write_shard(folder / "fineweb_val_bytes_000000.bin", counts)
    return folder


def test_a_sidecar_that_matches_the_text_gives_the_denominator(tmp_path, sp):
    tokens = read_tokens(SAMPLE / "fineweb_val_000000.bin")
    rule = np.concatenate(([0], tg.target_bytes(tokens[:-1], tokens[1:], tg.byte_tables(sp))))
    val, lines = load(sidecar_folder(tmp_path, rule))
    assert field(lines, "val_bytes_source") == "sidecar_original"  # no manifest: the public export's convention
    assert field(lines, "documents_counted_otherwise") == "0"
    assert val.num_bytes == int(rule.sum())
    assert len(tg.shard_files(str(tmp_path / "d"), "val")) == 1  # the sidecar is not a validation shard


def test_a_sidecar_of_the_original_text_is_the_denominator_and_the_log_says_what_differs(tmp_path, sp):
    """Without a manifest saying it counts the decoded text, a sidecar counts the original (the public
    CaseOps export's convention): it divides, and the log gives the decoded text's bytes and how many
    documents the two disagree on."""
    tokens = read_tokens(SAMPLE / "fineweb_val_000000.bin")
    counts = np.concatenate(([0], tg.target_bytes(tokens[:-1], tokens[1:], tg.byte_tables(sp))))
    counts[tg.document_starts(tokens)[7] + 3] += 2  # two spaces where the tokenizer kept one
    val, lines = load(sidecar_folder(tmp_path, counts))
    assert val.num_bytes == int(counts.sum())
    assert field(lines, "val_bytes_source") == "sidecar_original"
    assert field(lines, "decoded_text_bytes") == str(int(counts.sum()) - 2)
    assert field(lines, "documents_counted_otherwise") == "1"


@pytest.mark.parametrize("damage", ["one_count_off", "too_short", "bos_counted"])
def test_a_sidecar_that_disagrees_with_the_text_is_refused(tmp_path, sp, damage):
    tokens = read_tokens(SAMPLE / "fineweb_val_000000.bin")
    counts = np.concatenate(([0], tg.target_bytes(tokens[:-1], tokens[1:], tg.byte_tables(sp))))
    starts = tg.document_starts(tokens)
    if damage == "one_count_off":  # a sidecar its manifest says counts the decoded text
        counts[starts[7] + 3] += 1
        folder = sidecar_folder(tmp_path, counts)
        listed = {f.name: {"bytes": f.stat().st_size, "sha256": tg.file_sha256(str(f))}
                  for f in folder.glob("fineweb_val_*.bin")}
        (folder / "manifest.json").write_text(json.dumps({"settings": {"vocab_size": 1024}, "files": listed,
                                                          "val_bytes": "normalized: the decoded text"}))
        with pytest.raises(tg.RunError, match=r"fineweb_val_bytes_.*validation document 7 .*by the sidecar"):
            load(folder)
        return
    elif damage == "too_short":
        counts = counts[:-5]
        match = r"fineweb_val_bytes_.*counts for .* validation tokens"
    else:
        counts[starts[3]] = 2
        match = r"sidecar gives a BOS nonzero bytes"
    with pytest.raises(tg.RunError, match=match):
        load(sidecar_folder(tmp_path, counts))


def test_a_caseops_tokenizer_without_a_sidecar_is_refused(tmp_path):
    lines = [line for line in TEXT.joinpath("devil.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe", byte_fallback=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        user_defined_symbols=list(tg.CASEOPS_OPERATORS), minloglevel=2)
    caseops_sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    folder = sample_copy(tmp_path / "d", val=encode_documents(caseops_sp, lines[:200]))
    with pytest.raises(tg.RunError, match=r"CaseOps operators.*no byte sidecar"):
        load(folder, sp=caseops_sp, vocab_size=600)


# ----------------------------------------------------------------------------- 3: nothing to score


@pytest.mark.parametrize("tokens, match", [
    ([0] * 300, "does not start with BOS"),  # all pad ids
    ([tg.BOS_ID] * 300, "nothing to score"),  # documents that are only a BOS
])
def test_a_split_with_nothing_to_score_is_refused_before_training(tmp_path, tokens, match):
    with pytest.raises(tg.RunError, match=rf"DATA_PATH=.*{match}"):
        load(sample_copy(tmp_path / "d", val=tokens))


def test_an_empty_split_stops_the_run_with_one_line_before_training(tmp_path, run_script):
    folder = sample_copy(tmp_path / "d", val=[tg.BOS_ID] * 300)
    run = run_script(dict(PRESET="smoke", DATA_PATH=str(folder), TOKENIZER_PATH=str(TOKENIZER)))
    assert_one_line_error(run, "DATA_PATH=", "nothing to score")
    assert "step:" not in run.body and "model_params" not in run.body  # refused before the model was built


# ----------------------------------------------------------------------------- 4: validation text in training


def leak_lines(folder):
    val, _ = load(folder)
    h = tiny_hparams(data_path=str(folder))
    lines = []
    tg.check_leak(h, cpu_runtime(lines.append), tg.find_shards(h, "train"), val)
    return lines


def test_clean_data_has_no_leak():
    lines = leak_lines(SAMPLE)
    assert field(lines, "hits") == "0" and field(lines, "identical_shards") == "0"
    assert not any(line.startswith("WARNING") for line in lines)


def test_a_training_shard_identical_to_the_validation_shard_is_reported(tmp_path):
    val = read_tokens(SAMPLE / "fineweb_val_000000.bin")
    lines = leak_lines(sample_copy(tmp_path / "d", train=[read_tokens(SAMPLE / "fineweb_train_000000.bin"), val]))
    assert field(lines, "identical_shards") == "1"
    assert any(line.startswith("WARNING: validation leak") for line in lines)


@pytest.mark.parametrize("shard", [0, 1])
def test_validation_documents_inside_a_training_shard_are_found(tmp_path, shard):
    val = read_tokens(SAMPLE / "fineweb_val_000000.bin")
    starts = tg.document_starts(val)
    leaked = val[starts[10]:starts[14]]  # four validation documents, placed between training documents
    train = [read_tokens(SAMPLE / f"fineweb_train_{i:06d}.bin") for i in range(2)]
    cut = tg.document_starts(train[shard])[3]
    train[shard] = np.concatenate((train[shard][:cut], leaked, train[shard][cut:]))
    lines = leak_lines(sample_copy(tmp_path / "d", train=train))
    assert int(field(lines, "hits")) == sum(e - s >= tg.LEAK_MIN_TOKENS for s, e in zip(starts[10:14], starts[11:15]))
    assert int(field(lines, "hits")) >= 1
    assert any(line.startswith("WARNING: validation leak") for line in lines)


def test_the_leak_check_says_that_it_cannot_see_a_near_duplicate(tmp_path):
    """Issue 24, item 3: a validation document repeated in training with one token changed is no hit,
    and the log line says what the check sees (the data builder drops near duplicates)."""
    val = read_tokens(SAMPLE / "fineweb_val_000000.bin")
    starts = tg.document_starts(val)
    doc = next(val[s:e].copy() for s, e in zip(starts, starts[1:]) if e - s >= 4 * tg.LEAK_MIN_TOKENS)
    doc[len(doc) // 2] = doc[len(doc) // 2 + 1]  # one token of hundreds
    train = [read_tokens(SAMPLE / f"fineweb_train_{i:06d}.bin") for i in range(2)]
    train[0] = np.concatenate((doc, train[0]))
    [line] = [line for line in leak_lines(sample_copy(tmp_path / "d", train=train)) if line.startswith("leak_check:")]
    assert field([line], "hits") == "0"
    assert "sees exact repeats of documents only" in line and "near duplicate" in line and "builder" in line


def test_the_leak_check_runs_in_every_training_run_and_is_logged(run_script):
    run = run_script(dict(PRESET="smoke", ITERATIONS="2", VAL_TOKENS="4096"))
    assert run.returncode == 0, run.explain()
    assert "leak_check: " in run.body and "val_split:custom" in run.body and "val_bytes_source:rule" in run.body
