# python3 -m pytest -q tests/test_artifact.py
"""The artifact: quantization error bounds per class, the clip search, the byte-limit fitting, the
safe and strict loader, and EVAL_ONLY reproducing the in-run score."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from conftest import REPO, assert_one_line_error, cpu_runtime, tiny_hparams, tiny_model
import train_gpt as tg


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a few large outliers, like trained weights: where clipping pays."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[torch.rand(rows, cols, generator=g) < 0.002] *= 8
    return w


@pytest.mark.parametrize("cls", ["int4", "int5", "int6", "int8"])
def test_quantized_values_in_range_and_error_bounded(cls):
    bits = tg.QUANT_BITS[cls]
    qmax = 2 ** (bits - 1) - 1
    w = heavy_tailed(64, 96)
    for clip_search in (False, True):
        q, scale = tg.quantize_rows(w, bits, clip_search)
        assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (64,)
        assert int(q.abs().max()) <= qmax
        error = (tg.dequantize_rows(q, scale) - w).abs()
        inside = w.abs() <= qmax * scale.float()[:, None]  # values within the clip: rounding error only
        assert bool((error[inside] <= scale.float()[:, None].expand_as(w)[inside] / 2 + 1e-7).all())
        if not clip_search:
            assert bool(inside.all()), "absmax rounding must not clip anything"


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_clip_search_never_worse_than_absmax_per_row(bits):
    w = heavy_tailed(128, 256, seed=bits)
    err = {}
    for clip_search in (False, True):
        q, scale = tg.quantize_rows(w, bits, clip_search)
        err[clip_search] = (tg.dequantize_rows(q, scale) - w).square().sum(dim=1)
    assert bool((err[True] <= err[False] + 1e-9).all())
    assert err[True].sum() < 0.99 * err[False].sum(), "on heavy-tailed rows the search should clip"


def test_tiny_rows_are_not_floored():
    """PR #236's quantizer floored the step at 1/qmax; a row of small weights must keep its detail."""
    w = torch.linspace(-1e-3, 1e-3, 31)[None, :]
    q, scale = tg.quantize_rows(w, 5, clip_search=False)
    assert len(torch.unique(q)) >= 25
    assert float((tg.dequantize_rows(q, scale) - w).abs().max()) < 1e-4


def test_every_class_roundtrips_through_the_artifact():
    h = tiny_hparams()
    state = tiny_model(h).state_dict()
    plan = tg.quant_plan(state, h)
    plan["tok_emb.weight"] = "int8"  # exercise every class the format knows
    plan["blocks.0.mlp.fc.weight"] = "int4"
    assert {"int4", "int5", "int6", "int8", "fp16"} <= set(plan.values())
    quantized = tg.quantize_state(state, {n: tg.QuantRecipe(c) for n, c in plan.items()})
    config, loaded = tg.deserialize_artifact(tg.serialize_artifact(quantized, tg.model_config(h)), "mem")
    assert config == tg.model_config(h)
    assert loaded.keys() == quantized.keys()
    for name, entry in quantized.items():
        assert loaded[name]["class"] == entry["class"]
        for part, array in entry["arrays"].items():
            assert np.array_equal(loaded[name]["arrays"][part], array), (name, part)
    restored = tg.dequantize_state(loaded)
    model = tg.GPT(h)
    model.load_state_dict(restored, strict=True)
    for name, tensor in state.items():
        tol = 1e-3 * tensor.abs().max().item() if plan[name] == "fp16" else 0.6 * tensor.abs().max().item()
        assert torch.allclose(restored[name], tensor.float(), atol=tol), name


