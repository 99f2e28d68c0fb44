# The defining property of each PR #1204 knob (PRESET=pr1204): python3 -m pytest -q tests/test_pr1204.py

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import assert_causal_and_fully_trained, cpu_runtime, tiny_hparams, tiny_model

V = 1024


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def record_like(**overrides) -> tg.Hyperparameters:
    """PR #1204's mechanics at toy size: 6 blocks, 2 and 3 repeated (8 positions), lanes from 4."""
    knobs = dict(num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, recur_blocks="2,3", virtual_depth=True,
                 recur_untie_mlp=True, first_block_mlp_only=True, ve_layers="6,7", ve_dim=16, skip_gates=True,
                 lanes_from=4, lane_formula="read", smear_zero_start=True, xsa_last_n=6, rope_dims=8, ln_scale=True,
                 rope_ntk_len=16, mlp_negative_slope=0.5, bigram_proj_adam=True, bigram_proj_gain=1.0)
    return tiny_hparams(**{**knobs, **overrides})


def switched_on(model: tg.GPT) -> tg.GPT:
    model.start_recurrence()
    return model


# ----------------------------------------------------------------------------- virtual depth


def test_virtual_depth_runs_each_position_with_its_own_controls_and_the_blocks_weights():
    model = tiny_model(record_like())
    assert len(model.blocks) == 8 and all(b.attn is None and b.mlp is None for b in model.blocks[6:])
    assert [(s.controls, s.block) for s in model.plan()] == [(i, i) for i in range(6)], "before the switch"
    model.start_recurrence()
    assert [(s.controls, s.block, s.mlp) for s in model.plan()] == [
        (0, 0, None), (1, 1, None), (2, 2, None), (3, 3, None), (4, 2, 0), (5, 3, 1), (6, 4, None), (7, 5, None)]
    # Position 4 (the repeat of block 2) reads its input scaled by 1/sqrt(4 + 1): block 4's LN factor.
    seen = []
    model.repeat_mlps[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(random_tokens(2, 12))
    rms = seen[0].square().mean(dim=-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 5 ** -0.5), rtol=1e-4, atol=1e-4)
    # Block 4's scalars act at position 4: zeroing its MLP scale removes the repeat's MLP output.
    tokens = random_tokens(2, 12)
    with torch.no_grad():
        before = model(tokens)
        model.blocks[4].mlp_scale.zero_()
        assert (model(tokens) - before).abs().max() > 1e-4


def test_virtual_depth_counts_xsa_and_the_unet_over_the_run_with_the_repeat():
    h = record_like(xsa_last_n=6)
    model = tiny_model(h)
    assert [b.xsa is tg.remove_self_value for b in model.blocks] == [False, False, True, True, True, True, True, True]
    assert model.skip_weights.shape == (4, h.model_dim), "8 positions: 4 encoder / 4 decoder pairs"
    tokens = random_tokens(1, 17, seed=3)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    used = model.skip_weights.grad.abs().sum(dim=1) > 0
    assert used.tolist() == [True, True, True, False], "before the switch: 6 blocks, 3 pairs"
    assert model.blocks[6].mlp_scale.grad is None and model.repeat_mlps[0].fc.weight.grad is None
    model.zero_grad(set_to_none=True)
    switched_on(model)(tokens[:, :-1], tokens[:, 1:]).backward()
    assert (model.skip_weights.grad.abs().sum(dim=1) > 0).all(), "after it: 8 positions, 4 pairs"
    assert model.skip_gates.grad.abs().sum(dim=1).gt(0).all()


# ----------------------------------------------------------------------------- the untied repeat MLP


def test_untied_repeat_starts_as_a_copy_so_the_switch_computes_the_tied_recurrence():
    h = record_like()
    untied = tiny_model(h)
    tied = tiny_model(tg.dataclasses.replace(h, recur_untie_mlp=False))
    tied.load_state_dict({k: v for k, v in untied.state_dict().items() if not k.startswith("repeat_mlps")},
                         strict=True)
    tokens = random_tokens(2, 12)
    assert not torch.equal(untied.repeat_mlps[0].fc.weight, untied.blocks[2].mlp.fc.weight)
    untied.start_recurrence()
    tied.recur_active = True
    assert torch.equal(untied.repeat_mlps[1].proj.weight, untied.blocks[3].mlp.proj.weight), "copied at the switch"
    with torch.no_grad():
        torch.testing.assert_close(untied(tokens), tied(tokens), rtol=0, atol=0)
        untied.repeat_mlps[0].fc.weight.mul_(1.5)  # from here the repeat's MLP is its own
        assert (untied(tokens) - tied(tokens)).abs().max() > 1e-4
        assert not torch.equal(untied.repeat_mlps[0].fc.weight, untied.blocks[2].mlp.fc.weight)
    untied.start_recurrence()  # already on: no second copy
    assert not torch.equal(untied.repeat_mlps[0].fc.weight, untied.blocks[2].mlp.fc.weight)


