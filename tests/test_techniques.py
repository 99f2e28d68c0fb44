# The defining property of each post-seed technique (PR #315 and later records): python3 -m pytest -q tests/test_techniques.py

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import assert_causal_and_fully_trained, tiny_hparams, tiny_model

V = 1024


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def all_techniques(**overrides) -> tg.Hyperparameters:
    """A tiny model with every technique on: 4 layers, head dim 16, blocks 1-2 repeated, lanes from 3."""
    return tiny_hparams(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=4, rope_dims=8,
                        ln_scale=True, mlp_negative_slope=0.5, lanes_from=3, recur_blocks="1,2", qat_bits=6,
                        **overrides)


def capture(module: torch.nn.Module, pre: bool = False):
    """Registers a hook that appends the module's input (pre=True) or output to the returned list."""
    seen = []
    if pre:
        module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    else:
        module.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    return seen


# ----------------------------------------------------------------------------- XSA


@pytest.mark.parametrize("xsa", [True, False])
def test_xsa_output_is_orthogonal_to_each_tokens_own_value_per_head(xsa):
    h = tiny_hparams(model_dim=64, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    attn = tg.Attention(h, max_len=32)
    values, mixed = capture(attn.c_v), capture(attn.proj, pre=True)
    B, T = 2, 20
    with torch.no_grad():
        attn(torch.randn(B, T, 64), torch.full((4,), 1.5), tg.remove_self_value if xsa else tg.unchanged)
    head_dim, group = 16, 2
    v = values[0].view(B, T, 2, head_dim)  # (B, T, Hkv, hd)
    y = mixed[0].view(B, T, 4, head_dim)  # (B, T, H, hd): query head h reads kv head h // group
    vhat = F.normalize(v, dim=-1).repeat_interleave(group, dim=2)
    along_own_value = (y * vhat).sum(-1).abs()
    if xsa:
        assert along_own_value.max().item() < 1e-5, "XSA left a component along the token's own value"
    else:
        assert along_own_value.max().item() > 1e-2, "control: plain attention output has such a component"


# ----------------------------------------------------------------------------- partial RoPE


def test_partial_rope_rotates_only_the_first_dims_with_frequencies_over_them():
    partial, full_of_those = tg.Rotary(8, max_len=16, base=10000.0), tg.Rotary(8, max_len=16, base=10000.0)
    x = torch.randn(2, 3, 16, 32)  # (B, heads, T, head_dim 32)
    out = partial(x)
    assert torch.equal(out[..., 8:], x[..., 8:]), "dims past ROPE_DIMS must carry no position"
    torch.testing.assert_close(out[..., :8], full_of_those(x[..., :8].contiguous()), rtol=0, atol=0)
    assert (out[:, :, 1:, :8] - x[:, :, 1:, :8]).abs().max() > 1e-3, "the first dims must be rotated"
    assert torch.equal(out[:, :, 0], x[:, :, 0]), "position 0 is rotated by angle 0"
    # RoPE's point: the score of rotated q at i and k at j depends only on i - j.
    q, k = torch.randn(8), torch.randn(8)
    rotated = lambda vec: partial(vec.expand(1, 1, 16, 8).contiguous())[0, 0]  # noqa: E731
    rq, rk = rotated(q), rotated(k)
    torch.testing.assert_close(rq[5] @ rk[2], rq[12] @ rk[9], rtol=1e-5, atol=1e-5)


def test_rope_dims_zero_rotates_the_whole_head():
    h = tiny_hparams(model_dim=64, num_heads=4, rope_dims=0)
    assert tg.Attention(h, 32).rotary.dims == 16
    assert tg.Attention(tiny_hparams(model_dim=64, num_heads=4, rope_dims=4), 32).rotary.dims == 4


# ----------------------------------------------------------------------------- LN scale


def test_ln_scale_multiplies_each_blocks_normalized_inputs_by_one_over_sqrt_depth():
    for ln_scale in (True, False):
        model = tiny_model(tiny_hparams(num_layers=4, ln_scale=ln_scale))
        seen = [(capture(b.attn.c_q, pre=True), capture(b.mlp.fc, pre=True)) for b in model.blocks]
        with torch.no_grad():
            model(random_tokens(2, 16))
        for index, (attn_in, mlp_in) in enumerate(seen):
            expected = (index + 1) ** -0.5 if ln_scale else 1.0
            for x in (attn_in[0], mlp_in[0]):
                rms = x.square().mean(-1).sqrt()
                torch.testing.assert_close(rms, torch.full_like(rms, expected), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- LeakyReLU(0.5)^2


@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_mlp_activation_is_leaky_relu_squared(slope):
    torch.manual_seed(0)
    mlp = tg.MLP(tiny_hparams(mlp_negative_slope=slope))
    torch.nn.init.normal_(mlp.proj.weight)
    x = torch.randn(3, 32)
    z = x @ mlp.fc.weight.T
    by_hand = torch.where(z > 0, z, slope * z).square() @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(x), by_hand, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- depth recurrence


def block_calls(model: tg.GPT, tokens: torch.Tensor) -> list[int]:
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: calls.__setitem__(i, calls[i] + 1))
    with torch.no_grad():
        model(tokens)
    return calls


def test_recurrence_runs_the_named_blocks_twice_and_no_others_once_active():
    model = tiny_model(tiny_hparams(num_layers=6, recur_blocks="2,3"))
    assert block_calls(model, random_tokens(1, 8)) == [1] * 6, "off until the training loop switches it on"
    model.recur_active = True
    assert [s.block for s in model.plan()] == [0, 1, 2, 3, 2, 3, 4, 5]
    assert [s.controls for s in model.plan()] == [0, 1, 2, 3, 2, 3, 4, 5], "controls follow the block"
    assert block_calls(model, random_tokens(1, 8)) == [1, 1, 2, 2, 1, 1]


def test_recurrence_changes_the_output_and_shares_weights():
    h = tiny_hparams(num_layers=4, recur_blocks="1,2")
    model, plain = tiny_model(h), tiny_model(tiny_hparams(num_layers=4))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()], "no extra weights"
    tokens = random_tokens(2, 12)
    with torch.no_grad():
        before = model(tokens)
        model.recur_active = True
        after = model(tokens)
    assert (before - after).abs().max() > 1e-4