def output_error(w: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = deq - w
    return float(((delta @ hessian) * delta).sum())


def test_gptq_with_identity_hessian_is_round_to_nearest():
    w = heavy_tailed(32, 48)
    q, scale = tg.quantize_rows(w, 5)
    assert torch.equal(tg.gptq_round(w, torch.eye(48), 5, scale), q)


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_gptq_lowers_the_output_error_on_correlated_inputs(bits):
    g = torch.Generator().manual_seed(bits)
    mixing = torch.randn(64, 64, generator=g)
    x = torch.randn(4096, 64, generator=g) @ mixing  # strongly correlated input features
    hessian = x.T @ x / len(x)
    w = heavy_tailed(96, 64, seed=bits)
    q, scale = tg.quantize_rows(w, bits)
    q_gptq = tg.gptq_round(w, hessian, bits, scale)
    assert int(q_gptq.abs().max()) <= 2 ** (bits - 1) - 1
    nearest = output_error(w, tg.dequantize_rows(q, scale), hessian)
    gptq = output_error(w, tg.dequantize_rows(q_gptq, scale), hessian)
    assert gptq < 0.8 * nearest, (gptq, nearest)


def test_collect_hessians_are_input_second_moments():
    h = tiny_hparams(gptq_calib_tokens=2048)
    model = tiny_model(h)
    loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, cpu_runtime())
    # bf16 autocast, as on a GPU: the sums must still be accumulated in fp32
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), distributed=False, bf16=True)
    hessians = tg.collect_hessians(model, loader, h, rt)
    matrices = [n for n, p in model.named_parameters() if re.fullmatch(tg.BLOCK_MATRICES, n)]
    assert sorted(hessians) == sorted(matrices)
    for name in matrices:
        hess = hessians[name]
        assert hess.dtype == torch.float32
        assert hess.shape == (model.get_parameter(name).shape[1],) * 2
        assert torch.allclose(hess, hess.T, atol=1e-5)
        assert float(torch.linalg.eigvalsh(hess.double()).min()) > -1e-4
    for name in ("blocks.0.attn.c_q.weight", "blocks.1.mlp.fc.weight"):  # inputs are RMS-normalized
        assert abs(float(hessians[name].trace()) / h.model_dim - 1) < 1e-3
    assert hessians["blocks.0.attn.c_k.weight"] is hessians["blocks.0.attn.c_q.weight"]


@pytest.fixture(scope="module")
def artifact():
    h = tiny_hparams()
    state = tiny_model(h).state_dict()
    return tg.serialize_artifact(tg.quantize_state(state, tg.quant_recipes(state, h)), tg.model_config(h))


def frames(artifact: bytes) -> list[bytes]:
    """The artifact's frames, decompressed without train_gpt's bounds."""
    return [zstandard.ZstdDecompressor().decompress(frame) for frame in tg.unpack_frames(artifact)]


def with_header(artifact: bytes, change) -> bytes:
    """A well-formed artifact whose JSON header was edited by change(header_dict)."""
    header_json, *sections = frames(artifact)
    header = json.loads(header_json)
    change(header)
    return tg.pack_frames([json.dumps(header).encode()] + sections)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "magic", "pickle", "empty", "header", "frames",
                                    "offset", "dtype", "missing_scale", "config_type", "config_key", "huge_array"])
def test_damaged_artifacts_give_a_clear_error(artifact, damage):
    mid = len(artifact) // 2
    bad = {
        "truncated": lambda: artifact[:mid],
        "flipped": lambda: artifact[:mid] + bytes([artifact[mid] ^ 0xFF]) + artifact[mid + 1:],
        "magic": lambda: b"XXXXXXXX" + artifact[8:],
        "pickle": lambda: b"\x80\x04\x95" + b"\x00" * 64,  # what torch.save/pickle files start with
        "empty": lambda: b"",
        "header": lambda: tg.pack_frames([b"{not json"] + frames(artifact)[1:]),
        "frames": lambda: artifact[:8] + struct.pack("<I", 10 ** 6) + artifact[12:],
        "offset": lambda: with_header(artifact, lambda hd: hd["blobs"][0].update(offset=10 ** 9)),
        "dtype": lambda: with_header(artifact, lambda hd: hd["blobs"][0].update(dtype="object")),
        "config_type": lambda: with_header(artifact, lambda hd: hd["model"].update(num_layers="2")),
        "config_key": lambda: with_header(artifact, lambda hd: hd["model"].update(layers=2)),
        "huge_array": lambda: with_header(artifact, lambda hd: hd["blobs"][-1].update(
            shape=[2 ** 40], nbytes=2 ** 41)),
        "missing_scale": lambda: with_header(
            artifact, lambda hd: hd.update(blobs=[b for b in hd["blobs"] if b["part"] != "scale"])),
    }[damage]()
    with pytest.raises(tg.RunError, match=r"^damaged\.ptz: "):
        tg.deserialize_artifact(bad, "damaged.ptz")


