# python3 -m pytest -q tests/test_lab.py
"""The averagers and the lab (bench/lab.py), in process: EMA against its closed form, the averager specs
(AVERAGE_ALSO), SWA and EMA excluding each other, the checkpoint's checks (only post-training
settings may differ, the averaging must have been tracked), and VAL_TOKENS scoring exactly the
chosen targets and bytes. The end-to-end runs (bit-identical to a separate run) are in test_ablate.py."""

import dataclasses
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import (cpu_runtime, decoded_utf8_bytes, reference_loss_sum, tiny_hparams, tiny_model)
import train_gpt as tg
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import lab  # noqa: E402


# ----------------------------------------------------------------------------- averaging


def test_ema_equals_its_closed_form_on_a_toy_sequence():
    """shadow_n = d^n p_0 + sum_k (1 - d) d^(n - k) p_k, p_0 the initial weights."""
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    decay, values = 0.9, [torch.randn(2, 3) for _ in range(7)]
    initial = module.weight.detach().double().clone()
    ema = tg.EMA(decay, module)
    for value in values:
        with torch.no_grad():
            module.weight.copy_(value)  # in place, as the optimizers update
        ema.observe(module, step=0, lr_scale=1.0)
    n = len(values)
    expected = decay ** n * initial + sum((1 - decay) * decay ** (n - k) * v.double()
                                          for k, v in enumerate(values, start=1))
    assert torch.allclose(ema.average()["weight"].double(), expected, atol=1e-6)
    assert ema.average()["weight"].dtype == torch.float32
    assert ema.summary() == ("ema: decay 0.9 over 7 updates WARNING: the run is shorter than the average's horizon "
                             "(10 updates): the initial weights still make up 48% of what is scored (lower EMA_DECAY "
                             "for a short run)")  # 0.9^7 = 0.478


def test_swa_averages_the_snapshots_it_takes():
    module = nn.Linear(2, 2, bias=False)
    swa = tg.SWA(interval=2, start_frac=0.5)
    taken = []
    for step in range(1, 9):
        with torch.no_grad():
            module.weight.fill_(step)
        swa.observe(module, step, lr_scale=1.0 if step < 5 else 0.3)  # below the start fraction from step 5
        if step >= 5 and step % 2 == 0:
            taken.append(step)
    assert taken == [6, 8] and swa.count == 2
    assert torch.equal(swa.average()["weight"], torch.full((2, 2), 7.0))
    assert tg.SWA(2, 0.5).average() is None  # no snapshot: the final weights are kept


def test_averager_specs_have_one_spelling_and_bad_ones_are_one_line_errors():
    h = tiny_hparams(swa_interval=5)
    assert lab.averager_names(h, "ema:0.99, swa:50:0.25,none,swa:5") == ["swa:5:0.5", "ema:0.99", "swa:50:0.25",
                                                                         "none"]
    assert lab.own_averager(tiny_hparams(swa_interval=0, ema_decay=0.997)) == "ema:0.997"
    assert lab.own_averager(tiny_hparams(swa_interval=0)) == "none"
    for bad in ("ema:1.5", "ema:x", "swa:0", "swa:5:2", "mean:3"):
        with pytest.raises(tg.RunError, match="AVERAGE_ALSO"):
            lab.lab_from_env({"CHECKPOINT_OUT": "x", "AVERAGE_ALSO": bad})


@pytest.mark.parametrize("env, words", [
    ({"SWA_INTERVAL": "50", "EMA_DECAY": "0.997"}, ("SWA_INTERVAL", "EMA_DECAY")),
    ({"EMA_DECAY": "1.0", "SWA_INTERVAL": "0"}, ("EMA_DECAY",)),
    ({"VAL_TOKENS": "-1"}, ("VAL_TOKENS",)),
    ({"EMA_DECAI": "0.9"}, ("EMA_DECAI",)),
])
def test_conflicting_or_misspelt_lab_knobs_stop_the_run(env, words):
    with pytest.raises(tg.RunError) as info:
        tg.hyperparameters_from_env({"PRESET": "smoke", **env}, cuda_available=False)
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words)