def test_muon_leaves_a_matrix_without_gradient_untouched():
    h = record_like()
    model = tiny_model(h)
    muon = tg.build_optimizers(h, cpu_runtime(), model)[0]
    before = model.repeat_mlps[0].fc.weight.detach().clone()
    tokens = random_tokens(2, 12)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    muon.step()  # weight decay on: a parameter it touched would shrink
    assert torch.equal(model.repeat_mlps[0].fc.weight, before)
    assert model.blocks[1].mlp.fc.weight.grad is not None


# ----------------------------------------------------------------------------- block 0 without attention


def test_first_block_mlp_only_mixes_no_positions():
    model = tiny_model(record_like())
    block = model.blocks[0]
    assert block.attn is None and not hasattr(block, "q_gain") and not hasattr(block, "attn_scale")
    x, x0 = torch.randn(1, 2, 10, 64), torch.randn(2, 10, 64)
    y = x.clone()
    y[:, :, 6] += 1.0
    with torch.no_grad():
        a, b = block(x, x0), block(y, x0)
    changed = (a - b).abs().amax(dim=(0, 1, 3)) > 0
    assert changed.tolist() == [t == 6 for t in range(10)], "a position-wise block: only position 6 moves"


# ----------------------------------------------------------------------------- value embeddings


def test_value_embedding_is_added_to_the_values_of_the_listed_positions_only(monkeypatch):
    h = record_like(ve_layers="1,6")
    model = switched_on(tiny_model(h))
    seen = []
    real = tg.causal_attention
    monkeypatch.setattr(tg, "causal_attention", lambda q, k, v, *rest: seen.append(v) or real(q, k, v, *rest))
    values = []
    for block in model.blocks[1:6]:
        block.attn.c_v.register_forward_hook(lambda m, args, out: values.append(out.detach()))
    tokens = random_tokens(2, 12)
    with torch.no_grad():
        model(tokens)
    # Attention runs at positions 1..7 (block 0 has none): 1, 2, 3, 4=2r, 5=3r, 6=block 4, 7=block 5.
    ve = model.value_embed(tokens)
    B, T = tokens.shape
    as_heads = lambda t: t.view(B, T, 2, 16).transpose(1, 2)  # noqa: E731
    for position, (v_seen, v_raw) in enumerate(zip(seen, values), start=1):
        if position in (1, 6):
            k = (1, 6).index(position)
            expected = as_heads(v_raw + ve * model.value_embed.position_scales[k])
        else:
            expected = as_heads(v_raw)
        torch.testing.assert_close(v_seen, expected, rtol=1e-6, atol=1e-6, msg=f"position {position}")
    assert model.value_embed.table.weight.shape == (V, 16) and model.value_embed.proj.weight.shape == (32, 16)
    assert tg.GPT(h).value_embed.scale.item() == pytest.approx(0.1), "the record starts it at 0.1"


def test_value_embedding_positions_are_validated():
    with pytest.raises(tg.RunError, match="VE_LAYERS"):
        record_like(ve_layers="8")  # 8 positions: 0..7
    with pytest.raises(tg.RunError, match="VE_LAYERS"):
        record_like(ve_layers="x")


# ----------------------------------------------------------------------------- gated skips


def test_gated_skip_is_a_lerp_between_the_weighted_skip_and_the_stream():
    model = tiny_model(record_like())
    x, s = torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    w, g = model.skip_weights[1].detach(), model.skip_gates[1].detach()
    with torch.no_grad():
        torch.testing.assert_close(model.skip(x, s, 1), w * s + torch.sigmoid(g) * (x - w * s))
        model.skip_gates.fill_(30.0)  # gate open: the stream passes, the skip is ignored
        torch.testing.assert_close(model.skip(x, s, 1), x, rtol=1e-6, atol=1e-6)
        model.skip_gates.fill_(-30.0)  # gate shut: the weighted skip replaces the stream
        torch.testing.assert_close(model.skip(x, s, 1), w * s, rtol=1e-6, atol=1e-6)
    assert not tg.GPT(record_like()).skip_gates.any(), "g starts at 0: an even blend"
    plain = tiny_model(tiny_hparams(num_layers=4))
    with torch.no_grad():
        torch.testing.assert_close(plain.skip(x[..., :32], s[..., :32], 0), x[..., :32] + plain.skip_weights[0] * s[..., :32])


# ----------------------------------------------------------------------------- the read-lane formula


