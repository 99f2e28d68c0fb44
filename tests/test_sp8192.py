# PRESET=sp8192, the 1.06 stack (issue 15): python3 -m pytest -q tests/test_sp8192.py
"""Each piece's defining property, on tiny seeded CPU models. Blocks by area; each helper keeps its own."""

import re

import pytest
import torch

import train_gpt as tg
from conftest import assert_causal_and_fully_trained, cpu_runtime, tiny_hparams, tiny_model

V = 1024


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def preset(name: str, **env) -> tg.Hyperparameters:
    return tg.hyperparameters_from_env({"PRESET": name, **env}, cuda_available=False)[0]


# ============================================================================= stack: loops, parallel lanes,
# schedule and the preset's shape (branch `stack`)


def looped(**overrides) -> tg.Hyperparameters:
    """The 1.06 stack's mechanics at toy size: 7 blocks, 2-3 run twice more (11 positions), lanes from 5."""
    knobs = dict(num_layers=7, model_dim=32, num_heads=4, num_kv_heads=2, bigram_vocab_size=0, recur_blocks="2,3",
                 recur_repeats=2, recur_in_unet=True, skip_gates=True, lanes_from=5, lane_formula="parallel",
                 xsa_last_n=7, rope_dims=4, ln_scale=True, mlp_negative_slope=0.5)
    return tiny_hparams(**{**knobs, **overrides})


def test_loops_run_the_group_again_in_order_with_every_weight_and_control_shared():
    h = looped()
    model = tiny_model(h)
    plain = tiny_model(tiny_hparams(**{**h.__dict__, "recur_blocks": "", "recur_repeats": 1, "recur_in_unet": False}))
    assert [w for _, w, _ in model.block_schedule()] == list(range(7)), "before the switch"
    model.start_recurrence()
    assert [(c, w, r) for c, w, r in model.block_schedule()] == [
        (0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 3, 0), (2, 2, 1), (3, 3, 1), (2, 2, 2), (3, 3, 2),
        (4, 4, 0), (5, 5, 0), (6, 6, 0)]
    # No parameter of its own: only the U-Net's skip tables grow (5 pairs over 11 positions, not 3 over 7).
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * (5 - 3) * h.model_dim
    calls = []
    model.blocks[2].attn.register_forward_pre_hook(lambda m, args: calls.append(args[0]))
    with torch.no_grad():
        model(random_tokens(1, 16))
    assert len(calls) == 3, "block 2 runs three times per forward"
    assert not torch.equal(calls[0], calls[1]), "each pass reads the previous pass's output"


def test_loops_in_the_unet_push_the_first_half_of_the_positions_and_pop_into_the_rest():
    model = tiny_model(looped())
    pairs = []
    original = model.skip
    model.skip = lambda x, skip, pair, first_lane_only=False: pairs.append(pair) or original(x, skip, pair,
                                                                                             first_lane_only)
    with torch.no_grad():
        model(random_tokens(1, 8))
        assert pairs == [0, 1, 2], "before the switch: 3 of the 7 blocks push, 3 of the last 4 pop"
        pairs.clear()
        model.start_recurrence()
        model(random_tokens(1, 8))
    assert pairs == [0, 1, 2, 3, 4], "after it: 5 of 11 positions push, 5 of the last 6 pop (the record's split)"


def test_one_repeat_without_the_unet_knob_is_the_recurrence_as_before():
    h = tiny_hparams(num_layers=4, recur_blocks="1,2", recur_repeats=1)
    model = tiny_model(h)
    model.start_recurrence()
    assert [w for _, w, _ in model.block_schedule()] == [0, 1, 2, 1, 2, 3]
    assert model.skip_weights.shape[0] == 2


def test_untied_repeats_get_one_mlp_per_repeated_position_copied_at_the_switch():
    h = looped(recur_untie_mlp=True)
    model = tiny_model(h)
    assert len(model.repeat_mlps) == 4
    model.start_recurrence()
    for i, block in enumerate([2, 3, 2, 3]):
        assert torch.equal(model.repeat_mlps[i].fc.weight, model.blocks[block].mlp.fc.weight)
    used = []
    for i, mlp in enumerate(model.repeat_mlps):
        mlp.register_forward_pre_hook(lambda m, args, i=i: used.append(i))
    with torch.no_grad():
        model(random_tokens(1, 8))
    assert used == [0, 1, 2, 3]


def test_the_full_model_with_every_stack_piece_is_causal_and_trains_every_parameter():
    model = tiny_model(looped())
    model.start_recurrence()
    assert_causal_and_fully_trained(model)


