# Data loading, bad inputs and configuration: python3 -m pytest -q tests/test_data.py
import dataclasses
import multiprocessing
import os

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import TOKENIZER, cpu_runtime, tiny_hparams, write_shard

V = 1024


def data_dir(tmp_path, train=((1, 5, 6, 7),), val=((1, 8, 9, 10, 11),)):
    """A DATA_PATH with the given train and val shards (lists of token lists)."""
    for i, tokens in enumerate(train):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", tokens)
    for i, tokens in enumerate(val):
        write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", tokens)
    return tmp_path


@pytest.fixture
def synthetic_ids(monkeypatch):
    """For tests of other properties on made-up token ids, which are no tokenizer's encoding of text:
    the proof against decoded text (tested in test_split.py) is switched off."""
    monkeypatch.setattr(tg, "check_validation_text", lambda *args, **kwargs: (0, 0))


def h_for(path, **overrides) -> tg.Hyperparameters:
    return tiny_hparams(data_path=str(path), **overrides)


# ----------------------------------------------------------------------------- bad inputs


def test_missing_data_path(tmp_path):
    with pytest.raises(tg.RunError, match=r"DATA_PATH=.*nowhere"):
        tg.find_shards(h_for(tmp_path / "nowhere"), "train")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(tmp_path, split):
    data_dir(tmp_path, **{split: ()})
    with pytest.raises(tg.RunError, match=rf"DATA_PATH=.*{split}"):
        tg.find_shards(h_for(tmp_path), split)


@pytest.mark.parametrize("fault, header", [
    ("magic", dict(magic=20240521)),
    ("version", dict(version=2)),
    ("shorter than its header says", dict(count=5)),
    ("longer than its header says", dict(count=3)),
    ("negative count", dict(count=-1)),
])
def test_bad_shard_header(tmp_path, fault, header):
    data_dir(tmp_path)
    bad = write_shard(tmp_path / "fineweb_train_000001.bin", [1, 2, 3, 4], **header)
    with pytest.raises(tg.RunError, match=str(bad)):
        tg.find_shards(h_for(tmp_path), "train")


def test_file_shorter_than_a_header(tmp_path):
    data_dir(tmp_path)
    bad = tmp_path / "fineweb_val_000001.bin"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(tg.RunError, match=str(bad)):
        tg.find_shards(h_for(tmp_path), "val")


def test_every_shard_header_is_checked_not_only_the_first(tmp_path):
    data_dir(tmp_path, train=((1, 2), (1, 3), (1, 4)))
    write_shard(tmp_path / "fineweb_train_000002.bin", [1, 4], version=7)
    with pytest.raises(tg.RunError, match="fineweb_train_000002"):
        tg.find_shards(h_for(tmp_path), "train")


@pytest.mark.parametrize("bad_id, ok", [(V - 1, True), (V, False), (65535, False)])
def test_validation_token_id_must_be_below_vocab_size(tmp_path, sp, bad_id, ok, synthetic_ids):
    data_dir(tmp_path, val=([1] + [5] * 200 + [bad_id] + [6] * 10,))
    h = h_for(tmp_path, train_seq_len=64)
    if ok:
        assert tg.load_validation(h, sp, cpu_runtime()).num_targets == 211
    else:
        with pytest.raises(tg.RunError, match=r"fineweb_val_000000\.bin.*VOCAB_SIZE"):
            tg.load_validation(h, sp, cpu_runtime())


def test_train_token_id_is_checked_when_the_stream_loads_the_shard(tmp_path):
    data_dir(tmp_path, train=((1, 5, 6, 7), (1, 8, V)))
    files = tg.find_shards(h_for(tmp_path), "train")  # headers are fine
    stream = tg.TokenStream(files, V)
    assert stream.take(4).tolist() == [1, 5, 6, 7]
    with pytest.raises(tg.RunError, match=r"fineweb_train_000001\.bin.*VOCAB_SIZE"):
        stream.take(1)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(tg.RunError, match="TOKENIZER_PATH=.*missing.model"):
        tg.load_tokenizer(tiny_hparams(tokenizer_path=str(tmp_path / "missing.model")))


@pytest.mark.parametrize("preset, vocab", [("pr76", 1024), ("sp8192", 8192)])
def test_a_preset_without_its_data_names_the_missing_path_and_the_download_in_one_line(run_script, preset, vocab):
    """Issue 24, item 10: PRESET=pr76 on a machine without FineWeb (run_script starts in an empty folder,
    where the preset's relative paths lead nowhere)."""
    from conftest import assert_one_line_error
    run = run_script({"PRESET": preset})
    assert_one_line_error(run, f"TOKENIZER_PATH=./data/tokenizers/fineweb_{vocab}_bpe.model: no such file",
                          f"python3 data/cached_challenge_fineweb.py --variant sp{vocab}", "DATA_PATH")