def test_recurrence_settings_are_validated():
    for bad in ("1,3", "2,1", "9", "a"):
        with pytest.raises(tg.RunError, match="RECUR_BLOCKS"):
            tiny_hparams(num_layers=4, recur_blocks=bad)
    with pytest.raises(tg.RunError, match="LANES_FROM"):
        tiny_hparams(num_layers=4, recur_blocks="1,2", lanes_from=2)


# ----------------------------------------------------------------------------- parallel residual lanes


def test_lanes_at_their_initial_values_compute_exactly_one_stream():
    h_lanes, h_plain = tiny_hparams(num_layers=4, lanes_from=2), tiny_hparams(num_layers=4)
    lanes, plain = tiny_model(h_lanes, randomize=False), tiny_model(h_plain, randomize=False)
    shared = {n: p for n, p in plain.state_dict().items()}
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.add_(0.2 * torch.randn_like(p))
        lanes.load_state_dict({**lanes.state_dict(), **shared}, strict=True)
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(lanes(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    assert [b.lanes for b in lanes.blocks] == [1, 1, 2, 2]

    # Once the routing moves off its initial value, the two lanes differ and the output changes.
    loss = lanes(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert lanes.blocks[3].lane_write.grad.abs().sum() > 0 and lanes.blocks[2].lane_keep.grad.abs().sum() > 0
    with torch.no_grad():
        lanes.blocks[2].lane_write[1, 0] = 0.0  # the MLP stops writing into the attention lane
        assert (lanes(tokens) - plain(tokens)).abs().max() > 1e-4


# ----------------------------------------------------------------------------- LR floor


def test_lr_floor_bounds_the_warmdown():
    h = tiny_hparams(iterations=100, warmdown_iters=50, lr_floor=0.1, max_wallclock_seconds=0.0)
    scales = [tg.lr_scale(h, step, 0.0) for step in range(101)]
    assert min(scales) == pytest.approx(0.1) and scales[-1] == pytest.approx(0.1)
    assert scales[:50] == [1.0] * 50 and scales[75] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- fake quantization (PR #192)


def test_qat_forward_uses_the_exports_rounding_with_a_straight_through_gradient():
    torch.manual_seed(0)
    layer = tg.Linear(32, 16, qat_bits=6)
    x = torch.randn(5, 32)
    q, scale = tg.quantize_rows(layer.weight.detach(), 6, clip_search=False)
    exported = tg.dequantize_rows(q, scale)
    out = layer(x)
    torch.testing.assert_close(out, x @ exported.T, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    leaf = exported.clone().requires_grad_()
    straight_through = torch.autograd.grad((x @ leaf.T).square().sum(), leaf)[0]
    torch.testing.assert_close(layer.weight.grad, straight_through, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight.T, rtol=0, atol=0, msg="evaluation sees w itself")


# ----------------------------------------------------------------------------- PR #192's SmearGate


def test_scalar_smear_gate_starts_as_the_identity_and_adds_the_gated_previous_token():
    smear = tg.SmearGate(8, "scalar")
    x, tokens = torch.randn(1, 6, 8), random_tokens(1, 6)
    assert torch.equal(smear(x, tokens), x)
    with torch.no_grad():
        smear.strength.fill_(0.7)
        smear.gate.normal_()
    gate = 0.7 * torch.sigmoid(x[0] @ smear.gate)
    expected = x[0].clone()
    expected[1:] += gate[1:, None] * x[0, :-1]
    torch.testing.assert_close(smear(x, tokens)[0], expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- everything at once


def test_every_technique_together_trains_and_keeps_causality():
    model = tiny_model(all_techniques())
    model.recur_active = True
    assert_causal_and_fully_trained(model)
