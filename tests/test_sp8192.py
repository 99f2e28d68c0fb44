# PRESET=sp8192, the 1.06 stack (issue 15): python3 -m pytest -q tests/test_sp8192.py
"""Each piece's defining property, on tiny seeded CPU models, in blocks by area."""

import re

import pytest
import torch

import train_gpt as tg
from conftest import assert_causal_and_fully_trained, cpu_runtime, tiny_hparams, tiny_model

V = 1024


# ----------------------------------------------------------------------------- gates and attention within
# documents (DOC_ATTENTION, ATTN_GATE_WINDOW, SMEAR_WINDOW; skip gates as SKIP_GATES already has them)


def every_gate_on(**overrides) -> tg.Hyperparameters:
    """The 1.06 stack's gates with within-document attention, at toy size, among the mechanics they
    run with: loops, two lanes (the read formula), XSA everywhere, partial RoPE, no BigramHash."""
    knobs = dict(num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, bigram_vocab_size=0,
                 doc_attention=True, attn_gate_window=12, smear_mode="scalar", smear_window=12, skip_gates=True,
                 recur_blocks="2,3", lanes_from=4, lane_formula="read", xsa_last_n=6, rope_dims=8, ln_scale=True,
                 mlp_negative_slope=0.5)
    return tiny_hparams(**{**knobs, **overrides})


