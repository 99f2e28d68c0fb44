# python3 -m pytest -q tests/test_export.py
"""PR #1204's export as knobs: int5/int6 per block matrix by Hessian trace (INT6_MATRICES), GPTQ
calibrated on text the model samples itself (GPTQ_SELFGEN_SEQS), brotli streams (COMPRESSOR=brotli)."""

from __future__ import annotations

import dataclasses
import random
import re

import numpy as np
import pytest
import torch

from conftest import tiny_hparams, tiny_model
import train_gpt as tg

CPU_RT = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)


def assert_one_line_error(error, word: str) -> None:
    assert word in str(error.value) and "\n" not in str(error.value), str(error.value)


def diagonal_hessians(traces: dict[str, float]) -> dict[str, torch.Tensor]:
    return {name: torch.eye(4) * trace / 4 for name, trace in traces.items()}


def test_int6_goes_to_the_repeated_blocks_first_then_to_the_largest_traces():
    names = ["blocks.0.mlp.fc.weight", "blocks.1.attn.c_q.weight", "blocks.1.mlp.proj.weight",
             "blocks.2.attn.proj.weight", "blocks.2.mlp.fc.weight", "repeat_mlps.0.fc.weight", "blocks.3.mlp.fc.weight"]
    traces = {"blocks.0.mlp.fc.weight": 50.0, "blocks.1.attn.c_q.weight": 1.0, "blocks.1.mlp.proj.weight": 2.0,
              "blocks.2.attn.proj.weight": 40.0, "blocks.2.mlp.fc.weight": 3.0, "repeat_mlps.0.fc.weight": 0.5}
    hessians = diagonal_hessians(traces)  # blocks.3.mlp.fc has none: trace 0
    plan = tg.int6_by_trace(names, hessians, repeated=(1,), count=5)
    # blocks.1.* and repeat_mlps.* (the repeated block) first, then blocks.0.mlp.fc (50), blocks.2.attn.proj (40)
    assert {n for n, c in plan.items() if c == "int6"} == {
        "blocks.1.attn.c_q.weight", "blocks.1.mlp.proj.weight", "repeat_mlps.0.fc.weight",
        "blocks.0.mlp.fc.weight", "blocks.2.attn.proj.weight"}
    assert {n for n, c in plan.items() if c == "int5"} == {"blocks.2.mlp.fc.weight", "blocks.3.mlp.fc.weight"}
    two = tg.int6_by_trace(names, hessians, repeated=(1,), count=2)  # fewer than the repeated block holds
    assert {n for n, c in two.items() if c == "int6"} == {"blocks.1.mlp.proj.weight", "blocks.1.attn.c_q.weight"}


def test_int6_matrices_changes_only_the_block_matrices_and_bigram_classes():
    h = tiny_hparams(gptq_calib_tokens=2048, quant_bits_embed=8, bigram_vocab_size=64, bigram_dim=16)
    state = tiny_model(h).state_dict()
    blocks = [n for n in state if re.fullmatch(tg.BLOCK_MATRICES, n)]
    hessians = diagonal_hessians({n: float(i) for i, n in enumerate(blocks)})
    by_name = tg.quant_plan(state, h, hessians)
    assert by_name == tg.quant_plan(state, h)  # off: the Hessians change nothing
    assert (by_name["bigram.proj.weight"], by_name["bigram.table.weight"]) == ("fp16", "int6")
    ranked = tg.quant_plan(state, dataclasses.replace(h, int6_matrices=3), hessians)
    assert sorted(n for n, c in ranked.items() if c == "int6" and n in blocks) == sorted(blocks[-3:])
    assert all(ranked[n] == "int5" for n in blocks[:-3])
    # PR #1204's export: the projection ranked with them (no Hessian, so last: int5), the table int8
    assert (ranked["bigram.proj.weight"], ranked["bigram.table.weight"]) == ("int5", "int8")
    bigram = {"bigram.proj.weight", "bigram.table.weight"}
    assert ({n: c for n, c in ranked.items() if n not in blocks and n not in bigram}
            == {n: c for n, c in by_name.items() if n not in blocks and n not in bigram})