def test_a_missing_data_folder_names_the_download(tmp_path):
    with pytest.raises(tg.RunError, match=r"DATA_PATH=.*nowhere: no such directory; download FineWeb with "
                                          r"python3 data/cached_challenge_fineweb\.py --variant sp1024"):
        tg.find_shards(h_for(tmp_path / "nowhere"), "val")


def test_tokenizer_that_is_not_a_model(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(tg.RunError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(tiny_hparams(tokenizer_path=str(junk)))


def test_tokenizer_vocab_must_equal_vocab_size():
    with pytest.raises(tg.RunError, match=r"TOKENIZER_PATH=.*1024.*VOCAB_SIZE=512"):
        tg.load_tokenizer(tiny_hparams(vocab_size=512))
    assert tg.load_tokenizer(tiny_hparams()).vocab_size() == V


@pytest.mark.parametrize("num_tokens, ok", [(64, False), (65, True)])
def test_validation_split_must_hold_one_window(tmp_path, sp, num_tokens, ok, synthetic_ids):
    data_dir(tmp_path, val=([1] + [5] * (num_tokens - 1),))
    h = h_for(tmp_path, train_seq_len=64)
    if ok:
        assert tg.load_validation(h, sp, cpu_runtime()).num_targets == 64
    else:
        with pytest.raises(tg.RunError, match=r"DATA_PATH=.*EVAL_SEQ_LEN=64"):
            tg.load_validation(h, sp, cpu_runtime())


def raises_run_error_within(seconds: float, fn) -> str:
    """Runs fn in a forked child: 'raised' if it raised RunError, 'returned' or the exception's name
    otherwise, 'hung' if it was still running after `seconds` (the child is then killed)."""
    child = multiprocessing.get_context("fork").Process(target=_exit_with_outcome, args=(fn,))
    child.start()
    child.join(seconds)
    if child.is_alive():
        child.kill()
        child.join()
        return "hung"
    return {0: "raised", 1: "returned", 2: "raised another exception"}.get(child.exitcode, f"exit {child.exitcode}")


def _exit_with_outcome(fn):
    try:
        fn()
    except tg.RunError:
        os._exit(0)
    except BaseException:
        os._exit(2)
    os._exit(1)


def test_training_split_without_tokens_is_an_error_not_a_hang(tmp_path):
    """Shards with a valid header and zero tokens pass every header check; reading a batch from
    them must stop with a RunError, not spin forever looking for the next token."""
    data_dir(tmp_path, train=((), ()))
    outcome = raises_run_error_within(
        3, lambda: tg.TokenStream(tg.find_shards(h_for(tmp_path), "train"), V).take(10))
    assert outcome == "raised", f"a training split with no tokens: {outcome}, expected a RunError"


# ----------------------------------------------------------------------------- token stream and loader


def test_token_stream_returns_the_shards_in_order_and_wraps(tmp_path):
    shards = (np.arange(4, 11), np.arange(11, 14), np.arange(14, 30))  # 26 tokens over three shards
    data_dir(tmp_path, train=shards)
    stream = tg.TokenStream(tg.find_shards(h_for(tmp_path), "train"), V)
    sizes = [3, 5, 9, 1, 13, 26, 2, 30]  # crosses every boundary, and wraps more than once
    got = np.concatenate([stream.take(n) for n in sizes])
    expected = np.resize(np.concatenate(shards), sum(sizes))  # np.resize repeats cyclically
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_n_ranks_see_the_spans_of_one_process_taking_n_micro_batches(tmp_path, world_size):
    data_dir(tmp_path, train=(np.arange(4, 300), np.arange(300, 377)))  # wraps during the test
    files = tg.find_shards(h_for(tmp_path), "train")
    tokens_per_slice, seq_len = 24, 8
    single = tg.DistributedTokenLoader(files, V, cpu_runtime())
    ranks = [tg.DistributedTokenLoader(files, V, tg.dataclasses.replace(cpu_runtime(), rank=r, world_size=world_size))
             for r in range(world_size)]
    for micro_step in range(6):
        for r, loader in enumerate(ranks):
            x, y = loader.next_batch(tokens_per_slice, seq_len)
            x1, y1 = single.next_batch(tokens_per_slice, seq_len)
            assert x.shape == y.shape == (tokens_per_slice // seq_len, seq_len)
            assert torch.equal(x, x1) and torch.equal(y, y1), f"micro-step {micro_step}, rank {r}"
            flat_x, flat_y = x.flatten(), y.flatten()
            assert torch.equal(flat_x[1:], flat_y[:-1]), "targets are the inputs shifted by one"


# ----------------------------------------------------------------------------- configuration


def test_env_values_are_parsed_with_the_field_types():
    env = {"PRESET": "pr76", "NUM_LAYERS": "9", "MATRIX_LR": "0.5", "DATA_PATH": "/x", "COMPILE": "0",
           "MAX_WALLCLOCK_SECONDS": "30"}
    h, preset = tg.hyperparameters_from_env(env, cuda_available=True)
    assert preset == "pr76"
    assert (h.num_layers, h.matrix_lr, h.data_path, h.compile, h.max_wallclock_seconds) == (9, 0.5, "/x", "0", 30.0)
    assert isinstance(h.num_layers, int) and isinstance(h.max_wallclock_seconds, float)


@pytest.mark.parametrize("env, names", [
    ({"NUM_HEADS": "7", "MODEL_DIM": "512"}, ["MODEL_DIM", "NUM_HEADS"]),
    ({"TRAIN_BATCH_TOKENS": "1000", "TRAIN_SEQ_LEN": "64"}, ["TRAIN_BATCH_TOKENS", "TRAIN_SEQ_LEN"]),
    ({"MUON_MOMENTUMM": "0.9"}, ["MUON_MOMENTUMM"]),
    ({"PRESET": "bogus"}, ["PRESET"]),
    ({"NUM_LAYERS": "abc"}, ["NUM_LAYERS", "abc"]),
    ({"MATRIX_LR": "fast"}, ["MATRIX_LR"]),
    ({"EVAL_STRIDE": "129", "TRAIN_SEQ_LEN": "128"}, ["EVAL_STRIDE"]),
    ({"NUM_KV_HEADS": "3"}, ["NUM_KV_HEADS"]),
    ({"COMPILE": "yes"}, ["COMPILE"]),
])
def test_bad_settings_are_rejected_naming_the_variable(env, names):
    with pytest.raises(tg.RunError) as error:
        tg.hyperparameters_from_env({"PRESET": "pr76", **env}, cuda_available=True)
    for name in names:
        assert name in str(error.value), f"{name} missing from: {error.value}"


def test_auto_preset_is_smoke_without_cuda():
    h, preset = tg.hyperparameters_from_env({}, cuda_available=False)
    assert preset == "smoke" and h.preset == "smoke"
    for name, value in tg.SMOKE.items():
        assert getattr(h, name) == value, name


def test_auto_preset_on_a_gpu_without_fineweb_is_an_error_naming_the_path_and_the_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default DATA_PATH is relative: nothing here
    with pytest.raises(tg.RunError) as error:
        tg.hyperparameters_from_env({}, cuda_available=True)
    message = str(error.value)
    for words in ("DATA_PATH=./data/datasets/fineweb10B_sp1024", "cached_challenge_fineweb.py --variant sp1024",
                  "PRESET=smoke"):
        assert words in message, message
    assert "\n" not in message
    assert tg.hyperparameters_from_env({"PRESET": "smoke"}, cuda_available=True)[1] == "smoke"


def test_auto_preset_is_the_frontier_on_a_gpu_with_data(tmp_path):
    h, preset = tg.hyperparameters_from_env({"DATA_PATH": str(tmp_path)}, cuda_available=True)
    assert preset == "frontier" and h.num_layers == 11 and h.xsa_last_n == 11


def test_env_values_override_the_smoke_preset():
    h, preset = tg.hyperparameters_from_env({"NUM_LAYERS": "3", "ITERATIONS": "7"}, cuda_available=False)
    assert preset == "smoke" and (h.num_layers, h.iterations) == (3, 7)
    assert h.model_dim == tg.SMOKE["model_dim"], "the rest of the smoke preset still applies"


def test_pr76_preset_is_the_defaults():
    h, preset = tg.hyperparameters_from_env({"PRESET": "pr76"}, cuda_available=False)
    assert preset == "pr76"
    assert h == dataclasses.replace(tg.Hyperparameters(), preset="pr76")


@pytest.mark.parametrize("name", ["pr76", "pr236", "pr192", "pr1204", "frontier", "smoke"])
def test_every_preset_is_valid_and_applies_all_its_values(name):
    h, preset = tg.hyperparameters_from_env({"PRESET": name}, cuda_available=False)
    assert preset == name
    for field, value in tg.PRESETS[name].items():
        assert getattr(h, field) == value, field


def test_smoke_preset_outside_the_repository_says_what_is_missing(tmp_path, monkeypatch):
    # A records folder holds train_gpt.py without tests/fixtures: the error must say so in one line.
    monkeypatch.setitem(tg.SMOKE, "data_path", str(tmp_path / "tests/fixtures/sample"))
    with pytest.raises(tg.RunError, match=r"PRESET=smoke .*tests/fixtures/"):
        tg.hyperparameters_from_env({"PRESET": "smoke"}, cuda_available=True)
    h, _ = tg.hyperparameters_from_env({"PRESET": "smoke", "DATA_PATH": str(tmp_path)}, cuda_available=True)
    assert h.data_path == str(tmp_path)


def test_world_size_must_divide_eight(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(tg.RunError, match="WORLD_SIZE=3"):
        tg.init_runtime()


def test_tokenizer_fixture_is_the_one_the_smoke_preset_uses():
    assert tg.SMOKE["tokenizer_path"] == str(TOKENIZER)