def two_documents(length: int = 40, second: int = 17, seed: int = 0) -> torch.Tensor:
    """(2, length) tokens: a BOS at 0 and at `second`, plain tokens elsewhere."""
    x = torch.randint(4, V, (2, length), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = x[:, second] = tg.BOS_ID
    return x


def test_document_mask_is_causal_attention_within_each_document():
    tokens = two_documents(12, 5)[:1]
    tokens[0, 9] = tg.BOS_ID
    mask = tg.document_mask(tokens)[0, 0]
    doc = [0] * 5 + [1] * 4 + [2] * 3
    expected = torch.tensor([[s <= t and doc[s] == doc[t] for s in range(12)] for t in range(12)])
    assert torch.equal(mask, expected)
    one_document = torch.randint(4, V, (2, 12))  # no BOS: the whole row is one document, plain causal
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    torch.testing.assert_close(tg.causal_attention(q, k, v, mask=tg.document_mask(one_document)),
                               tg.causal_attention(q, k, v), rtol=0, atol=1e-6)


def test_with_every_piece_on_no_token_sees_another_document_and_each_is_causal():
    model = tiny_model(every_gate_on())
    model.start_recurrence()
    x = two_documents()
    other = x.clone()
    other[:, 1:17] = (x[:, 1:17] + 101 - 4) % (V - 4) + 4  # the first document changed, the second not
    with torch.no_grad():
        a, b = model(x), model(other)
    torch.testing.assert_close(a[:, 17:], b[:, 17:], rtol=0, atol=1e-5)
    assert (a[:, 1:17] - b[:, 1:17]).abs().max() > 1e-3, "control: the changed document's logits change"
    assert_causal_and_fully_trained(model)  # causality (within the one document of a BOS-free row)
    later = x.clone()
    later[:, 30] = (x[:, 30] + 7 - 4) % (V - 4) + 4
    with torch.no_grad():
        c = model(later)
    torch.testing.assert_close(a[:, :30], c[:, :30], rtol=0, atol=1e-5)


def test_without_doc_attention_the_documents_do_see_each_other():
    model = tiny_model(every_gate_on(doc_attention=False))
    x = two_documents()
    other = x.clone()
    other[:, 1:17] = (x[:, 1:17] + 101 - 4) % (V - 4) + 4
    with torch.no_grad():
        assert (model(x)[:, 17:] - model(other)[:, 17:]).abs().max() > 1e-3


def test_evaluation_windows_are_within_documents_too():
    """The stream and sliding evaluations call the same forward: a document's losses do not depend on
    the document before it in the window (decision: DOC_ATTENTION holds in every forward pass)."""
    model = tiny_model(every_gate_on())
    x = two_documents(48, 20)
    other = x.clone()
    other[:, 1:20] = (x[:, 1:20] + 55 - 4) % (V - 4) + 4
    with torch.no_grad():
        a = model(x[:, :-1], x[:, 1:], reduction="none")
        b = model(other[:, :-1], other[:, 1:], reduction="none")
    torch.testing.assert_close(a[:, 20:], b[:, 20:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["flash", "fa3", "fa4"])
def test_doc_attention_refuses_a_kernel_without_a_mask(backend):
    with pytest.raises(tg.RunError) as error:
        tg.hyperparameters_from_env({"PRESET": "smoke", "DOC_ATTENTION": "1", "ATTN_BACKEND": backend}, False)
    message = str(error.value)
    assert "DOC_ATTENTION" in message and f"ATTN_BACKEND={backend}" in message and "\n" not in message


def test_the_kernel_report_runs_the_masked_attention():
    h = tiny_hparams(doc_attention=True)
    assert "within documents" in tg.attention_kernel_report(h, cpu_runtime())


def test_sparse_attention_gate_multiplies_each_head_by_a_sigmoid_of_the_first_channels():
    h = tiny_hparams(model_dim=32, num_heads=4, num_kv_heads=2, attn_gate_window=12)
    torch.manual_seed(0)
    gated, plain = tg.Attention(h, 64), tg.Attention(tiny_hparams(model_dim=32, num_heads=4, num_kv_heads=2), 64)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate"})
    x, q_gain, xsa = torch.randn(2, 10, 32), torch.full((4,), 1.5), tg.remove_self_value
    assert not gated.gate.any(), "zero-initialised"
    torch.testing.assert_close(gated(x, q_gain, xsa), 0.5 * plain(x, q_gain, xsa), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        gated.gate.normal_()
    seen = {}
    for name, module in (("gated", gated), ("plain", plain)):  # the projection's input: heads after attention and XSA
        module.proj.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
        module(x, q_gain, xsa)
    multiplier = torch.sigmoid(0.5 * x[..., :12] @ gated.gate.T)  # (B, T, H)
    expected = seen["plain"].view(2, 10, 4, 8) * multiplier[..., None]
    torch.testing.assert_close(seen["gated"].view(2, 10, 4, 8), expected, rtol=1e-5, atol=1e-6)
    x_far = x.clone()
    x_far[..., 12:] += 1.0  # channels past the window change attention, not the multiplier
    seen.clear()
    gated(x_far, q_gain, xsa), plain(x_far, q_gain, xsa)
    torch.testing.assert_close(seen["gated"].view(2, 10, 4, 8), seen["plain"].view(2, 10, 4, 8) * multiplier[..., None],
                               rtol=1e-5, atol=1e-6)


def test_smear_window_gate_reads_the_first_channels_and_never_crosses_a_bos():
    smear = tg.SmearGate(32, "scalar", window=12)
    x = torch.randn(1, 8, 32)
    tokens = torch.randint(4, V, (1, 8))
    tokens[0, 5] = tg.BOS_ID
    assert smear.gate.shape == (12,) and torch.equal(smear(x, tokens), x), "zero-initialised: the identity"
    with torch.no_grad():
        smear.strength.fill_(0.7)
        smear.gate.normal_()
    out = smear(x, tokens)[0]
    weight = 0.7 * torch.sigmoid(x[0, :, :12] @ smear.gate)
    weight[0] = weight[5] = 0  # the row's first position and the BOS have no same-document predecessor
    expected = x[0] + weight[:, None] * torch.cat((torch.zeros(1, 32), x[0, :-1]))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[5], x[0, 5]), "the BOS is not smeared"


def test_skip_gates_are_frontiers_sigmoid_gated_skip():
    """SKIP_GATES (PR #1204's lerp) is FRONTIER's x <- s x + (1 - s)(w skip), s = sigmoid(g): one function."""
    model = tiny_model(tiny_hparams(skip_gates=True, num_layers=4), randomize=False)
    x, skip = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    torch.testing.assert_close(model.skip(x, skip, 0), 0.5 * x + 0.5 * skip, rtol=0, atol=1e-6)  # w = 1, g = 0
    with torch.no_grad():
        model.skip_weights.normal_()
        model.skip_gates.normal_()
    s, w = torch.sigmoid(model.skip_gates[1]), model.skip_weights[1]
    torch.testing.assert_close(model.skip(x, skip, 1), s * x + (1 - s) * (w * skip), rtol=1e-6, atol=1e-6)


def test_every_new_tensor_is_in_one_optimizer_group_and_one_quantization_class():
    h = every_gate_on()
    model = tiny_model(h, randomize=False)
    groups = tg.partition(list(model.named_parameters()), tg.optimizer_rules(h), "optimizer_rules")
    group_of = {name: group for group, members in groups.items() for name, _ in members}
    plan = tg.quant_plan(model.state_dict(), h)
    new = [n for n, _ in model.named_parameters() if n.endswith("attn.gate") or n.startswith("smear.")]
    assert len(new) == 6 + 2 and sorted(group_of) == sorted(plan)
    assert all(group_of[n] == "adam_scalar" and plan[n] == "fp16" for n in new), {n: (group_of[n], plan[n]) for n in new}


def test_the_knobs_off_add_no_tensors():
    names = lambda h: sorted(n for n, _ in tiny_model(h, randomize=False).named_parameters())
    on = every_gate_on()
    off = every_gate_on(doc_attention=False, attn_gate_window=0, smear_window=0)
    assert set(names(on)) - set(names(off)) == {f"blocks.{i}.attn.gate" for i in range(6)}
    assert tiny_model(off).smear.gate.numel() == 64


def test_smear_zero_start_with_the_scalar_gate_is_refused():
    """SMEAR_ZERO_START acts in channel mode only: set with the scalar gate it would silently do nothing."""
    with pytest.raises(tg.RunError) as error:
        tg.hyperparameters_from_env({"PRESET": "frontier", "SMEAR_MODE": "scalar"}, False)
    assert "SMEAR_ZERO_START" in str(error.value)


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
    assert [s.block for s in model.plan()] == list(range(7)), "before the switch"
    model.start_recurrence()
    assert [(s.controls, s.block) for s in model.plan()] == [
        (0, 0), (1, 1), (2, 2), (3, 3), (2, 2), (3, 3), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]
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
    assert [s.block for s in model.plan()] == [0, 1, 2, 1, 2, 3]
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
    assert start.route is tg.parallel_lanes and torch.equal(start.lane_keep.detach(), torch.full((2,), 1.1))
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
    optimizers = tg.build_optimizers(h, cpu_runtime(), model)
    loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, cpu_runtime())
    tg.train_step(h, cpu_runtime(), model, optimizers, loader, 0, 1.0, progress=0.85)
    assert optimizers[0].param_groups[0]["weight_decay"] == pytest.approx(0.075)


def test_progressive_context_picks_the_length_by_progress_at_constant_tokens_per_step():
    h = tiny_hparams(train_seq_len=64, train_seq_schedule="16:0,32:0.3,64:0.6")
    assert [tg.seq_len_at(h, p) for p in (0.0, 0.29, 0.3, 0.59, 0.6, 1.0)] == [16, 16, 32, 32, 64, 64]
    model = tiny_model(h, randomize=False)
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    optimizers = tg.build_optimizers(h, cpu_runtime(), model)
    loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, cpu_runtime())
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
    assert len(model.plan()) == 17
    assert [s.block for s in model.plan()][:12] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5]
    assert [i for i, b in enumerate(model.blocks) if b.route is tg.parallel_lanes] == [8, 9, 10]


