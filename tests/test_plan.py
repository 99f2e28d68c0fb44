# The layer plan GPT.forward walks: python3 -m pytest -q tests/test_plan.py
"""The plans of the presets, written out by hand: per run position (block, controls, untied repeat MLP,
value-embedding scale, lanes, U-Net push, U-Net pop as (pair, lane 0 only)). 11 positions (pr236, pr192),
13 (pr1204: blocks 4, 5 once more, controls per position) and 17 (sp8192: blocks 3-5 twice more, the
U-Net over all 17, parallel lanes from block 8); and a forward pass walks exactly its plan."""
import pytest
import torch

import train_gpt as tg
from conftest import tiny_hparams, tiny_model


def preset(name: str) -> tg.Hyperparameters:
    return tg.hyperparameters_from_env({"PRESET": name}, cuda_available=True)[0]


def steps(rows) -> tuple[tg.Step, ...]:
    return tuple(tg.Step(*row) for row in rows)


# 11 blocks, one lane: 0-4 push, 5-9 pop pairs 0-4, block 10 runs without a skip
ELEVEN = steps((i, i, None, None, 1, i < 5, (i - 5, False) if 5 <= i <= 9 else None) for i in range(11))


@pytest.mark.parametrize("name", ["pr236", "pr192"])
def test_eleven_blocks_push_the_first_half_and_pop_into_the_second(name):
    h = preset(name)
    assert tg.layer_plan(h, False) == ELEVEN == tg.layer_plan(h, True)


def test_pr1204_runs_13_positions_with_their_own_controls_once_switched():
    h = preset("pr1204")
    before = steps((i, i, None, {9: 0, 10: 1}.get(i), 2 if i >= 7 else 1, i < 5, (i - 5, False) if 5 <= i <= 9
                    else None) for i in range(11))
    assert tg.layer_plan(h, False) == before
    after = steps([
        (0, 0, None, None, 1, True, None), (1, 1, None, None, 1, True, None), (2, 2, None, None, 1, True, None),
        (3, 3, None, None, 1, True, None), (4, 4, None, None, 1, True, None), (5, 5, None, None, 1, True, None),
        (4, 6, 0, None, 1, False, (0, False)), (5, 7, 1, None, 1, False, (1, False)),
        (6, 8, None, None, 1, False, (2, False)), (7, 9, None, 0, 2, False, (3, False)),
        (8, 10, None, 1, 2, False, (4, False)), (9, 11, None, None, 2, False, (5, False)),
        (10, 12, None, None, 2, False, None)])
    assert tg.layer_plan(h, True) == after


def test_sp8192_runs_17_positions_with_the_unet_over_all_of_them():
    h = preset("sp8192")
    blocks = [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    lanes = [1] * 14 + [2] * 3  # blocks 8-10: parallel lanes
    pops = [None] * 8 + [(i, i >= 6) for i in range(8)] + [None]  # 8 push, 8 pop, the last without a skip
    after = steps((b, b, None, None, lanes[pos], pos < 8, pops[pos]) for pos, b in enumerate(blocks))
    assert tg.layer_plan(h, True) == after
    before = steps((i, i, None, None, 2 if i >= 8 else 1, i < 5, (i - 5, i >= 8) if 5 <= i <= 9 else None)
                   for i in range(11))
    assert tg.layer_plan(h, False) == before


def test_forward_walks_its_plan():
    """Each position calls its controls block (the module run) with its weights block and repeat MLP."""
    h = tiny_hparams(num_layers=4, recur_blocks="1,2", virtual_depth=True, recur_untie_mlp=True, lanes_from=3,
                     lane_formula="read", ve_layers="4")
    model = tiny_model(h)
    model.start_recurrence()
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(
            lambda m, args, i=i: calls.append((i, list(model.blocks).index(args[2]), args[3] is not None,
                                               args[4] is not None, args[0].size(0))))
    with torch.no_grad():
        model(torch.randint(0, h.vocab_size, (1, 8)))
    assert calls == [(s.controls, s.block, s.mlp is not None, s.ve is not None, s.lanes) for s in model.plan()]
    assert [s.controls for s in model.plan()] == list(range(6)) and [s.block for s in model.plan()] == [0, 1, 2, 1, 2, 3]
