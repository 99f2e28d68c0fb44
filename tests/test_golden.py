# The golden table (issue 23): python3 -m pytest -q tests/test_golden.py   (regenerate: python3 tests/golden.py --write)
"""Every preset at toy size (tests/golden.py states the shrink) gives the train_loss lines, val_loss/val_bpb
lines and model bytes written in tests/golden.json, to the last printed digit and byte, and its full-size
parameter count: a change of the script's shape changes none of them. A change of a figure on purpose
is its own commit, with the table rewritten and the reason given."""
import json

import pytest

import golden
from conftest import clean_env

TABLE = json.loads(golden.GOLDEN.read_text())


def test_the_table_covers_every_preset():
    assert set(TABLE) == set(golden.PRESETS) == set(golden.tg.PRESETS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", golden.PRESETS)
def test_a_toy_run_gives_the_golden_figures(preset):
    now = golden.run_preset(preset, clean_env())
    for key in ("full_size_params", "model_bytes", "scores", "train_loss"):
        assert now[key] == TABLE[preset][key], f"PRESET={preset} {key}: {now[key]} != golden {TABLE[preset][key]}"