def test_sp8192_full_size_parameter_count_from_the_shapes():
    """Counted from the stack's shapes. The 1.0611 record logs model_params:35945671: this count plus
    the lane scalars of blocks 0-7 that its forward never reads (8 x 6)."""
    h = preset("sp8192")
    d, heads, kv, hidden, vocab = 512, 8, 4 * 64, 4 * 512, 8192
    attention = 2 * d * d + 2 * d * kv + heads + heads * 12  # + q gain, the output gate on 12 channels
    block = attention + 2 * d * hidden + 4 * d  # + attn/mlp output scales, x0 mix (2 x d)
    lanes = 3 * (2 * 2 + 2)  # blocks 8-10: write (2 x 2) and keep (2)
    skips = (17 // 2) * d * 2  # weights and gates for the 8 pairs of the 17-position U-Net
    smear = 12 + 1  # the SmearGate's weights on 12 channels and its strength
    expected = vocab * d + smear + 11 * block + lanes + skips
    with torch.device("meta"):
        count = sum(p.numel() for p in tg.GPT(h).parameters())
    assert count == expected
    assert count + 8 * 6 == 35_945_671


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
                  "MUON_WD_TAPER": "0.5", "TRAIN_SEQ_LEN": "128", "TRAIN_SEQ_SCHEDULE": "64:0,128:0.3",
                  "ITERATIONS": "24", "VAL_LOSS_EVERY": "0", "VAL_TOKENS": "8192", "EVAL_STRIDE": "0",
                  "GPTQ_CALIB_TOKENS": "4096", "WARMUP_STEPS": "3", "SMEAR_MODE": "scalar", "SMEAR_WINDOW": "12",
                  "ATTN_GATE_WINDOW": "12", "DOC_ATTENTION": "1", "MUON_NS": "polar_express"}


