# Window plans, and evaluate() against brute force: python3 -m pytest -q tests/test_eval_windows.py
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import cpu_runtime, decoded_utf8_bytes, reference_loss_sum, tiny_hparams, tiny_model, write_shard


def check_plan(num_targets: int, seq_len: int, stride: int) -> None:
    starts, ends, score_from = tg.window_plan(num_targets, seq_len, stride)
    where = f"window_plan({num_targets}, {seq_len}, {stride})"
    assert len(starts) == len(ends) == len(score_from) >= 1, where
    assert starts[0] == 0 and ends[-1] == num_targets, where
    assert ((0 <= starts) & (starts <= score_from) & (score_from < ends) & (ends <= num_targets)).all(), \
        f"{where}: a window scores outside itself or scores nothing"
    assert (ends - starts <= seq_len).all(), f"{where}: a window longer than seq_len"
    # Non-empty intervals [score_from, end) score every target exactly once iff, in order, they tile [0, N).
    order = np.argsort(score_from, kind="stable")
    tiles_from, tiles_to = score_from[order], ends[order]
    assert tiles_from[0] == 0 and tiles_to[-1] == num_targets and (tiles_from[1:] == tiles_to[:-1]).all(), \
        f"{where}: some target is scored twice or never"
    # Context: a target j scored in a window starting at s sees the j - s tokens before it in that window.
    # The first window gives every target its whole prefix; later ones at least seq_len - stride tokens.
    assert score_from[0] == 0
    context = score_from[1:] - starts[1:]  # the least context in each later window
    assert (context >= seq_len - stride).all(), f"{where}: a target with only {context.min()} tokens of context"


def test_window_plan_exhaustively_on_small_sizes():
    for seq_len in range(1, 13):
        for stride in range(1, seq_len + 1):
            for num_targets in range(1, 50):
                check_plan(num_targets, seq_len, stride)


@pytest.mark.parametrize("num_targets, seq_len, stride", [
    (53451, 128, 64),   # the sample validation split with the smoke preset
    (53451, 128, 128),  # standard evaluation: disjoint windows
    (62_021_632, 1024, 64),  # FineWeb val at the record's settings
    (62_021_632, 1024, 1024),
    (1023, 1024, 64), (1024, 1024, 64), (1025, 1024, 64),  # fewer, equal, one more than a window
    (999, 100, 1), (1001, 333, 7), (7, 3, 2),
])
def test_window_plan_edge_cases(num_targets, seq_len, stride):
    check_plan(num_targets, seq_len, stride)


def test_window_plan_standard_is_disjoint_windows_of_full_length():
    starts, ends, score_from = tg.window_plan(1000, 128, 128)
    assert starts.tolist() == list(range(0, 1000, 128))
    assert (score_from == starts).all(), "with stride == seq_len each window scores all of itself"


def test_window_plan_random_sizes_with_hypothesis():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(st.integers(1, 100_000), st.integers(1, 2048), st.data())
    def check(num_targets, seq_len, data):
        check_plan(num_targets, seq_len, data.draw(st.integers(1, seq_len)))

    check()


# ----------------------------------------------------------------------------- evaluate()


PREFIX_TOKENS = 3001  # 3000 targets: 31 full windows of 96 and a partial one; several batches, the last padded


@pytest.fixture(scope="module")
def val_and_model(tmp_path_factory, val_tokens):
    """A ValidationSet loaded the normal way from a shard holding the first tokens of the sample val split."""
    data = tmp_path_factory.mktemp("val_prefix")
    write_shard(data / "fineweb_val_000000.bin", val_tokens[:PREFIX_TOKENS])
    h = tiny_hparams(data_path=str(data), train_seq_len=96, eval_seq_len=96, train_batch_tokens=8 * 96)
    val = tg.load_validation(h, tg.load_tokenizer(h), cpu_runtime())
    return h, val, tiny_model(h)


def test_validation_set_holds_the_shard_tokens_and_their_bytes(val_and_model, val_tokens, sp):
    _, val, _ = val_and_model
    assert torch.equal(val.tokens, torch.from_numpy(val_tokens[:PREFIX_TOKENS]))
    assert val.num_targets == PREFIX_TOKENS - 1
    assert val.num_bytes == decoded_utf8_bytes(sp, val_tokens[:PREFIX_TOKENS])


@pytest.mark.parametrize("stride", [96, 40])
def test_evaluate_matches_a_brute_force_window_loop(val_and_model, stride):
    h, val, model = val_and_model
    val_loss, val_bpb = tg.evaluate(model, val, 96, stride, batch_tokens=96 * 7, rt=cpu_runtime())
    assert math.isfinite(val_loss) and math.isfinite(val_bpb)
    loss_sum, scored = reference_loss_sum(model, val.tokens, 96, stride)
    assert scored == val.num_targets
    assert val_loss * val.num_targets == pytest.approx(loss_sum, rel=1e-6)
    assert val_bpb == pytest.approx(loss_sum / math.log(2) / val.num_bytes, rel=1e-6)


def broken_plan(how: str):
    """window_plan with its middle window dropped or scored twice."""
    real_window_plan = tg.window_plan

    def plan(num_targets, seq_len, stride):
        starts, ends, score_from = real_window_plan(num_targets, seq_len, stride)
        mid = len(starts) // 2
        keep = np.delete(np.arange(len(starts)), mid) if how == "drop" else np.insert(np.arange(len(starts)), mid, mid)
        return starts[keep], ends[keep], score_from[keep]
    return plan


@pytest.mark.parametrize("how", ["drop", "duplicate"])
def test_evaluate_refuses_a_plan_that_breaks_coverage(val_and_model, monkeypatch, how):
    _, val, model = val_and_model
    monkeypatch.setattr(tg, "window_plan", broken_plan(how))
    with pytest.raises(tg.RunError, match=str(val.num_targets)):
        tg.evaluate(model, val, 96, 96, 96 * 7, cpu_runtime())
