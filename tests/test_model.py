# Model properties on tiny seeded CPU models: python3 -m pytest -q tests/test_model.py
import math

import pytest
import torch

import train_gpt as tg
from conftest import tiny_hparams, tiny_model

V = 1024


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids in [4, V): no control token, so nothing is a document boundary unless we put a BOS."""
    return torch.randint(4, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-4


# The record's model, every later technique on at once (recurrence active), and PR #192's front end.
CONFIGS = {
    "pr76": {},
    "all_techniques": dict(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=4, rope_dims=8,
                           ln_scale=True, mlp_negative_slope=0.5, lanes_from=3, recur_blocks="1,2", qat_bits=6),
    "pr192_front_end": dict(bigram_vocab_size=0, smear_mode="scalar"),
}


def config_model(name: str) -> tg.GPT:
    model = tiny_model(tiny_hparams(**CONFIGS[name]))
    model.recur_active = True
    return model


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("k", [0, 7, 23])
def test_changing_a_token_never_changes_earlier_logits(k, config):
    model = config_model(config)
    x = random_tokens(2, 24)
    y = x.clone()
    y[:, k] = (x[:, k] + 17 - 4) % (V - 4) + 4
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=1e-6,
                               msg=f"logits before position {k} depend on the token at {k}")
    assert differs(a[:, k], b[:, k]), "the changed position itself should change (control)"
    if k + 3 < x.size(1):  # beyond SmearGate/BigramHash reach, only attention carries it forward
        assert differs(a[:, k + 3], b[:, k + 3]), "attention does not carry information forward (control)"


def test_changing_a_token_never_changes_earlier_per_token_losses():
    model = tiny_model()
    seq = random_tokens(2, 33, seed=1)
    k = 16  # seq[k] is input k and target k-1
    changed = seq.clone()
    changed[:, k] = (seq[:, k] + 5 - 4) % (V - 4) + 4
    with torch.no_grad():
        a = model(seq[:, :-1], seq[:, 1:], reduction="none")
        b = model(changed[:, :-1], changed[:, 1:], reduction="none")
    assert a.shape == (2, 32)
    torch.testing.assert_close(a[:, :k - 1], b[:, :k - 1], rtol=0, atol=1e-6,
                               msg=f"losses before target {k - 1} depend on token {k}")
    assert differs(a[:, k - 1], b[:, k - 1]), "the loss whose target changed should change (control)"


# ----------------------------------------------------------------------------- loss consistency


def test_mean_loss_equals_per_token_mean_equals_cross_entropy_by_hand():
    h = tiny_hparams()
    model = tiny_model(h)
    seq = random_tokens(3, 41, seed=2)
    x, y = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        logits = model(x)
        mean = model(x, y)
        per_token = model(x, y, reduction="none")
    assert logits.shape == (3, 40, V) and per_token.shape == (3, 40) and mean.dim() == 0
    by_hand = logits.logsumexp(-1) - logits.gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(per_token, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, per_token.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean, by_hand.mean(), rtol=1e-5, atol=1e-5)
    assert logits.abs().max().item() <= h.logit_softcap, "logits exceed the soft cap"


# ----------------------------------------------------------------------------- BOS boundaries


def front_end(model: tg.GPT, tokens: torch.Tensor) -> torch.Tensor:
    """The embedding front-end's output (token + BigramHash, then SmearGate), captured from a real
    forward pass with a hook, so this follows GPT.forward rather than re-implementing it."""
    captured = []
    handle = model.smear.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("boundary", [1, 9, 15])
def test_bigram_and_smear_do_not_carry_information_across_bos(boundary, config):
    model = config_model(config)
    tokens = random_tokens(2, 20, seed=3)
    tokens[:, boundary] = tg.BOS_ID
    previous_doc_changed = tokens.clone()
    previous_doc_changed[:, :boundary] = random_tokens(2, boundary, seed=4)
    a, b = front_end(model, tokens), front_end(model, previous_doc_changed)
    torch.testing.assert_close(a[:, boundary:], b[:, boundary:], rtol=0, atol=0,
                               msg="the previous document leaks into the front-end at or after a BOS")

    # Control: the same change without a BOS in between does reach position `boundary`.
    no_bos, no_bos_changed = tokens.clone(), previous_doc_changed.clone()
    no_bos[:, boundary] = no_bos_changed[:, boundary] = 500
    a, b = front_end(model, no_bos), front_end(model, no_bos_changed)
    assert differs(a[:, boundary], b[:, boundary]), "the front-end does not look at the previous token at all"


def test_smear_gate_alone_stops_at_bos():
    smear = tg.SmearGate(16, "channel")
    with torch.no_grad():
        smear.gate.normal_()
    x = torch.randn(1, 10, 16)
    tokens = random_tokens(1, 10, seed=5)
    tokens[0, 6] = tg.BOS_ID
    x_changed = x.clone()
    x_changed[:, :6] += 1.0
    torch.testing.assert_close(smear(x, tokens)[:, 6:], smear(x_changed, tokens)[:, 6:], rtol=0, atol=0)
    tokens[0, 6] = 500
    assert differs(smear(x, tokens)[:, 6], smear(x_changed, tokens)[:, 6]), "control: no BOS, so it smears"


def test_bigram_bucket_ids_in_range_and_reserved_bucket_exactly_at_document_starts():
    bigram = tg.BigramHash(tiny_hparams(bigram_vocab_size=257))
    tokens = torch.randint(0, V, (4, 300), generator=torch.Generator().manual_seed(6))
    tokens[:, 50::37] = tg.BOS_ID
    ids = bigram.bucket_ids(tokens)
    assert ids.shape == tokens.shape and ids.dtype == torch.int64
    assert ids.min().item() >= 0 and ids.max().item() < 257
    reserved = ids == 256
    first = tokens == tg.BOS_ID
    first[:, 0] = True
    assert torch.equal(reserved, first), "the reserved bucket must be used at position 0 and every BOS, and only there"
    # Both tokens of the pair matter: a unigram or a previous-token-only hash would fail this.
    prev = torch.arange(10, 110)
    pairs_varying_prev = bigram.bucket_ids(torch.stack((prev, torch.full_like(prev, 77)), dim=1))[:, 1]
    pairs_varying_cur = bigram.bucket_ids(torch.stack((torch.full_like(prev, 77), prev), dim=1))[:, 1]
    assert pairs_varying_prev.unique().numel() > 50 and pairs_varying_cur.unique().numel() > 50


# ----------------------------------------------------------------------------- RoPE and sequence lengths


@pytest.mark.parametrize("train_len, eval_len, expected", [(64, 96, 96), (64, 0, 64), (96, 32, 96)])
def test_rope_tables_are_sized_from_the_config(train_len, eval_len, expected):
    h = tiny_hparams(train_seq_len=train_len, eval_seq_len=eval_len, train_batch_tokens=8 * train_len)
    model = tg.GPT(h)
    for block in model.blocks:
        assert block.attn.rotary.cos.shape[-2] == expected and block.attn.rotary.sin.shape[-2] == expected


def test_model_trained_at_64_runs_at_eval_length_96_consistently():
    h = tiny_hparams(train_seq_len=64, eval_seq_len=96, train_batch_tokens=8 * 64)
    model = tiny_model(h)
    tokens = random_tokens(2, 96, seed=7)
    with torch.no_grad():
        long, short = model(tokens), model(tokens[:, :64])
    assert long.shape == (2, 96, V) and torch.isfinite(long).all()
    torch.testing.assert_close(long[:, :64], short, rtol=1e-5, atol=1e-5,
                               msg="the first 64 positions of a 96-token window must match a 64-token run")


# ----------------------------------------------------------------------------- initialization


def assert_orthogonal(w: torch.Tensor, gain: float, name: str) -> None:
    w = w.detach().double()
    gram = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
    torch.testing.assert_close(gram, gain ** 2 * torch.eye(gram.size(0), dtype=torch.float64), rtol=0, atol=1e-5,
                               msg=f"{name} is not orthogonal with gain {gain}")


def test_initialization():
    h = tiny_hparams(model_dim=128, num_heads=4, num_kv_heads=2, bigram_dim=32, num_layers=4)
    model = tiny_model(h, randomize=False)
    matrices = 0
    for i, block in enumerate(model.blocks):
        assert not block.attn.proj.weight.any(), f"blocks.{i}.attn.proj must start at zero"
        assert not block.mlp.proj.weight.any(), f"blocks.{i}.mlp.proj must start at zero"
        for name in ("attn.c_q", "attn.c_k", "attn.c_v", "mlp.fc"):  # all >= 64x64 here (kv dim 64)
            assert_orthogonal(block.get_submodule(name).weight, 1.0, f"blocks.{i}.{name}")
            matrices += 1
        torch.testing.assert_close(block.q_gain, torch.full((h.num_heads,), h.qk_gain_init))
    assert matrices == 4 * h.num_layers
    assert not model.bigram.table.weight.any(), "the bigram table starts at zero"
    assert model.bigram.proj.weight.abs().sum() > 0, "with the table at zero, the projection must not be zero"
    assert_orthogonal(model.bigram.proj.weight, (2 * h.num_layers) ** -0.5, "bigram.proj")
    assert model.bigram.scale.item() == pytest.approx(0.05)
    assert not model.smear.gate.any(), "SmearGate starts at sigmoid(0) = an even blend"
    assert torch.equal(model.skip_weights, torch.ones_like(model.skip_weights))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.05)


def test_same_seed_same_model_other_seed_other_model():
    torch.manual_seed(3)
    a = tg.GPT(tiny_hparams())
    torch.manual_seed(3)
    b = tg.GPT(tiny_hparams())
    torch.manual_seed(4)
    c = tg.GPT(tiny_hparams())
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), f"{name} differs between two builds with the same seed"
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


# ----------------------------------------------------------------------------- U-Net skips


@pytest.mark.parametrize("num_layers", [2, 3, 5, 12])
def test_unet_has_one_skip_per_encoder_block_and_uses_each(num_layers):
    h = tiny_hparams(num_layers=num_layers)
    model = tiny_model(h)
    assert model.skip_weights.shape == (num_layers // 2, h.model_dim)
    seq = random_tokens(1, 17, seed=8)
    model(seq[:, :-1], seq[:, 1:]).backward()
    grad_per_skip = model.skip_weights.grad.abs().sum(dim=1)
    assert (grad_per_skip > 0).all(), f"skip weights without gradient (unused skips): {grad_per_skip.tolist()}"
    assert math.isfinite(model.skip_weights.grad.sum().item())
