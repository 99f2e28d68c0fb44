# OMP_NUM_THREADS=1 python3 -m pytest -q tests/test_quant_sp8192.py
"""The 1.06 stack's quantizer pieces (PR #1855, #2135): SDClip's fixed row scale, the tied embedding
GPTQ'd as the head on the final norm's output, gates int8 per row, small tensors fp16, LQER's
low-rank error correction and AWQ-lite's int8 column group inside the GPTQ solve."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from conftest import tiny_hparams, tiny_model
import train_gpt as tg

CPU = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), distributed=False, bf16=False)


def correlated_hessian(cols: int, seed: int = 0, hot: slice | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    if hot is not None:
        x[:, hot] *= 10  # a group of inputs with a much larger RMS
    return x.T @ x / len(x)


def output_error(w: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = deq - w
    return float(((delta @ hessian) * delta).sum())


def roundtrip(quantized: dict, h) -> dict:
    return tg.deserialize_artifact(tg.serialize_artifact(quantized, tg.model_config(h)), "mem")[1]


@pytest.mark.parametrize("bits, k", [(6, 13.0), (6, 11.5), (7, 14.0), (8, 12.85)])
def test_sdclip_scale_is_k_std_over_qmax_fixed_before_rounding(bits, k):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 512, generator=g) * 0.03
    w[3, 7] = 0.8  # an outlier: it moves the row's std a little, its max a lot, and gets clipped
    qmax = 2 ** (bits - 1) - 1
    q, scale = tg.quantize_rows(w, bits, clip_k=k)
    expected = (k * w.std(dim=1) / qmax).half()
    assert torch.equal(scale, expected)
    assert torch.equal(q, torch.clamp(torch.round(w / expected.float()[:, None]), -qmax, qmax).to(torch.int8))
    assert int(q[3, 7]) == qmax  # clipped
    # GPTQ rounds on that same fixed scale
    entry = tg.quantize_tensor(w, tg.QuantRecipe(tg.BITS_CLASS[bits], clip_k=k, hessian=correlated_hessian(512)))
    assert np.array_equal(entry["arrays"]["scale"], expected.numpy())


def test_sdclip_widths_follow_the_kind_of_tensor():
    h = tiny_hparams(sdclip_attn=13.0, sdclip_mlp=11.5, sdclip_embed=14.0, sdclip_other=12.85, quant_bits_embed=7)
    state = tiny_model(h).state_dict()
    plan, recipes = tg.quant_plan(state, h), tg.quant_recipes(state, h)
    assert plan == {n: r.cls for n, r in recipes.items()}
    widths = {n: r.clip_k for n, r in recipes.items() if r.cls in tg.QUANT_BITS}
    assert all(r.clip_k == 0 for n, r in recipes.items() if n not in widths)  # fp16 tensors have no k
    assert widths["blocks.0.attn.c_k.weight"] == 13.0 and widths["blocks.1.mlp.proj.weight"] == 11.5
    assert widths["tok_emb.weight"] == 14.0 and widths["bigram.table.weight"] == 12.85
    quantized = tg.quantize_state(state, recipes)
    for name, k in widths.items():
        w = state[name].float()
        qmax = 2 ** (tg.QUANT_BITS[plan[name]] - 1) - 1
        expected = (k * w.std(dim=1) / qmax).half()
        assert np.array_equal(quantized[name]["arrays"]["scale"], expected.numpy())
    off = tg.quantize_state(state, {n: tg.QuantRecipe(c) for n, c in plan.items()})  # all k at 0: the clip search
    assert all(np.array_equal(off[n]["arrays"]["scale"], tg.quantize_rows(state[n], tg.QUANT_BITS[plan[n]])[1].numpy())
               for n in widths)


def calibration_batches(h, loader, rt, batches: int):
    tokens_per_slice = h.train_batch_tokens // tg.SLICES_PER_STEP
    return [loader.next_batch(tokens_per_slice, h.train_seq_len)[0] for _ in range(batches)]


def test_the_head_hessian_is_the_second_moment_of_the_final_norm_output():
    h = tiny_hparams(gptq_calib_tokens=2048, gptq_embed=True, quant_bits_embed=7, bigram_vocab_size=0,
                     logit_softcap=1000.0)
    model = tiny_model(h)
    files = tg.find_shards(h, "train")
    hessians = tg.collect_hessians(model, tg.DistributedTokenLoader(files, h.vocab_size, CPU), h, CPU)
    head = hessians["tok_emb.weight"]
    assert head.shape == (h.model_dim, h.model_dim)
    assert abs(float(head.trace()) / h.model_dim - 1) < 1e-3  # the head's input is RMS-normalized
    # Independently: the head maps its input x to logits x E^T, so E H E^T is the logits' second moment.
    batches = -(-h.gptq_calib_tokens // h.train_batch_tokens) * CPU.grad_accum_steps
    replay = tg.DistributedTokenLoader(files, h.vocab_size, CPU)
    with torch.no_grad():
        logits = torch.cat([model(x).double().flatten(0, 1) for x in calibration_batches(h, replay, CPU, batches)])
    logits = h.logit_softcap * torch.atanh(logits / h.logit_softcap)  # undo the softcap
    emb = model.tok_emb.weight.double()
    assert torch.allclose(emb @ head.double() @ emb.T, logits.T @ logits / len(logits), rtol=1e-3, atol=1e-4)
    off = tg.collect_hessians(model, tg.DistributedTokenLoader(files, h.vocab_size, CPU),
                              dataclasses.replace(h, gptq_embed=False), CPU)
    assert "tok_emb.weight" not in off  # GPTQ_EMBED off: today's Hessians


def test_int7_embedding_gptq_lowers_the_head_output_error_and_roundtrips():
    h = tiny_hparams(gptq_calib_tokens=2048, gptq_embed=True, quant_bits_embed=7, sdclip_embed=14.0)
    model = tiny_model(h)
    loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, CPU)
    head = tg.collect_hessians(model, loader, h, CPU)["tok_emb.weight"]
    emb = model.tok_emb.weight.detach()
    state = model.state_dict()
    assert tg.quant_plan(state, h)["tok_emb.weight"] == "int7"
    gptq = tg.quantize_tensor(emb, tg.QuantRecipe("int7", 14.0, head))
    nearest = tg.quantize_tensor(emb, tg.QuantRecipe("int7", 14.0))
    assert int(np.abs(gptq["arrays"]["q"]).max()) <= 63
    assert output_error(emb, tg.dequantize_tensor(gptq), head) < output_error(emb, tg.dequantize_tensor(nearest), head)
    loaded = roundtrip({"tok_emb.weight": gptq}, h)["tok_emb.weight"]
    assert loaded["class"] == "int7" and torch.equal(tg.dequantize_tensor(loaded), tg.dequantize_tensor(gptq))


def test_gates_are_int8_per_row_with_the_knob_and_fp16_without():
    h = tiny_hparams(skip_gates=True, quant_gates_int8=True, attn_gate_window=12, smear_mode="scalar",
                     smear_window=12)
    state = tiny_model(h).state_dict()
    plan = tg.quant_plan(state, h)
    gates = [n for n in state if re.fullmatch(tg.GATE_TENSORS, n)]
    assert sorted(gates) == sorted(f"blocks.{i}.attn.gate" for i in range(h.num_layers))
    assert all(plan[n] == "int8" for n in gates)
    assert plan["skip_gates"] == plan["smear.gate"] == "fp16", "PR #1855: only the attention gates are int8"
    assert all(c == tg.quant_plan(state, dataclasses.replace(h, quant_gates_int8=False))[n]
               for n, c in plan.items() if n not in gates)
    assert all(tg.quant_plan(state, dataclasses.replace(h, quant_gates_int8=False))[n] == "fp16" for n in gates)
    state["blocks.0.attn.gate"][0] = 1.5  # a row of one value: std 0, so never SDClip's (k x std) scale
    h = dataclasses.replace(h, sdclip_attn=13.0, sdclip_mlp=11.5, sdclip_other=12.85)
    recipes = tg.quant_recipes(state, h)
    assert all(recipes[n].clip_k == 0 for n in gates)
    quantized = tg.quantize_state(state, recipes)
    gate = state["blocks.0.attn.gate"]
    assert quantized["blocks.0.attn.gate"]["arrays"]["scale"].shape == (gate.shape[0],)  # one per row
    loaded = tg.dequantize_state(roundtrip(quantized, h))
    for name in gates:
        assert loaded[name].shape == state[name].shape
        assert torch.allclose(loaded[name], state[name], atol=float(state[name].abs().max()) / 254 + 1e-6)


def test_in_the_sp8192_shape_small_tensors_are_fp16_and_the_rest_quantized():
    """The sp8192 preset's shape (2 of its 11 layers): every tensor of at most 65,536 values is fp16
    (or a gate, int8), every larger one integer-quantized; already so by the name rules."""
    h = tiny_hparams(num_layers=2, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4, vocab_size=8192,
                     bigram_vocab_size=0, skip_gates=True, quant_bits_mlp=6, quant_bits_embed=7,
                     quant_gates_int8=True, attn_gate_window=12)
    state = tg.GPT(h).state_dict()
    plan = tg.quant_plan(state, h)
    for name, tensor in state.items():
        if re.fullmatch(tg.GATE_TENSORS, name):
            assert plan[name] == "int8", name
        elif tensor.numel() <= 65_536:
            assert plan[name] == "fp16", name
        else:
            assert plan[name] in tg.QUANT_BITS, name


def planted_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {f"m{i}": torch.randn(48 + 16 * i, 64, generator=g) * (0.01 * (i + 1)) for i in range(6)}


def test_lqer_corrects_the_largest_errors_with_int2_and_int4_factors():
    state = planted_state()
    quantized = tg.quantize_state(state, dict.fromkeys(state, tg.QuantRecipe("int4")))
    before = {n: tg.dequantize_tensor(e) for n, e in quantized.items()}
    error = {n: float((before[n] - state[n]).norm()) for n in state}
    chosen = tg.add_low_rank_corrections(state, quantized, 3)
    assert chosen == sorted(error, key=error.get, reverse=True)[:3]
    for name, entry in quantized.items():
        arrays = entry["arrays"]
        if name not in chosen:
            assert set(arrays) == {"q", "scale"}
            continue
        rows, cols = state[name].shape
        assert arrays["lqer_a"].shape == (rows, tg.LQER_RANK) and arrays["lqer_a_scale"].shape == (1,)
        assert arrays["lqer_b"].shape == (tg.LQER_RANK, cols)
        assert arrays["lqer_b_scale"].shape == (tg.LQER_RANK * cols // tg.LQER_GROUP,)
        assert np.abs(arrays["lqer_a"]).max() <= 1 and np.abs(arrays["lqer_b"]).max() <= 7
        after = tg.dequantize_tensor(entry)
        assert float((after - state[name]).norm()) < error[name]
    loaded = roundtrip(quantized, tiny_hparams())
    for name, entry in quantized.items():
        assert torch.equal(tg.dequantize_tensor(loaded[name]), tg.dequantize_tensor(entry))


def test_lqer_recovers_a_low_rank_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g) * 0.02
    entry = tg.quantize_tensor(w, tg.QuantRecipe("int6"))
    planted = torch.randn(96, 2, generator=g) @ torch.randn(2, 64, generator=g) * 0.01
    state = {"m": w + planted}  # Q(W) misses exactly a rank-2 term (plus its rounding)
    error = float((tg.dequantize_tensor(entry) - state["m"]).norm())
    assert tg.add_low_rank_corrections(state, {"m": entry}, 1) == ["m"]
    assert float((tg.dequantize_tensor(entry) - state["m"]).norm()) < 0.5 * error


def test_awq_picks_the_most_salient_groups_of_the_whole_model():
    g = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(32, 256, generator=g) * 0.02, "b": torch.randn(32, 128, generator=g) * 0.02,
             "c": torch.randn(32, 256, generator=g) * 0.02}
    hessians = {"a": correlated_hessian(256, hot=slice(128, 192)), "b": correlated_hessian(128, seed=1),
                "c": correlated_hessian(256, seed=2)}
    state["c"][:, 0:64] *= 20  # salient by weight magnitude, at an ordinary input RMS
    plan = {"a": "int6", "b": "int6", "c": "int8"}  # int8 matrices are never candidates
    assert tg.salient_groups(state, plan, hessians, 1) == {"a": [2]}
    plan["c"] = "int6"
    assert tg.salient_groups(state, plan, hessians, 2) == {"a": [2], "c": [0]}
    assert tg.salient_groups(state, plan, {}, 1) == {}  # no Hessians (no GPTQ): nothing to choose by


def test_awq_keeps_its_groups_at_int8_inside_the_gptq_solve():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(80, 256, generator=g) * 0.02
    hot = slice(128, 192)
    hessian = correlated_hessian(256, hot=hot)
    entry = tg.quantize_tensor(w, tg.QuantRecipe("int5", hessian=hessian, awq=(2,)))
    arrays = entry["arrays"]
    assert arrays["awq_group"].tolist() == [2] and arrays["awq_q"].shape == (80, 64)
    assert np.abs(arrays["awq_q"]).max() > 15 and np.abs(arrays["awq_q"]).max() <= 127  # int8, beyond int5
    assert not arrays["q"][:, hot].any() and np.abs(arrays["q"]).max() <= 15
    deq = tg.dequantize_tensor(entry)
    plain = tg.dequantize_tensor(tg.quantize_tensor(w, tg.QuantRecipe("int5", hessian=hessian)))
    assert output_error(w, deq, hessian) < 0.5 * output_error(w, plain, hessian)
    # inside the solve: the int5 columns compensate for the int8 group's errors, which beats
    # overwriting plain GPTQ's group with separately rounded int8 columns
    step = tg.awq_scale(torch.from_numpy(arrays["scale"]), 5)[:, None]  # the row's range on the int8 grid
    patched = plain.clone()
    patched[:, hot] = torch.clamp(torch.round(w[:, hot] / step), -127, 127) * step
    assert output_error(w, deq, hessian) < output_error(w, patched, hessian)
    loaded = roundtrip({"m": entry}, tiny_hparams())["m"]
    assert torch.equal(tg.dequantize_tensor(loaded), deq)
    two = tg.quantize_tensor(w, tg.QuantRecipe("int5", hessian=hessian, awq=(0, 2)))  # several groups of one matrix
    assert two["arrays"]["awq_q"].shape == (80, 128)
    assert torch.equal(tg.dequantize_tensor(roundtrip({"m": two}, tiny_hparams())["m"]), tg.dequantize_tensor(two))


def test_an_entry_with_part_of_its_extra_arrays_is_a_damaged_artifact():
    state = planted_state()
    quantized = tg.quantize_state(state, dict.fromkeys(state, tg.QuantRecipe("int6")))
    tg.add_low_rank_corrections(state, quantized, 1)
    name = next(n for n, e in quantized.items() if "lqer_a" in e["arrays"])
    del quantized[name]["arrays"]["lqer_b_scale"]
    with pytest.raises(tg.RunError, match="lacks its arrays or has others"):
        roundtrip(quantized, tiny_hparams())


@pytest.mark.parametrize("group", [-1, 4])
def test_an_awq_group_outside_the_matrix_is_a_damaged_artifact(group):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 256, generator=g)
    entry = tg.quantize_tensor(w, tg.QuantRecipe("int6", hessian=correlated_hessian(256), awq=(1,)))
    entry["arrays"]["awq_group"] = np.array([group], dtype=np.int8)
    with pytest.raises(ValueError, match="AWQ groups"):
        tg.dequantize_tensor(entry)


@pytest.mark.parametrize("compressor", ["zstd", "brotli", "ans"])
def test_write_artifact_with_every_piece_on_reloads_what_it_quantized(tmp_path, compressor):
    h = tiny_hparams(gptq_calib_tokens=2048, gptq_embed=True, quant_bits_embed=7, quant_bits_mlp=6,
                     sdclip_attn=13.0, sdclip_mlp=11.5, sdclip_embed=14.0, sdclip_other=12.85, skip_gates=True,
                     quant_gates_int8=True, attn_gate_window=12, lqer_top=3, awq_groups=2, compressor=compressor,
                     int6_matrices=4)
    model = tiny_model(h)
    loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, CPU)
    hessians = tg.collect_hessians(model, loader, h, CPU)
    lines = []
    tg.write_artifact(h, tg.dataclasses.replace(CPU, log=lines.append), model, tmp_path / "a.ptz", 1000, hessians)
    assert any(line.startswith("lqer: rank-4 corrections of ") for line in lines), lines
    config, state = tg.load_artifact(tmp_path / "a.ptz", h.artifact_limit_bytes)
    restored = tg.GPT(dataclasses.replace(h))
    tg.load_weights(restored, state, tmp_path / "a.ptz")
    _, quantized = tg.deserialize_artifact((tmp_path / "a.ptz").read_bytes(), "a")
    assert sum("lqer_a" in e["arrays"] for e in quantized.values()) == 3
    assert sum(len(e["arrays"]["awq_group"]) for e in quantized.values() if "awq_q" in e["arrays"]) == 2
    assert quantized["tok_emb.weight"]["class"] == "int7"
    assert (tmp_path / "a.ptz").read_bytes().startswith(tg.COMPRESSORS[compressor])
    assert sum(e["class"] == "int6" for n, e in quantized.items() if re.fullmatch(tg.BLOCK_MATRICES, n)) == 4


@pytest.mark.parametrize("env, words", [
    ({"GPTQ_EMBED": "1"}, "GPTQ_EMBED"), ({"GPTQ_EMBED": "1", "QUANT_BITS_EMBED": "7", "GPTQ_CALIB_TOKENS": "0"},
                                          "GPTQ_EMBED"),
    ({"AWQ_GROUPS": "1", "GPTQ_CALIB_TOKENS": "0"}, "AWQ_GROUPS"),
])
def test_pieces_that_need_gptq_say_so(env, words):
    with pytest.raises(tg.RunError, match=words):
        tg.hyperparameters_from_env({"PRESET": "smoke", **env}, cuda_available=False)