def test_parallel_lanes_compute_the_later_form():
    """Both sublayers read the block's input (attention the x0 mix of lane 0, the MLP lane 1 as is);
    lane i <- keep[i] lane i + write[0, i] attention + write[1, i] MLP."""
    h = looped(recur_blocks="", recur_repeats=1, recur_in_unet=False, lanes_from=1, num_layers=2, xsa_last_n=2)
    start = tiny_model(h, randomize=False).blocks[1]
    assert start.lane_parallel and torch.equal(start.lane_keep.detach(), torch.full((2,), 1.1))
    assert torch.equal(start.lane_write.detach(), torch.ones(2, 2)), "the record's init: keep 1.1, write 1"
    block = tiny_model(h).blocks[1]
    torch.manual_seed(1)
    with torch.no_grad():
        block.lane_write.copy_(torch.rand(2, 2))
        block.lane_keep.copy_(torch.rand(2))
        x, x0 = torch.randn(2, 1, 6, h.model_dim), torch.randn(1, 6, h.model_dim)
        mix = block.resid_mix[0] * x[0] + block.resid_mix[1] * x0
        a = block.attn_scale * block.attn(tg.rms_norm(mix) * block.norm_scale, block.q_gain, block.xsa)
        m = block.mlp_scale * block.mlp(tg.rms_norm(x[1]) * block.norm_scale)
        expected = torch.stack([block.lane_keep[i] * x[i] + block.lane_write[0, i] * a + block.lane_write[1, i] * m
                                for i in range(2)])
        torch.testing.assert_close(block(x, x0), expected, rtol=1e-5, atol=1e-6)


def test_parallel_lanes_mlp_does_not_see_the_same_blocks_attention():
    h = looped(recur_blocks="", recur_repeats=1, recur_in_unet=False, lanes_from=1, num_layers=2, xsa_last_n=2)
    block = tiny_model(h).blocks[1]
    seen = []
    block.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x, x0 = torch.randn(2, 1, 6, h.model_dim), torch.randn(1, 6, h.model_dim)
    with torch.no_grad():
        block(x, x0)
        block.attn.c_v.weight.mul_(3.0)
        block(x, x0)
    assert torch.equal(seen[0], seen[1])


def test_a_skip_enters_lane_zero_only_in_the_parallel_form():
    model = tiny_model(looped())
    x, skip = torch.randn(2, 1, 4, 32), torch.randn(1, 1, 4, 32)
    out = model.skip(x, skip, 0, first_lane_only=True)
    assert torch.equal(out[1], x[1]) and not torch.equal(out[0], x[0])
    torch.testing.assert_close(out[:1], model.skip(x[:1], skip, 0))


def test_warmdown_frac_falls_linearly_over_the_last_fraction_to_the_floor():
    h = tiny_hparams(iterations=100, warmdown_iters=0, warmdown_frac=0.85, lr_floor=0.1, max_wallclock_seconds=0)
    scales = [tg.lr_scale(h, s, 0.0) for s in range(101)]
    assert scales[:16] == [1.0] * 16
    assert scales[50] == pytest.approx(0.5 / 0.85) and scales[95] == pytest.approx(0.1) and scales[100] == 0.1
    capped = tiny_hparams(iterations=10**6, warmdown_iters=0, warmdown_frac=0.5, max_wallclock_seconds=100,
                          gptq_calib_tokens=0)
    assert tg.lr_scale(capped, 10, 75_000.0) == pytest.approx(0.5), "by the wallclock when that is further"


def test_muon_wd_taper_is_linear_from_its_start_to_the_multiplier_and_reaches_the_optimizer():
    h = tiny_hparams(muon_wd=0.1, muon_wd_taper=0.5, muon_wd_taper_from=0.7)
    assert [tg.muon_wd_scale(h, p) for p in (0.0, 0.7, 0.85, 1.0)] == pytest.approx([1, 1, 0.75, 0.5])
    assert tg.muon_wd_scale(tiny_hparams(), 0.9) == 1.0, "off by default"
    model = tiny_model(h, randomize=False)
    optimizers = tg.build_optimizers(h, model, 0, 1)
    loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, 0, 1, torch.device("cpu"))
    tg.train_step(h, cpu_runtime(), model, optimizers, loader, 0, 1.0, progress=0.85)
    assert optimizers[0].param_groups[0]["weight_decay"] == pytest.approx(0.075)