@pytest.mark.parametrize("formula", ["read", "stream"])
def test_lane_formula_read_keeps_the_lanes_and_scales_both_once_per_sublayer(formula):
    model = tiny_model(record_like(lane_formula=formula))
    block = model.blocks[4]
    assert block.lanes == 2
    fresh = tg.GPT(record_like(lane_formula=formula)).blocks[4].lane_keep
    assert fresh.tolist() == pytest.approx([1.1 ** 0.5] * 2 if formula == "read" else [1.0, 1.0])
    x, x0 = torch.randn(2, 2, 6, 64), torch.randn(2, 6, 64)
    with torch.no_grad():
        block.attn_scale.zero_()
        block.mlp_scale.zero_()  # no sublayer output: only what the block does to the lanes is left
        out = block(x, x0)
        keep = block.lane_keep
        if formula == "read":  # the x0 mix is only read: lanes scaled by keep[0] then keep[1]
            torch.testing.assert_close(out, keep[0] * keep[1] * x, rtol=1e-6, atol=1e-6)
        else:  # the mix replaces both lanes, each scaled by its own keep
            mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
            torch.testing.assert_close(out, keep[:, None, None, None] * mixed, rtol=1e-6, atol=1e-6)


def test_lane_formula_read_sublayers_read_the_x0_mix_of_their_lane():
    model = tiny_model(record_like())
    block = model.blocks[5]
    seen = []
    block.attn.c_q.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    block.mlp.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    x, x0 = torch.randn(2, 2, 6, 64), torch.randn(2, 6, 64)
    with torch.no_grad():
        out = block(x, x0)
    mix = lambda lane: block.resid_mix[0] * lane + block.resid_mix[1] * x0  # noqa: E731
    torch.testing.assert_close(seen[0], F.rms_norm(mix(x[0]), (64,)) * block.norm_scale)
    a = block.attn_scale * block.attn(seen[0], block.q_gain, block.xsa)
    after_attn = block.lane_keep[0] * x + block.lane_write[0][:, None, None, None] * a
    torch.testing.assert_close(seen[1], F.rms_norm(mix(after_attn[1]), (64,)) * block.norm_scale)
    m = block.mlp_scale * block.mlp(seen[1])
    torch.testing.assert_close(out, block.lane_keep[1] * after_attn + block.lane_write[1][:, None, None, None] * m)


# ----------------------------------------------------------------------------- SmearGate, RoPE


def test_smear_zero_start_blends_a_documents_first_position_with_zero():
    smear = tg.SmearGate(8, "channel", zero_start=True)
    with torch.no_grad():
        smear.gate.normal_()
    x, tokens = torch.randn(1, 6, 8), random_tokens(1, 6)
    tokens[0, 3] = tg.BOS_ID
    g = torch.sigmoid(smear.gate)
    out = smear(x, tokens)[0]
    for t in range(6):
        prev = torch.zeros(8) if t in (0, 3) else x[0, t - 1]
        torch.testing.assert_close(out[t], x[0, t] + g * (prev - x[0, t]), msg=f"position {t}")
    plain = tg.SmearGate(8, "channel")
    with torch.no_grad():
        plain.gate.copy_(smear.gate)
    torch.testing.assert_close(plain(x, tokens)[0, 0], x[0, 0], msg="off: the first position is kept")


def test_rope_ntk_scales_the_base_past_its_length_only():
    rope = tg.Rotary(8, max_len=64, base=10000.0, ntk_len=16)
    plain = tg.Rotary(8, max_len=64, base=10000.0)
    for T in (16, 40):
        x = torch.randn(1, 1, T, 8)
        base = 10000.0 * (T / 16) ** (8 / 6) if T > 16 else 10000.0
        angles = torch.outer(torch.arange(T, dtype=torch.float32), 1.0 / base ** (torch.arange(0, 8, 2) / 8))
        x1, x2 = x[..., :4], x[..., 4:]
        expected = torch.cat((x1 * angles.cos() + x2 * angles.sin(), x2 * angles.cos() - x1 * angles.sin()), dim=-1)
        torch.testing.assert_close(rope(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(rope(x), plain(x)) == (T <= 16)
    # The record at 2048 with 16 rotated dims and its length of 1024: an effective base of ~22,082.
    assert 10000.0 * 2 ** (16 / 14) == pytest.approx(22082, abs=1)


# ----------------------------------------------------------------------------- everything, with the switch


def test_record_mechanics_keep_causality_and_train_every_parameter_once_switched():
    model = switched_on(tiny_model(record_like()))
    assert_causal_and_fully_trained(model)  # 24 > ROPE_NTK_LEN=16: the scaled rotary


def test_record_mechanics_need_recurrence():
    with pytest.raises(tg.RunError, match="VIRTUAL_DEPTH"):
        tiny_hparams(num_layers=4, virtual_depth=True)
    with pytest.raises(tg.RunError, match="LANE_FORMULA"):
        tiny_hparams(num_layers=4, lane_formula="both")
    with pytest.raises(tg.RunError, match="BIGRAM_PROJ_ADAM"):
        tiny_hparams(bigram_adam=True, bigram_proj_adam=True)
