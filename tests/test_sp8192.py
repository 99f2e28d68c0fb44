# The 1.06 stack's pieces (issue 15, PRESET=sp8192): python3 -m pytest -q tests/test_sp8192.py
"""Each piece's defining property on tiny seeded CPU models. One block per piece group; other
branches add their own blocks below."""

import pytest
import torch
import torch.nn.functional as F

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
    x, q_gain = torch.randn(2, 10, 32), torch.full((4,), 1.5)
    assert not gated.gate.any(), "zero-initialised"
    torch.testing.assert_close(gated(x, q_gain, True), 0.5 * plain(x, q_gain, True), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        gated.gate.normal_()
    seen = {}
    for name, module in (("gated", gated), ("plain", plain)):  # the projection's input: heads after attention and XSA
        module.proj.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
        module(x, q_gain, True)
    multiplier = torch.sigmoid(0.5 * x[..., :12] @ gated.gate.T)  # (B, T, H)
    expected = seen["plain"].view(2, 10, 4, 8) * multiplier[..., None]
    torch.testing.assert_close(seen["gated"].view(2, 10, 4, 8), expected, rtol=1e-5, atol=1e-6)
    x_far = x.clone()
    x_far[..., 12:] += 1.0  # channels past the window change attention, not the multiplier
    seen.clear()
    gated(x_far, q_gain, True), plain(x_far, q_gain, True)
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
