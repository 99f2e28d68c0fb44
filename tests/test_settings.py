# Every setting is checked (issue 13, kind 7): python3 -m pytest -q tests/test_settings.py
"""A misspelt setting stops the run naming the setting it resembles, a real variable of the
environment never does, and every field's impossible values are rejected at start."""

import dataclasses

import pytest

import train_gpt as tg
from conftest import clean_env

TORCHRUN_ENV = {  # what torch.distributed.run sets in each worker
    "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
    "GROUP_WORLD_SIZE": "1", "ROLE_RANK": "0", "ROLE_NAME": "default", "ROLE_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "0",
    "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True",
    "TORCHELASTIC_ERROR_FILE": "/tmp/e.json", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": "1",
}
POD_ENV = {  # a rented GPU pod, a CI runner, a SLURM job, a login shell
    name: "x" for name in (
        "PATH HOME USER SHELL LANG LC_ALL TERM PWD OLDPWD SHLVL HOSTNAME LOGNAME MAIL EDITOR PAGER LESS DISPLAY "
        "TMPDIR TZ VIRTUAL_ENV CONDA_PREFIX CONDA_DEFAULT_ENV PYTHONPATH PYTHONHASHSEED PYTHONUNBUFFERED "
        "CUDA_VISIBLE_DEVICES CUDA_HOME CUDA_VERSION NVIDIA_VISIBLE_DEVICES NVIDIA_DRIVER_CAPABILITIES "
        "NV_CUDA_CUDART_VERSION "
        "NCCL_DEBUG NCCL_IB_DISABLE NCCL_SOCKET_IFNAME TORCH_HOME TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR "
        "PYTORCH_CUDA_ALLOC_CONF HF_HOME TRANSFORMERS_CACHE TOKENIZERS_PARALLELISM WANDB_RUN_ID SLURM_JOB_ID "
        "SLURM_PROCID PMI_RANK OMPI_COMM_WORLD_RANK MKL_NUM_THREADS KMP_AFFINITY LD_LIBRARY_PATH CI GITHUB_RUN_ID "
        "GITHUB_WORKSPACE RUNNER_TEMP MANPATH CPATH LIBRARY_PATH CLASSPATH http_proxy https_proxy no_proxy LS_COLORS "
        "COLUMNS LINES SSH_AUTH_SOCK JAVA_HOME GOPATH CARGO_HOME NODE_PATH HOSTTYPE SUDO_USER COLORTERM "
        "DBUS_SESSION_BUS_ADDRESS HISTSIZE PS1 MPLBACKEND RUNPOD_POD_ID JUPYTER_PASSWORD MAX_JOBS CC CXX CFLAGS "
        "DEBIAN_FRONTEND PIP_NO_CACHE_DIR SOURCE_DATE_EPOCH TF_CPP_MIN_LOG_LEVEL _"
    ).split()
}


def test_a_real_environment_is_never_read_as_a_misspelt_setting():
    assert [name for name in {**POD_ENV, **TORCHRUN_ENV} if tg.resembled_setting(name)] == []
    env = {**clean_env(), **POD_ENV, **TORCHRUN_ENV, "PRESET": "smoke"}  # this machine's environment too
    tg.hyperparameters_from_env(env, cuda_available=False)


