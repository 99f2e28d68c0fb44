# Byte counting for bits per byte, against decoded text: python3 -m pytest -q tests/test_bpb.py
"""The challenge's rule: the bytes behind the scored targets, summed, equal the UTF-8 length of the
decoded text. Past submissions were disqualified for a leading space counted twice and for byte-fallback
pieces counted as 3 bytes; both would break the equalities below."""
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import TEXT, cpu_runtime, decoded_utf8_bytes, documents, reference_loss_sum, tiny_hparams, tiny_model


def bytes_per_document(tokens: np.ndarray, tables) -> list[int]:
    """train_gpt's byte count per document: the targets from each BOS up to the next one."""
    per_target = tg.target_bytes(tokens[:-1], tokens[1:], tables)
    bos_targets = np.flatnonzero(tokens[1:] == tg.BOS_ID)  # target index of each BOS after the first
    return [int(part.sum()) for part in np.split(per_target, bos_targets)]


def assert_bytes_match_decoded_text(sp, tokens: np.ndarray) -> None:
    tables = tg.byte_tables(sp)
    counted = bytes_per_document(tokens, tables)
    decoded = [len(sp.decode(doc).encode("utf-8")) for doc in documents(tokens)]
    bad = [(i, c, d) for i, (c, d) in enumerate(zip(counted, decoded)) if c != d]
    assert len(counted) == len(decoded) and not bad, f"(document, counted, decoded) mismatches: {bad[:5]}"
    assert int(tg.target_bytes(tokens[:-1], tokens[1:], tables).sum()) == decoded_utf8_bytes(sp, tokens)


def encode_documents(sp, texts: list[str]) -> np.ndarray:
    """Documents in the challenge's format: each starts with BOS, no EOS."""
    return np.array([t for text in texts for t in [tg.BOS_ID] + sp.encode(text)], dtype=np.int64)


def test_sample_validation_bytes_equal_the_decoded_text(sp, val_tokens, val_utf8_bytes):
    assert_bytes_match_decoded_text(sp, val_tokens)
    assert tg.load_validation(tiny_hparams(), sp, cpu_runtime()).num_bytes == val_utf8_bytes


def test_bytes_of_hard_text_equal_the_decoded_text(sp):
    paragraphs = [p for p in TEXT.joinpath("devil.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    texts = paragraphs[:40] + [
        "“Quoted,” he said — it’s café, naïve, Ærøskøbing™, ½ of 1906.",
        "日本語のテキスト and 中文 mixed with ASCII 🙂 and Ωmega.",
        "   indented line\n\twith a tab, then     many     spaces and 0123456789.",
    ]
    tokens = encode_documents(sp, texts)
    pieces = [sp.id_to_piece(int(t)) for t in tokens]
    is_byte = np.array([sp.is_byte(int(t)) for t in tokens])
    assert is_byte.sum() >= 10, "the CJK text should need byte-fallback tokens"
    assert any(p.startswith("\u2581") for p in pieces), "no piece with a leading space marker"
    assert any(p.isdigit() for p in pieces), "no digit pieces"
    assert any(not b and len(p.removeprefix("\u2581").encode()) > len(p.removeprefix("\u2581"))
               for p, b in zip(pieces, is_byte)), "no multi-byte character inside a normal piece"
    assert_bytes_match_decoded_text(sp, tokens)


@pytest.mark.parametrize("text, expected", [
    ("a b", 3),            # "▁b" after "a": the space counts once
    ("a  b c", 5),         # the normalizer folds the double space, and the bytes follow the decoded text
    ("🙂", 4),             # four byte-fallback tokens, one byte each
    ("é", 2),
    ("ab 12", 5),
])
def test_small_cases(sp, text, expected):
    tokens = encode_documents(sp, [text, text])
    assert decoded_utf8_bytes(sp, tokens) == 2 * expected  # the reference itself, on known strings
    assert int(tg.target_bytes(tokens[:-1], tokens[1:], tg.byte_tables(sp)).sum()) == 2 * expected


def test_space_marker_right_after_bos_is_not_counted(sp):
    """The encoder never starts a document with a space piece (the normalizer strips leading
    whitespace), so natural text does not exercise this rule; the decoder drops that space too."""
    the, space, a = sp.piece_to_id("\u2581the"), sp.piece_to_id("\u2581"), sp.piece_to_id("a")
    tokens = np.array([tg.BOS_ID, the, the, tg.BOS_ID, space, a, tg.BOS_ID, space], dtype=np.int64)
    assert [sp.decode(doc) for doc in documents(tokens)] == ["the the", "a", ""]
    assert_bytes_match_decoded_text(sp, tokens)


def test_target_bytes_on_tensors_equals_numpy(sp, val_tokens):
    tables = tg.byte_tables(sp)
    expected = tg.target_bytes(val_tokens[:-1], val_tokens[1:], tables)
    t = torch.from_numpy(val_tokens)
    got = tg.target_bytes(t[:-1], t[1:], tuple(torch.from_numpy(a) for a in tables))
    assert np.array_equal(got.numpy(), expected)


def test_evaluate_bpb_is_loss_sum_over_ln2_over_bytes(val_utf8_bytes):
    h = tiny_hparams()
    val = tg.load_validation(h, tg.load_tokenizer(h), cpu_runtime())
    model = tiny_model(h)
    val_loss, val_bpb = tg.evaluate(model, val, 64, 64, 64 * 16, cpu_runtime())
    loss_sum, scored = reference_loss_sum(model, val.tokens, 64, 64)
    assert scored == val.num_targets
    assert val_loss == pytest.approx(loss_sum / scored, rel=1e-6)
    assert val_bpb == pytest.approx(loss_sum / math.log(2) / val_utf8_bytes, rel=1e-6)