def damaged_versions(artifact: bytes, seed: int = 0):
    """(what, bytes): every bit of the magic, the frame table and each frame's header flipped in turn,
    300 random bytes elsewhere set to random values, and the file cut at every 97th byte."""
    (count,) = struct.unpack_from("<I", artifact, len(tg.ARTIFACT_MAGIC))
    lengths = struct.unpack_from(f"<{count}Q", artifact, len(tg.ARTIFACT_MAGIC) + 4)
    structure = list(range(len(tg.ARTIFACT_MAGIC) + 4 + 8 * count))
    pos = len(structure)
    for length in lengths:
        structure += range(pos, pos + zstandard.frame_header_size(artifact[pos:pos + length]))
        pos += length
    for pos in structure:
        for bit in range(8):
            yield f"bit {bit} of byte {pos}", artifact[:pos] + bytes([artifact[pos] ^ 1 << bit]) + artifact[pos + 1:]
    rng = random.Random(seed)
    for _ in range(300):
        pos, value = rng.randrange(len(artifact)), rng.randrange(256)
        if value != artifact[pos]:
            yield f"byte {pos} set to {value}", artifact[:pos] + bytes([value]) + artifact[pos + 1:]
    for length in range(0, len(artifact), 97):
        yield f"cut at {length}", artifact[:length]


def test_every_damage_is_the_one_line_error_or_changes_nothing(artifact):
    # A damaged frame header once made zstd allocate exabytes (MemoryError, a traceback). Now every
    # damage is the promised error, or (zstd ignores one reserved bit of a frame header) loads exactly
    # what the undamaged file holds.
    config, intact = tg.deserialize_artifact(artifact, "intact.ptz")
    harmless = []
    for what, bad in damaged_versions(artifact):
        try:
            loaded_config, loaded = tg.deserialize_artifact(bad, "damaged.ptz")
        except tg.RunError as error:
            assert str(error).startswith("damaged.ptz: corrupt or truncated artifact"), (what, str(error))
            assert "\n" not in str(error), what
            continue
        assert loaded_config == config and loaded.keys() == intact.keys(), what
        for name, entry in intact.items():
            for part, array in entry["arrays"].items():
                assert np.array_equal(loaded[name]["arrays"][part], array), (what, name, part)
        harmless.append(what)
    assert len(harmless) <= 5, harmless  # the reserved bit of each of the 5 frame headers, at most


def test_an_artifact_written_before_a_model_field_existed_loads_with_the_field_off(artifact):
    """A writer that did not know the newest fields (the 1.06 stack's) wrote a model with them off."""
    newest = ("doc_attention", "attn_gate_window", "smear_window", "recur_repeats", "recur_in_unet")
    older = with_header(artifact, lambda hd: [hd["model"].pop(name) for name in newest])
    config, quantized = tg.deserialize_artifact(older, "older.ptz")
    intact_config, _ = tg.deserialize_artifact(artifact, "intact.ptz")
    defaults = tg.Hyperparameters()
    assert config == intact_config and all(config[name] == getattr(defaults, name) for name in newest)


def test_an_artifact_whose_tensors_do_not_fit_its_model_is_the_one_line_error(artifact):
    config, quantized = tg.deserialize_artifact(with_header(artifact, lambda hd: hd["model"].update(num_layers=4)),
                                                "wrong.ptz")
    h = dataclasses.replace(tiny_hparams(), **config)
    with pytest.raises(tg.RunError, match=r"^wrong\.ptz: corrupt or truncated artifact \(its tensors do not fit"):
        tg.load_weights(tg.GPT(h), tg.dequantize_state(quantized), Path("wrong.ptz"))


def test_an_artifact_is_read_only_if_it_is_a_file_within_the_byte_limit(artifact, tmp_path):
    path = tmp_path / "model.ptz"
    path.write_bytes(artifact)
    with pytest.raises(tg.RunError, match=r"model\.ptz: \d+ bytes, over ARTIFACT_LIMIT_BYTES=1000: "):
        tg.load_artifact(path, 1000)
    with pytest.raises(tg.RunError, match=r"^/dev/zero: no such artifact \(not a file\)$"):
        tg.load_artifact(Path("/dev/zero"), 16_000_000)
    config, state = tg.load_artifact(path, len(artifact))
    assert config == tg.model_config(tiny_hparams()) and state