def test_progressive_context_picks_the_length_by_progress_at_constant_tokens_per_step():
    h = tiny_hparams(train_seq_len=64, train_seq_schedule="16:0,32:0.3,64:0.6")
    assert [tg.seq_len_at(h, p) for p in (0.0, 0.29, 0.3, 0.59, 0.6, 1.0)] == [16, 16, 32, 32, 64, 64]
    model = tiny_model(h, randomize=False)
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    optimizers = tg.build_optimizers(h, model, 0, 1)
    loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, 0, 1, torch.device("cpu"))
    for progress in (0.1, 0.5, 0.9):
        tg.train_step(h, cpu_runtime(), model, optimizers, loader, 0, 1.0, progress)
    per_slice = h.train_batch_tokens // tg.SLICES_PER_STEP
    assert sorted(set(shapes)) == [(per_slice // 64, 64), (per_slice // 32, 32), (per_slice // 16, 16)]
    assert model.blocks[0].attn.rotary.cos.shape[2] >= 64


@pytest.mark.parametrize("env, words", [
    ({"TRAIN_SEQ_SCHEDULE": "64:0.1,128:0.5"}, "ascending from 0"), ({"TRAIN_SEQ_SCHEDULE": "64:0,32:0.5"}, "last"),
    ({"TRAIN_SEQ_SCHEDULE": "24:0,128:0.5"}, "dividing"), ({"TRAIN_SEQ_SCHEDULE": "64"}, "LEN:FRAC"),
    ({"TRAIN_SEQ_SCHEDULE": "64:0,128:1"}, "below 1"), ({"WARMDOWN_FRAC": "0.5"}, "WARMDOWN_ITERS=0"),
    ({"RECUR_REPEATS": "0"}, "RECUR_REPEATS"), ({"RECUR_IN_UNET": "1", "RECUR_BLOCKS": ""}, "RECUR_BLOCKS"),
    ({"LANE_FORMULA": "both"}, "parallel"),
])
def test_stack_settings_are_checked_at_start(env, words):
    with pytest.raises(tg.RunError) as error:
        preset("smoke", **env)
    assert words in str(error.value), str(error.value)


def test_sp8192_preset_shape_and_schedule():
    h = preset("sp8192")
    assert (h.vocab_size, h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_mult) == (8192, 11, 512, 8, 4, 4)
    assert (h.bigram_vocab_size, h.ve_layers, h.xsa_last_n, h.rope_dims, h.qk_gain_init) == (0, "", 11, 16, 5.0)
    with torch.device("meta"):
        model = tg.GPT(h)
    model.start_recurrence()
    assert len(model.block_schedule()) == 17
    assert [w for _, w, _ in model.block_schedule()][:12] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5]
    assert [i for i, b in enumerate(model.blocks) if b.lane_parallel] == [8, 9, 10]


def test_sp8192_full_size_parameter_count_from_the_shapes():
    """Counted from the stack's shapes. The 1.0611 record logs model_params:35945671: this count plus
    its sparse attention gates (11 x 8 x 12) and input-dependent SmearGate (12 + 1), both added by the
    gates branch, and lane scalars for blocks 0-7 that its forward never reads (8 x 6), less our
    per-channel SmearGate (512), which the gates branch's replaces."""
    h = preset("sp8192")
    d, heads, kv, hidden, vocab = 512, 8, 4 * 64, 4 * 512, 8192
    attention = 2 * d * d + 2 * d * kv + heads
    block = attention + 2 * d * hidden + 4 * d  # + attn/mlp output scales, x0 mix (2 x d)
    lanes = 3 * (2 * 2 + 2)  # blocks 8-10: write (2 x 2) and keep (2)
    skips = (17 // 2) * d * 2  # weights and gates for the 8 pairs of the 17-position U-Net
    expected = vocab * d + d + 11 * block + lanes + skips
    with torch.device("meta"):
        count = sum(p.numel() for p in tg.GPT(h).parameters())
    assert count == expected
    assert count + 11 * 8 * 12 + 13 + 8 * 6 - 512 == 35_945_671


def test_sp8192_partitions_every_parameter_once_for_optimizers_and_quantization():
    h = preset("sp8192")
    with torch.device("meta"):
        model = tg.GPT(h)
    names = sorted(n for n, _ in model.named_parameters())
    groups = tg.partition(list(model.named_parameters()), tg.optimizer_rules(h), "optimizer_rules")
    assert sorted(n for members in groups.values() for n, _ in members) == names
    assert sorted(tg.quant_plan(model.state_dict(), h)) == names


STACK_ON_SMOKE = {"NUM_LAYERS": "4", "RECUR_BLOCKS": "1,2", "RECUR_REPEATS": "2", "RECUR_IN_UNET": "1",
                  "RECUR_START_FRAC": "0.5", "LANES_FROM": "3", "LANE_FORMULA": "parallel", "SKIP_GATES": "1",
                  "BIGRAM_VOCAB_SIZE": "0", "WARMDOWN_ITERS": "0", "WARMDOWN_FRAC": "0.85", "LR_FLOOR": "0.1",
                  "MUON_WD_TAPER": "0.5", "TRAIN_SEQ_LEN": "128", "TRAIN_SEQ_SCHEDULE": "32:0,64:0.3,128:0.6",
                  "ITERATIONS": "24", "VAL_LOSS_EVERY": "0", "VAL_TOKENS": "8192", "EVAL_STRIDE": "0",
                  "GPTQ_CALIB_TOKENS": "4096", "WARMUP_STEPS": "3"}


@pytest.mark.slow
def test_compiled_run_with_loops_and_progressive_context_compiles_nothing_in_the_loop(run_script):
    # The timed loop runs under set_stance("fail_on_recompile"): every (length, recurrence) graph must
    # come from warm-up. The switches happen inside the loop: lengths at steps 9 and 16, loops at 13.
    run = run_script({"COMPILE": "1", **STACK_ON_SMOKE}, timeout=1500)
    assert run.returncode == 0, run.explain()
    assert "compile:True" in run.body
    lengths = re.findall(r"^train_seq_len:(\d+) from step (\d+)", run.body, re.M)
    assert [n for n, _ in lengths] == ["64", "128"], lengths
    switch = re.search(r"^recurrence: blocks 1,2 run 3 times from step (\d+)", run.body, re.M)
    assert switch and 1 < int(switch[1]) < 24, run.body[-2000:]
    assert "final_roundtrip " in run.body