@pytest.mark.parametrize("env, words", [
    ({"AVERAGE_ALSO": "ema:0.99"}, ("AVERAGE_ALSO", "CHECKPOINT_OUT")),
    ({"FROM_CHECKPOINT": "a", "CHECKPOINT_OUT": "b"}, ("FROM_CHECKPOINT", "CHECKPOINT_OUT")),
    ({"FROM_CHECKPOINT": "a", "EVAL_ONLY": "b"}, ("FROM_CHECKPOINT", "EVAL_ONLY")),
])
def test_the_labs_own_settings_are_checked_and_taken_out_of_the_environment(env, words):
    with pytest.raises(tg.RunError) as info:
        lab.lab_from_env(dict(env))
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words)
    env = {"CHECKPOINT_OUT": "ck.pt", "AVERAGE_ALSO": "ema:0.9", "SEED": "3"}
    assert lab.lab_from_env(env) == lab.Lab("ck.pt", "ema:0.9", "") and env == {"SEED": "3"}


# ----------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_serves_post_training_settings_only(tmp_path):
    h = tiny_hparams(swa_interval=2)
    path = tmp_path / "c.pt"
    model = tiny_model(h)
    loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, cpu_runtime())
    loader.next_batch(64, 64)
    averagers = [lab.make_averager(name, model) for name in lab.averager_names(h, "ema:0.9")]
    averages = {name: (a.average(), a.summary()) for name, a in zip(lab.averager_names(h, "ema:0.9"), averagers)}
    lab.save_checkpoint(h, path, model, loader, 3, 12.5, averages, lambda message: None)

    def reading(**changes):
        return lab.load_checkpoint(dataclasses.replace(h, **changes), path)

    checkpoint = reading(swa_interval=0, ema_decay=0.9, eval_stride=8, val_tokens=300, gptq_calib_tokens=4096,
                         clip_search=False)
    assert set(checkpoint["averages"]) == {"none", "swa:2:0.5", "ema:0.9"}  # the final weights always
    assert checkpoint["stream"] == {"file_index": 0, "pos": 65} and checkpoint["steps"] == 3
    reading(swa_interval=0)  # "none": the raw final weights
    with pytest.raises(tg.RunError, match="MATRIX_LR is 0.05 here, 0.025 in the checkpoint"):
        reading(matrix_lr=0.05)
    with pytest.raises(tg.RunError, match="averaging ema:0.5 was not tracked.*AVERAGE_ALSO"):
        reading(swa_interval=0, ema_decay=0.5)
    with pytest.raises(tg.RunError, match="loop's cap"):  # GPTQ's reserve shortens a capped loop (600 s here)
        reading(gptq_calib_tokens=0)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(tg.RunError, match="FROM_CHECKPOINT=.*junk.pt: unreadable"):
        lab.load_checkpoint(h, tmp_path / "junk.pt")


def test_every_post_training_field_is_a_setting():
    fields = {f.name for f in dataclasses.fields(tg.Hyperparameters)}
    assert lab.POST_TRAINING_FIELDS <= fields, lab.POST_TRAINING_FIELDS - fields


# ----------------------------------------------------------------------------- VAL_TOKENS


def test_val_tokens_scores_exactly_the_chosen_targets_and_bytes(sp, val_tokens):
    """A prefix cut just before a BOS, so that decoding it gives the reference byte count."""
    bos = np.flatnonzero(val_tokens == tg.BOS_ID)
    n = int(bos[len(bos) // 3]) - 1  # targets 1..n: the stream ends where a document does
    h = tiny_hparams(val_tokens=n, eval_seq_len=64, eval_stride=16)
    val = tg.load_validation(h, sp, cpu_runtime())
    assert (val.num_targets, val.split_targets) == (n, len(val_tokens) - 1)
    assert torch.equal(val.tokens.cpu(), torch.from_numpy(val_tokens[:n + 1]))
    assert val.num_bytes == decoded_utf8_bytes(sp, val_tokens[:n + 1])
    model = tiny_model(h).eval()
    for stride in (64, 16):  # evaluate() itself checks the scored count and bytes against val
        loss, _ = tg.evaluate(model, val, 64, stride, h.val_batch_size, cpu_runtime())
        reference, scored = reference_loss_sum(model, val.tokens, 64, stride)
        assert scored == n and loss * n == pytest.approx(reference, rel=1e-9)
    whole = tg.load_validation(tiny_hparams(), sp, cpu_runtime())
    assert whole.num_targets == whole.split_targets == len(val_tokens) - 1
    with pytest.raises(tg.RunError, match="VAL_TOKENS=.* only"):
        tg.load_validation(tiny_hparams(val_tokens=len(val_tokens)), sp, cpu_runtime())