@pytest.mark.parametrize("name, setting", [
    ("SEEDS", "SEED"), ("ITERATION", "ITERATIONS"), ("DATA_PAHT", "DATA_PATH"), ("RUNID", "RUN_ID"),
    ("VOCABSIZE", "VOCAB_SIZE"), ("PRESETS", "PRESET"), ("seed", "SEED"), ("Matrix_Lr", "MATRIX_LR"),
    ("NUMLAYERS", "NUM_LAYERS"), ("LAYERS", "NUM_LAYERS"), ("MAX_WALLCLOCK", "MAX_WALLCLOCK_SECONDS"),
    ("WARMUPSTEPS", "WARMUP_STEPS"), ("EMADECAY", "EMA_DECAY"), ("COMPILED", "COMPILE"),
    ("TOKENIZER", "TOKENIZER_PATH"), ("MUON_MOMENTUMM", "MUON_MOMENTUM"), ("TRAIN_STEPS", "ITERATIONS"),
    ("STEPS", "ITERATIONS"), ("MAX_STEPS", "ITERATIONS"), ("MAX_ITERS", "ITERATIONS"), ("TRAIN_SEQLEN", "TRAIN_SEQ_LEN"),
    ("EVALONLY", "EVAL_ONLY"), ("ARTIFACTPATH", "ARTIFACT_PATH"), ("LOGIT_SOFTCAPP", "LOGIT_SOFTCAP"),
])
def test_a_misspelt_setting_stops_the_run_naming_the_setting(name, setting):
    env = {**clean_env(), **TORCHRUN_ENV, "PRESET": "smoke", name: "3"}
    with pytest.raises(tg.RunError) as error:
        tg.hyperparameters_from_env(env, cuda_available=False)
    message = str(error.value)
    assert message.startswith(f"{name} is not a setting; did you mean {setting}?") and "\n" not in message, message


@pytest.mark.parametrize("name", sorted(tg.REMOVED_SETTINGS))
def test_a_removed_setting_stops_the_run_naming_its_constant(name):
    """GRAD_CLIP_NORM=0 would otherwise train clipped at 0.3 without a word (no setting resembles it)."""
    with pytest.raises(tg.RunError, match=rf"^{name} is no longer a setting: every record ran .+, now a constant"):
        tg.hyperparameters_from_env({**clean_env(), "PRESET": "smoke", name: "0"}, cuda_available=False)
    assert not {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)} & set(tg.REMOVED_SETTINGS)


def test_every_field_name_is_itself():
    for field in dataclasses.fields(tg.Hyperparameters):
        assert tg.resembled_setting(field.name.upper()) == field.name.upper()