def test_fit_to_limit_demotes_cheapest_first_and_fits():
    h = tiny_hparams(model_dim=64, num_heads=4, mlp_mult=3)
    state = tiny_model(h).state_dict()
    recipes = tg.quant_recipes(state, h)
    quantized = tg.quantize_state(state, recipes)

    def serialize(q):
        return tg.serialize_artifact(q, tg.model_config(h))

    full = len(serialize(dict(quantized)))
    lines = []
    blob, moves = tg.fit_to_limit(state, quantized, recipes, serialize, full - 3000, lines.append)
    assert len(blob) <= full - 3000 and moves, "it must have demoted something and fit"
    assert all(re.fullmatch(r"[\w.]+:(fp16->int8|int6->int5|int5->int4)", m) for m in moves), moves
    assert not any(re.fullmatch(f"{tg.CONTROL_TENSORS}|{tg.GATE_TENSORS}", m.split(":")[0]) for m in moves), "controls stay"
    for move in moves:
        name, change = move.split(":")
        assert quantized[name]["class"] == change.split("->")[1]
    assert len(lines) == len(moves)
    model = tg.GPT(h)
    model.load_state_dict(tg.dequantize_state(tg.deserialize_artifact(blob, "fit")[1]), strict=True)


def test_fit_to_limit_impossible_budget_raises():
    h = tiny_hparams()
    state = tiny_model(h).state_dict()
    recipes = tg.quant_recipes(state, h)
    with pytest.raises(tg.RunError, match="lowest class"):
        tg.fit_to_limit(state, tg.quantize_state(state, recipes), recipes,
                        lambda q: tg.serialize_artifact(q, tg.model_config(h)), 100, lambda _: None)


def final_lines(run) -> dict[str, str]:
    return {line.split()[0].split(":")[0]: line for line in run.body.splitlines()
            if line.startswith(("final_roundtrip", "final_sliding", "val_tokens", "artifact_bytes"))}


def strip_time(line: str) -> str:
    return re.sub(r" eval_time_ms:\d+", "", line)


@pytest.mark.slow
def test_fitting_end_to_end_then_eval_only_reproduces_the_score(run_script):
    """One smoke run (GPTQ on) with a limit below its natural size: the fitting makes it fit and logs
    what it changed; then EVAL_ONLY on the written artifact prints the same final lines, to the last
    digit, and so does EVAL_ONLY under two processes, to float-summation precision."""
    env = {"ITERATIONS": "20", "SWA_INTERVAL": "0", "GPTQ_CALIB_TOKENS": "4096"}
    natural = run_script(env)
    assert natural.returncode == 0, natural.explain()
    total = int(re.search(r"artifact_bytes:(\d+)", natural.body).group(1))
    fitted = run_script({**env, "ARTIFACT_LIMIT_BYTES": str(total - 4000)})
    assert fitted.returncode == 0, fitted.explain()
    line = final_lines(fitted)["artifact_bytes"]
    fields = dict(kv.split(":") for kv in line.split())
    assert int(fields["artifact_bytes"]) <= total - 4000 and int(fields["margin"]) >= 0
    assert int(fields["fit_moves"]) > 0 and "fit_changes:" in fitted.body
    assert int(fields["model_bytes"]) == fitted.artifact.stat().st_size

    rescored = run_script({"EVAL_ONLY": str(fitted.artifact), "ARTIFACT_LIMIT_BYTES": str(total - 4000)})
    assert rescored.returncode == 0, rescored.explain()
    assert "eval_only:" in rescored.body and "step:" not in rescored.body
    before, after = final_lines(fitted), final_lines(rescored)
    for key in ("val_tokens", "final_roundtrip", "final_sliding"):
        assert strip_time(after[key]) == strip_time(before[key]), key
    assert "gptq_calibration:" in fitted.body

    two = run_script({"EVAL_ONLY": str(fitted.artifact), "ARTIFACT_LIMIT_BYTES": str(total - 4000)}, nproc=2)
    assert two.returncode == 0, two.explain()
    assert "world_size:2" in two.body
    for key in ("final_roundtrip", "final_sliding"):
        bpb = [float(re.search(r"val_bpb:([\d.]+)", lines[key]).group(1)) for lines in (before, final_lines(two))]
        assert abs(bpb[0] - bpb[1]) < 1e-6, (key, bpb)


