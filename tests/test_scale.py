# SCALE=toy, any preset small (issue 24, item 6): OMP_NUM_THREADS=1 python3 -m pytest -q tests/test_scale.py
"""SCALE=toy shrinks whatever preset is chosen (train_gpt.py's TOY): for every preset the shrunk settings
are valid, the model, the evaluation batch and the GPTQ / TTT sizes stay under the bounds below, the
preset's depth-tied parts are its own, the averaging horizon lies well inside the run; env vars still
override the shrink; SCALE=full is the preset itself; a bad SCALE is a one-line error; and PRESET=sp8192
SCALE=toy runs end to end on the bundled sample."""

import pytest
import torch

import train_gpt as tg
from conftest import SAMPLE, TOKENIZER, assert_one_line_error

PRESETS = tuple(tg.PRESETS)
MAX_PARAMS = 4_000_000  # the largest is sp8192 at vocab 8,192: 3,039,323 (16 MB of fp32 weights)
MAX_LOGIT_BYTES = 2**29  # one evaluation batch's fp32 logits, 0.5 GB (8,192 tokens x 8,192 pieces x 4 B = 0.27 GB)
MAX_CALIB_TOKENS, MAX_SELFGEN_SEQS = 4096, 4  # GPTQ calibration (the full sp8192 plans 25,165,824 tokens)
MAX_TTT_DOCS, MAX_TTT_RANK = 4, 4
# What SCALE=toy must leave as the preset has it: depth and everything counted in blocks, quantization, compressor
KEPT = ("num_layers", "recur_blocks", "recur_repeats", "lanes_from", "xsa_last_n", "ve_layers", "vocab_size",
        "quant_bits_mlp", "quant_bits_embed", "int6_matrices", "compressor", "ttt_enabled", "eval_stride",
        "warmdown_frac", "recur_start_frac")


def config(env: dict[str, str]) -> tg.Hyperparameters:
    return tg.hyperparameters_from_env(env, cuda_available=False)[0]


def parameter_count(h: tg.Hyperparameters) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in tg.GPT(h).parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_toy_is_small_valid_and_keeps_the_preset_s_parts(preset):
    full, toy = config({"PRESET": preset}), config({"PRESET": preset, "SCALE": "toy"})  # validated: no RunError
    assert toy.scale == "toy" and toy.preset == preset
    assert {k: getattr(toy, k) for k in KEPT} == {k: getattr(full, k) for k in KEPT}
    assert (toy.model_dim, toy.num_heads, toy.num_kv_heads, toy.train_seq_len) == (128, 4, 2, 128)
    assert parameter_count(toy) < MAX_PARAMS
    assert toy.val_batch_size * toy.vocab_size * 4 <= MAX_LOGIT_BYTES
    assert toy.gptq_calib_tokens <= MAX_CALIB_TOKENS and toy.gptq_selfgen_seqs <= MAX_SELFGEN_SEQS
    assert bool(toy.gptq_calib_tokens) == bool(full.gptq_calib_tokens)  # a calibration the preset has stays on
    assert bool(toy.gptq_selfgen_seqs) == bool(full.gptq_selfgen_seqs)
    assert toy.ttt_batch_docs <= MAX_TTT_DOCS and toy.ttt_lora_rank <= MAX_TTT_RANK
    assert len(tg.block_list(toy.ttt_phases, "TTT_PHASES")) == len(tg.block_list(full.ttt_phases, "TTT_PHASES"))
    assert toy.max_wallclock_seconds == 0 and toy.val_tokens == 0 and toy.iterations == tg.TOY["iterations"]
    # the schedule scaled to the run: warm-down and momentum warm-up inside it, the averaging horizon well inside
    assert 0 < toy.muon_momentum_warmup_steps <= toy.iterations / 2 and toy.warmdown_iters <= toy.iterations * 0.6
    assert bool(toy.warmdown_iters) == bool(full.warmdown_iters) and bool(toy.swa_interval) == bool(full.swa_interval)
    assert bool(toy.ema_decay) == bool(full.ema_decay) and (not toy.ema_decay or 1 / (1 - toy.ema_decay) <= 60)


def test_the_schedule_follows_the_run_length_and_env_vars_override_the_shrink():
    base = config({"PRESET": "pr1204", "SCALE": "toy"})
    longer = config({"PRESET": "pr1204", "SCALE": "toy", "ITERATIONS": "600"})
    assert abs(longer.warmdown_iters - 2 * base.warmdown_iters) <= 1  # 171 of 300 steps, 341 of 600 (rounded)
    assert 1 / (1 - longer.ema_decay) == pytest.approx(2 / (1 - base.ema_decay))
    env = {"PRESET": "sp8192", "SCALE": "toy", "MODEL_DIM": "256", "VAL_BATCH_SIZE": "4096", "EMA_DECAY": "0.99",
           "GPTQ_CALIB_TOKENS": "8192", "TTT_PHASES": "8", "MAX_WALLCLOCK_SECONDS": "900", "VAL_TOKENS": "65536"}
    h = config(env)
    assert (h.model_dim, h.val_batch_size, h.ema_decay, h.gptq_calib_tokens, h.ttt_phases, h.max_wallclock_seconds,
            h.val_tokens) == (256, 4096, 0.99, 8192, "8", 900.0, 65536)
    assert h.num_heads == 4 and h.train_seq_len == 128  # the rest of the shrink still holds


@pytest.mark.parametrize("preset", PRESETS)
def test_scale_full_is_the_preset_itself(preset):
    assert config({"PRESET": preset, "SCALE": "full"}) == config({"PRESET": preset})


def test_a_bad_scale_is_a_one_line_error(run_script):
    with pytest.raises(tg.RunError, match=r"^SCALE='bogus': expected one of full, toy$"):
        config({"PRESET": "sp8192", "SCALE": "bogus"})
    assert_one_line_error(run_script({"PRESET": "sp8192", "SCALE": "bogus"}, timeout=60), "SCALE")


@pytest.mark.parametrize("iterations", ["0", "-5"])
def test_toy_scale_with_impossible_iterations_names_iterations(iterations):
    """The toy shrink divides by the run's steps: ITERATIONS=0 must still be the range check's one line."""
    with pytest.raises(tg.RunError, match=rf"^ITERATIONS={iterations}: must be in \[1, inf\)$"):
        config({"PRESET": "sp8192", "SCALE": "toy", "ITERATIONS": iterations})


@pytest.mark.slow
def test_sp8192_at_toy_scale_runs_end_to_end_on_the_sample(run_script):
    """The whole sp8192 stack shrunk (recurrence, lanes, gates, GPTQ with LQER, ANS, TTT), cut to 16 steps and
    4,096 validation targets to stay near a minute; the default run (300 steps, the whole split) is in README."""
    run = run_script({"PRESET": "sp8192", "SCALE": "toy", "DATA_PATH": str(SAMPLE), "TOKENIZER_PATH": str(TOKENIZER),
                      "VOCAB_SIZE": "1024", "ITERATIONS": "16", "VAL_TOKENS": "4096"}, timeout=120)
    assert run.returncode == 0, run.explain()
    assert "preset:sp8192 scale:toy" in run.body
    for label in ("pre_quant ", "final_roundtrip ", "final_ttt ", "eval_done "):
        assert f"\n{label}" in run.body, f"no {label.strip()} line:\n{run.explain()}"
    assert "hparam SCALE=toy" in run.body and "WARNING: the run is shorter" not in run.body