def test_int6_matrices_needs_a_calibration():
    with pytest.raises(tg.RunError) as error:
        tiny_hparams(gptq_calib_tokens=0, int6_matrices=4)
    assert_one_line_error(error, "INT6_MATRICES")
    with pytest.raises(tg.RunError) as error:
        tiny_hparams(gptq_calib_tokens=2048, gptq_selfgen_seqs=8)
    assert_one_line_error(error, "GPTQ_SELFGEN_SEQS")


def test_sampled_calibration_is_seeded_starts_at_bos_and_follows_the_model():
    h = tiny_hparams()
    model = tiny_model(h)
    a = tg.sample_batch(model, 3, 12, seed=5, rt=CPU_RT)
    assert a.shape == (3, 12) and bool((a[:, 0] == tg.BOS_ID).all())
    assert int(a.min()) >= 0 and int(a.max()) < h.vocab_size
    assert torch.equal(a, tg.sample_batch(model, 3, 12, seed=5, rt=CPU_RT))
    assert not torch.equal(a, tg.sample_batch(model, 3, 12, seed=6, rt=CPU_RT))
    # A model that puts all its mass on one token samples only that token after BOS.
    with torch.no_grad():
        model.tok_emb.weight.zero_()
        model.tok_emb.weight[7] = 50.0
    assert bool((tg.sample_batch(model, 2, 6, seed=0, rt=CPU_RT)[:, 1:] == 7).all())


def test_selfgen_hessians_read_no_data_and_split_over_ranks_exactly():
    """No file is read (the data path does not exist); the ranks' shares sum to the one-rank result."""
    h = dataclasses.replace(tiny_hparams(gptq_calib_tokens=0, gptq_selfgen_seqs=10, train_seq_len=8,
                                         train_batch_tokens=128, eval_stride=8),
                            data_path="/nonexistent", tokenizer_path="/nonexistent")
    model = tiny_model(h)
    whole = tg.selfgen_hessians(model, h, CPU_RT)
    assert sorted(whole) == sorted(n for n, _ in model.named_parameters() if re.fullmatch(tg.BLOCK_MATRICES, n))
    tokens = torch.cat([tg.sample_batch(model, 8, 8, h.seed, CPU_RT), tg.sample_batch(model, 2, 8, h.seed + 1, CPU_RT)])
    direct = tg.input_hessians(model, [tokens], 80, CPU_RT)
    shares = [tg.selfgen_hessians(model, h, dataclasses.replace(CPU_RT, rank=r, world_size=2)) for r in (0, 1)]
    for name in whole:
        assert torch.allclose(whole[name], direct[name], atol=1e-5)
        assert torch.allclose(whole[name], shares[0][name] + shares[1][name], atol=1e-5)


@pytest.fixture(scope="module")
def quantized():
    h = tiny_hparams(quant_bits_embed=8)
    state = tiny_model(h).state_dict()
    return h, tg.quantize_state(state, tg.quant_recipes(state, h))


def test_brotli_artifact_loads_without_any_setting_to_the_same_model(quantized):
    h, q = quantized
    zstd, brotli = (tg.serialize_artifact(q, tg.model_config(h), c) for c in ("zstd", "brotli"))
    assert zstd.startswith(tg.ARTIFACT_MAGIC) and brotli.startswith(tg.BROTLI_MAGIC)
    (config_z, from_zstd), (config_b, from_brotli) = (tg.deserialize_artifact(b, "x") for b in (zstd, brotli))
    assert config_z == config_b
    for name, entry in from_zstd.items():
        for part, array in entry["arrays"].items():
            assert np.array_equal(array, from_brotli[name]["arrays"][part]), (name, part)