# Every field's impossible values, as env strings. A field with none is listed in ANYTHING_GOES with the
# reason; a new field must be added to one of the two (the last test fails otherwise).
IMPOSSIBLE = {
    "data_path": [""], "tokenizer_path": [""], "vocab_size": ["3", "65537", "1.5"],
    "run_id": ["a/b", "../x", ".hidden", "a b"], "seed": ["-1", str(2**63)], "preset": ["bogus", ""],
    "scale": ["bogus", "TOY", ""],
    "iterations": ["0", "-5"], "max_wallclock_seconds": ["-1", "nan", "inf"], "warmup_steps": ["-1"],
    "warmdown_iters": ["-1"], "train_batch_tokens": ["0", "-1024", "1000"], "train_seq_len": ["0", "1", "-2"],
    "train_log_every": ["0"], "val_loss_every": ["-1"], "eval_seq_len": ["1", "-4"], "eval_stride": ["-1", "129"],
    "val_batch_size": ["0", "127"], "num_layers": ["1", "0"], "model_dim": ["0", "63"], "num_heads": ["0", "3"],
    "num_kv_heads": ["0", "3"], "mlp_mult": ["0"], "rope_base": ["0", "1", "-10000", "nan"],
    "logit_softcap": ["0", "-30", "inf"], "qk_gain_init": ["0", "-1.5", "nan"],
    "bigram_vocab_size": ["1", "-1"], "bigram_dim": ["0"],
    "smear_mode": ["both"], "rope_dims": ["3", "-2", "18"], "xsa_last_n": ["-1", "3"],
    "mlp_negative_slope": ["-0.5", "nan"], "lanes_from": ["-1", "2"], "recur_blocks": ["0,0", "5", "x"],
    "recur_start_frac": ["1", "-0.1"], "qat_bits": ["3", "16"], "matrix_lr": ["0", "-0.02", "nan"],
    "scalar_lr": ["0"], "tied_embed_lr": ["-1"], "muon_momentum": ["1", "-0.1"],
    "muon_momentum_warmup_steps": ["-1"],
    "muon_wd": ["-0.04", "100"], "adam_beta2": ["1.0"],
    "adam_wd": ["-0.01", "1000"], "lr_floor": ["1", "-0.1"], "swa_interval": ["-1"],
    "ema_decay": ["1", "-0.5"],
    "val_tokens": ["-1"], "artifact_limit_bytes": ["0", "-1"], "quant_bits_mlp": ["7", "3"],
    "quant_bits_embed": ["6"], "compile": ["yes"],
    "gptq_calib_tokens": ["-1"], "gptq_reserve_seconds": ["-2"], "ln_scale": ["2"], "muon_row_norm": ["yes"],
    "bigram_adam": ["-1"], "cpu_autocast": ["on"], "clip_search": ["maybe"],
    "ttt_enabled": ["2"], "ttt_lr_scale": ["-1", "nan"], "ttt_lora_rank": ["0"], "ttt_chunk_tokens": ["0"],
    "ttt_batch_docs": ["0"], "ttt_phases": ["many", "1,,2", "-5"], "eval_budget_seconds": ["0", "-1", "inf"],
    "attn_backend": ["fastest", "FLASH"],
    "virtual_depth": ["2"], "recur_untie_mlp": ["yes"], "first_block_mlp_only": ["-1"], "ve_layers": ["x", "99"],
    "skip_gates": ["on"], "lane_formula": ["both"], "smear_zero_start": ["2"], "rope_ntk_len": ["-1"],
    "bigram_proj_adam": ["maybe"], "bigram_proj_gain": ["-1", "nan"], "ve_dim": ["0", "-1"],
    "compressor": ["lzma", "ZSTD"], "int6_matrices": ["-1"], "quant_min_range": ["-1", "inf"], "gptq_selfgen_seqs": ["-1"],
    "sdclip_attn": ["-1", "nan"], "sdclip_mlp": ["-11.5"], "sdclip_embed": ["-14", "inf"], "sdclip_other": ["-0.1"],
    "gptq_embed": ["2"], "quant_gates_int8": ["yes"], "lqer_top": ["-1", "1.5"], "awq_groups": ["-1"],
    "doc_attention": ["2"], "attn_gate_window": ["-1", "65"], "smear_window": ["-1", "12"],  # smoke: 64 dims, channel
    "recur_repeats": ["0", "9"], "recur_in_unet": ["2"], "warmdown_frac": ["-0.1", "1.5", "nan"],
    "train_seq_schedule": ["x", "64:0.5", "128:0,64:0"], "muon_wd_taper": ["-1", "nan"],
    "muon_wd_taper_from": ["1", "-0.1"], "muon_ns": ["polar", "cubic"], "embed_wd": ["-0.5", "nan", "40"],
}
ANYTHING_GOES = {
    "artifact_path": "a path; its folder is checked at start with the other outputs",
    "eval_only": "a path; the file is checked when it is read",
}


@pytest.mark.parametrize("name, raw", [(n, v) for n, values in IMPOSSIBLE.items() for v in values])
def test_every_impossible_value_is_rejected_at_start_naming_the_setting(name, raw):
    env = {"PRESET": "smoke", name.upper(): raw}
    with pytest.raises(tg.RunError) as error:
        tg.hyperparameters_from_env(env, cuda_available=False)
    assert name.upper() in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_every_field_is_covered():
    names = {f.name for f in dataclasses.fields(tg.Hyperparameters)}
    assert names == set(IMPOSSIBLE) | set(ANYTHING_GOES), names ^ (set(IMPOSSIBLE) | set(ANYTHING_GOES))
    tg.hyperparameters_from_env({"PRESET": "smoke"}, cuda_available=False)  # the defaults are all possible


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': expected an integer"), ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"WORLD_SIZE": "3"}, "WORLD_SIZE=3"), ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1"),
])
def test_torchrun_variables_are_checked_too(monkeypatch, env, words):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(tg.RunError) as error:
        tg.init_runtime()
    assert words in str(error.value), str(error.value)
