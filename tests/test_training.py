# The training loop on a tiny model, in-process: python3 -m pytest -q tests/test_training.py
"""Warm-up is legal only if it leaves no trace (the challenge's rules: compile warm-up before the timer is not
counted if model, optimizer and loader state are restored), so a run with warm-up steps must train
exactly like a run without them."""
import math
import re

import torch

import train_gpt as tg
from conftest import cpu_runtime, tiny_hparams


def train_tiny(warmup_steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    h = tiny_hparams(iterations=5, warmup_steps=warmup_steps, max_wallclock_seconds=0.0, swa_interval=0)
    lines = []
    rt = cpu_runtime(lines.append)
    model = tg.build_model(h, rt)
    optimizers = tg.build_optimizers(h, rt, model)
    files = tg.find_shards(h, "train")
    val = tg.load_validation(h, tg.load_tokenizer(h), rt)

    def make_loader():
        return tg.DistributedTokenLoader(files, h.vocab_size, rt)

    tg.warm_up_and_reset(h, rt, model, model, optimizers, make_loader, val.tables)
    steps, _ = tg.train(h, rt, model, model, optimizers, make_loader(), val, [])
    assert steps == h.iterations
    losses = [float(m[1]) for line in lines if (m := re.match(r"step:\d+/\d+ train_loss:(\S+)", line))]
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def test_warmup_leaves_no_trace():
    plain_losses, plain_state = train_tiny(warmup_steps=0)
    warm_losses, warm_state = train_tiny(warmup_steps=3)
    assert len(plain_losses) == 5 and all(math.isfinite(x) for x in plain_losses)
    assert warm_losses == plain_losses, "warm-up changed the training that follows it"
    for name, tensor in plain_state.items():
        assert torch.equal(tensor, warm_state[name]), f"{name} differs after warm-up + training"


def test_training_lowers_the_loss():
    losses, _ = train_tiny(warmup_steps=0)
    assert losses[-1] < losses[0] - 0.1, f"5 steps did not train: {losses}"