def test_a_missing_brotli_is_a_one_line_error_only_where_it_is_used(quantized, monkeypatch):
    h, q = quantized
    blob = tg.serialize_artifact(q, tg.model_config(h), "brotli")
    real = tg.importlib.import_module

    def without_brotli(name, *args):
        if name == "brotli":
            raise ImportError("No module named 'brotli'")
        return real(name, *args)

    monkeypatch.setattr(tg.importlib, "import_module", without_brotli)
    tg.deserialize_artifact(tg.serialize_artifact(q, tg.model_config(h)), "zstd")  # zstd needs no brotli
    for use in (lambda: tg.serialize_artifact(q, tg.model_config(h), "brotli"),
                lambda: tg.deserialize_artifact(blob, "b.ptz")):
        with pytest.raises(tg.RunError) as error:
            use()
        assert_one_line_error(error, "pip install brotli")


# COMPRESSOR=ans: the integer sections entropy-coded under per-column models (train_gpt.ans_encode).

def column_coded(rows: int, cols: int, seed: int) -> np.ndarray:
    """int6-like codes whose spread depends on the column (1 to 8), as in trained matrices."""
    rng = np.random.default_rng(seed)
    spread = np.linspace(1.0, 8.0, cols)[rng.permutation(cols)]
    return np.clip(np.rint(rng.standard_normal((rows, cols)) * spread), -31, 31).astype(np.int8)


@pytest.fixture(scope="module")
def column_quantized(quantized):
    """The tiny model's quantized state with two block matrices replaced by column_coded() codes."""
    h, q = quantized
    out = {name: dict(entry, arrays=dict(entry["arrays"])) for name, entry in q.items()}
    for i, name in enumerate(["blocks.0.mlp.fc.weight", "blocks.1.mlp.fc.weight"]):
        rows = out[name]["arrays"]["q"].shape[0]
        out[name] = dict(out[name], shape=[rows, 256], arrays=dict(q=column_coded(rows, 256, i), scale=out[name]["arrays"]["scale"]))
    return h, out


def test_ans_codes_to_within_a_percent_of_the_column_conditional_entropy_and_under_brotli():
    arrays = [(f"blocks.{i}.mlp.fc.weight", column_coded(512, 256, i)) for i in range(3)]
    constant = [("blocks.0.attn.gate", np.full((4, 12), 3, dtype=np.int8)), ("x", np.zeros((0, 5), dtype=np.int8))]
    assert tg.ans_decode(tg.ans_encode(constant), 48) == constant[0][1].tobytes()  # one symbol, no values
    payload = tg.ans_encode(arrays)
    data = b"".join(a.tobytes() for _, a in arrays)
    assert tg.ans_decode(payload, len(data)) == data
    # the entropy each column's own distribution allows (the models see 4 buckets of columns, not 256)
    bits = 0.0
    for _, a in arrays:
        for col in a.T:
            _, counts = np.unique(col, return_counts=True)
            bits -= float((counts * np.log2(counts / counts.sum())).sum())
    assert len(payload) < 1.03 * bits / 8
    one_model = tg.ANS_COLUMN_BUCKETS
    try:  # the column buckets are what beats brotli: with one model per kind, ANS codes no better than order 0
        tg.ANS_COLUMN_BUCKETS = 1
        assert len(tg.ans_encode(arrays)) > 1.04 * len(payload)
    finally:
        tg.ANS_COLUMN_BUCKETS = one_model
    assert len(payload) < 0.97 * len(tg.brotli_module().compress(data, quality=11))