@pytest.mark.slow
def test_compiled_run_with_loops_and_progressive_context_compiles_nothing_in_the_loop(run_script):
    # The timed loop runs under set_stance("fail_on_recompile"): every (length, recurrence) graph must
    # come from warm-up, with the gates and within-document attention on. The switches happen inside
    # the loop: the length at step 9, the loops at 13. (Two lengths, not three: each adds two graphs.)
    run = run_script({"COMPILE": "1", **STACK_ON_SMOKE}, timeout=1500)
    assert run.returncode == 0, run.explain()
    assert "compile:True" in run.body
    lengths = re.findall(r"^train_seq_len:(\d+) from step (\d+)", run.body, re.M)
    assert [n for n, _ in lengths] == ["128"], lengths
    switch = re.search(r"^recurrence: blocks 1,2 run 3 times from step (\d+)", run.body, re.M)
    assert switch and 1 < int(switch[1]) < 24, run.body[-2000:]
    assert "final_roundtrip " in run.body


# ============================================================================= the record's optimizer details
# (MUON_NS=polar_express, EMBED_WD; the peer port of PR #1855 found both)


def test_polar_express_takes_one_triple_per_step_and_orthogonalizes_tighter():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 512, generator=g)
    one = tg.orthogonalize(x, 1, "polar_express").float()
    y = x.bfloat16()
    y = y / (y.norm() + 1e-7)
    a, b, c = tg.NEWTON_SCHULZ_COEFFS["polar_express"][0]
    gram = y @ y.mT
    torch.testing.assert_close(one, (a * y + (b * gram + c * gram @ gram) @ y).float(), rtol=0, atol=0)
    assert not torch.equal(tg.orthogonalize(x, 2, "polar_express"),
                           tg.orthogonalize(tg.orthogonalize(x, 1, "polar_express"), 1, "polar_express")), \
        "the second step uses the second triple, not the first again"
    polar = torch.linalg.svdvals(tg.orthogonalize(x, 5, "polar_express").float())
    quintic = torch.linalg.svdvals(tg.orthogonalize(x, 5, "quintic").float())
    assert polar.min() > 0.8 > 0.75 > quintic.min(), (polar.min(), quintic.min())
    assert polar.max() < 1.2


def test_muon_uses_the_chosen_coefficients_and_embed_wd_decays_only_the_embedding():
    h = tiny_hparams(muon_ns="polar_express", adam_wd=0.02, embed_wd=0.085)
    muon, embed, scalar = tg.build_optimizers(h, cpu_runtime(), tiny_model(h))
    assert muon.param_groups[0]["coeffs"] == "polar_express"
    assert embed.param_groups[0]["weight_decay"] == 0.085 and scalar.param_groups[0]["weight_decay"] == 0.02
    h = tiny_hparams(adam_wd=0.04)  # EMBED_WD unset (-1): ADAM_WD for both, as before
    _, embed, scalar = tg.build_optimizers(h, cpu_runtime(), tiny_model(h))
    assert embed.param_groups[0]["weight_decay"] == scalar.param_groups[0]["weight_decay"] == 0.04