def test_impossible_limit_fails_without_writing(run_script):
    code_bytes = len(tg.shipped_form(Path(tg.__file__).read_bytes()))  # room for the code and 5 KB: no model fits
    run = run_script({"ITERATIONS": "2", "ARTIFACT_LIMIT_BYTES": str(code_bytes + 5000)})
    assert_one_line_error(run, "lowest class")
    assert not run.artifact.exists()
    assert "final_roundtrip" not in run.body


def test_eval_only_rejects_a_damaged_artifact(run_script, tmp_path):
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(tg.ARTIFACT_MAGIC + b"not a frame table")
    assert_one_line_error(run_script({"EVAL_ONLY": str(bad)}), str(bad), "corrupt")
    assert_one_line_error(run_script({"EVAL_ONLY": str(tmp_path / "none.ptz")}), "no such artifact")


def test_eval_only_of_another_presets_artifact_names_the_mismatch_not_a_damage(monkeypatch, tmp_path):
    """An intact artifact whose model does not fit this run's settings (here: a sequence length that
    TRAIN_BATCH_TOKENS does not divide) is a settings mismatch, said as one, not a corrupt file."""
    h = tiny_hparams(eval_only=str(tmp_path / "other.ptz"))
    monkeypatch.setattr(tg, "load_artifact", lambda path, limit: ({"train_seq_len": 384}, {}))
    with pytest.raises(tg.RunError, match=r"other\.ptz: its model does not fit this run's settings \(PRESET=smoke: "
                                          r"TRAIN_BATCH_TOKENS.*score it with the PRESET"):
        tg.train_write_score(h, "smoke", cpu_runtime(), "x", tmp_path / "other.ptz")


def test_an_ema_shorter_than_its_horizon_says_how_much_of_the_start_it_scores():
    model = tiny_model()
    ema = tg.EMA(0.9965, model)
    for step in range(30):
        ema.observe(model, step, 1.0)
    assert ema.summary() == ("ema: decay 0.9965 over 30 updates WARNING: the run is shorter than the average's "
                             "horizon (286 updates): the initial weights still make up 90% of what is scored "
                             "(lower EMA_DECAY for a short run)")
    long = tg.EMA(0.9, model)
    for step in range(20):
        long.observe(model, step, 1.0)
    assert long.summary() == "ema: decay 0.9 over 20 updates"


@pytest.mark.parametrize("preset", sorted(tg.PRESETS))
def test_the_artifacts_model_config_is_all_a_scored_model_depends_on(preset):
    """EVAL_ONLY rebuilds the model from ModelConfig's fields (what the artifact stores) and this run's other
    settings: a model built from the stored fields with every other setting at its default (bar the
    initialization's, which the loaded weights replace) takes the same weights and scores the same."""
    sys.path.insert(0, str(REPO / "tests"))
    import golden
    h = tg.hyperparameters_from_env(golden.toy_env(preset), cuda_available=False)[0]
    init = {name: getattr(h, name) for name in ("qk_gain_init", "bigram_proj_gain")}
    stored = dataclasses.replace(tg.Hyperparameters(), **tg.model_config(h), **init)
    assert tg.model_config(stored) == tg.model_config(h)
    assert list(tg.model_config(h)) == [f.name for f in dataclasses.fields(tg.ModelConfig)]
    trained, rebuilt = tiny_model(h), tg.GPT(stored)
    rebuilt.load_state_dict(trained.state_dict(), strict=True)
    tokens = torch.randint(4, h.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    tokens[:, 40] = tg.BOS_ID
    for model in (trained, rebuilt):
        model.recur_active = bool(model.recur_blocks)
        model.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(trained(tokens), rebuilt(tokens), rtol=0, atol=0)