def test_ans_artifact_loads_without_any_setting_to_the_same_model(column_quantized):
    h, q = column_quantized
    blobs = {c: tg.serialize_artifact(q, tg.model_config(h), c) for c in ("zstd", "brotli", "ans")}
    assert blobs["ans"].startswith(tg.ANS_MAGIC)
    tags = [frame[:1] for frame in tg.unpack_frames(blobs["ans"])]
    assert tags.count(b"A") == 1 and set(tags) == {b"A", b"B"}  # the int6 section ANS-coded, the rest brotli
    assert len(blobs["ans"]) < len(blobs["brotli"])
    loaded = {c: tg.deserialize_artifact(b, c) for c, b in blobs.items()}
    assert loaded["ans"][0] == loaded["zstd"][0]
    for name, entry in loaded["zstd"][1].items():
        for part, array in entry["arrays"].items():
            assert np.array_equal(array, loaded["ans"][1][name]["arrays"][part]), (name, part)


@pytest.mark.parametrize("compressor", ["brotli", "ans"])
def test_damaged_artifacts_give_a_clear_error_or_the_same_model(column_quantized, compressor):
    h, q = column_quantized
    blob = tg.serialize_artifact(q, tg.model_config(h), compressor)
    intact = tg.dequantize_state(tg.deserialize_artifact(blob, "intact")[1])
    rng = random.Random(1)
    damaged = [blob[:cut] for cut in range(0, len(blob), 211)]
    for _ in range(300):
        pos = rng.randrange(len(blob))
        damaged.append(blob[:pos] + bytes([blob[pos] ^ (1 << rng.randrange(8))]) + blob[pos + 1:])
    for bad in damaged:
        try:
            loaded = tg.dequantize_state(tg.deserialize_artifact(bad, "damaged.ptz")[1])
        except tg.RunError as exc:
            assert "damaged.ptz: corrupt or truncated artifact" in str(exc) and "\n" not in str(exc)
            continue
        assert all(torch.equal(loaded[n], intact[n]) for n in intact)


def test_a_missing_constriction_is_a_one_line_error_where_ans_is_used(column_quantized, monkeypatch):
    h, q = column_quantized
    blob = tg.serialize_artifact(q, tg.model_config(h), "ans")
    real = tg.importlib.import_module
    monkeypatch.setattr(tg.importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "constriction" else real(name, *a))
    tg.deserialize_artifact(tg.serialize_artifact(q, tg.model_config(h), "brotli"), "b")  # brotli needs no constriction
    for use in (lambda: tg.serialize_artifact(q, tg.model_config(h), "ans"), lambda: tg.deserialize_artifact(blob, "a.ptz")):
        with pytest.raises(tg.RunError) as error:
            use()
        assert_one_line_error(error, "pip install constriction")


def test_quant_min_range_puts_small_rows_on_one_grid_of_step_one_over_qmax():
    """PR #1204's floor: a row whose values lie within +-1 is rounded on the grid k / qmax, whatever its
    own range; a row wider than +-1 keeps its own scale. Off (0), every row has its own scale."""
    torch.manual_seed(0)
    w = torch.cat([torch.randn(3, 64) * 0.02, torch.randn(1, 64) * 2.0])  # three small rows, one wide
    for bits in (5, 6, 8):
        qmax = 2 ** (bits - 1) - 1
        q, scale = tg.quantize_rows(w, bits, clip_search=True, min_range=1.0)
        assert torch.equal(scale[:3].float(), torch.full((3,), 1 / qmax).half().float())
        assert torch.equal(q[:3].float(), torch.round(w[:3] / scale[:3, None].float()))  # values under 1 step: few codes
        assert scale[3] > 1 / qmax and torch.equal(scale[3], tg.quantize_rows(w, bits, True)[1][3])
        assert (tg.quantize_rows(w, bits, True)[1][:3] < 1 / qmax).all()
    assert tg.PRESETS["pr1204"]["quant_min_range"] == 1.0 and "quant_min_range" not in tg.PRESETS["sp8192"]
    # GPTQ keeps the floor: its scales are quantize_rows'
    hessian = torch.eye(64) + 0.1
    entry = tg.quantize_tensor(w, tg.QuantRecipe("int6", hessian=hessian, min_range=1.0))
    assert np.allclose(entry["arrays"]["scale"][:3].astype(np.float32), np.float16(1 / 31))
