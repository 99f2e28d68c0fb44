"""Parameter Golf submission: the seed records (PR #76, #236, #192), the 1.1063 record (PR #1204) and the
1.06 stack (PR #1855, sp8192) by name, and `frontier`: PR #1204 plus what the leaderboard measured beating it.

    torchrun --standalone --nproc_per_node=8 train_gpt.py     # the frontier: 8xH100, FineWeb, 600 s
    PRESET=pr76 torchrun --standalone --nproc_per_node=8 train_gpt.py   # a record (pr76, pr236, pr192, pr1204)
    python3 train_gpt.py                                      # no GPU: the CPU smoke preset

Trains a GPT on FineWeb within MAX_WALLCLOCK_SECONDS, quantizes it and compresses it into an artifact
that fits, with this file, in 16,000,000 bytes, then scores the reloaded model in bits per byte of the
validation text. Every knob is an environment variable (Hyperparameters); the log logs/<RUN_ID>.txt holds
this source, every setting and the machine. Techniques and their sources: docs/techniques.md.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import copy
import dataclasses
import difflib
import functools
import glob
import hashlib
import importlib
import itertools
import json
import lzma
import math
import os
import platform
import re
import shutil
import signal
import struct
import sys
import time
import typing
import uuid
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import zstandard
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# Configuration
#
# One frozen dataclass, read from the environment in one place: field `foo_bar` is env var FOO_BAR,
# parsed with the field's type. The defaults are the record PR #76; PRESET names a whole configuration
# (auto: `smoke` without CUDA, `frontier` on a GPU). Rationale and history: docs/notes/configuration.md.

SCRIPT_DIR = Path(__file__).resolve().parent
SLICES_PER_STEP = 8  # a step is 8 micro-batches, as on 8 GPUs; fewer GPUs accumulate 8 / world_size
BOS_ID = 1

class RunError(Exception):
    """An error a user can fix; main() prints it as one line and exits non-zero."""

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's shape and techniques: the artifact stores them (in this order), EVAL_ONLY rebuilds from them."""
    # The network (ModelConfig: stored in the artifact)
    vocab_size: int = 1024  # tokenizer pieces (the embedding's rows; ids 0-3 are pad, bos, eos, unk)
    num_layers: int = 12  # transformer blocks
    model_dim: int = 512  # residual width
    num_heads: int = 8  # query heads
    num_kv_heads: int = 4  # key/value heads (grouped-query attention)
    mlp_mult: int = 3  # MLP hidden width = MLP_MULT x MODEL_DIM
    rope_base: float = 10000.0  # RoPE's frequencies are powers of 1/ROPE_BASE
    logit_softcap: float = 30.0  # logits = cap x tanh(z / cap) (modded-nanogpt)
    bigram_vocab_size: int = 2048  # BigramHash buckets (PR #192; 0: off)
    bigram_dim: int = 96  # BigramHash embedding width, projected to MODEL_DIM
    train_seq_len: int = 1024  # training sequence length
    smear_mode: str = "channel"  # channel: per-channel gate (PR #76) | scalar: input-dependent gate (PR #192)
    # Techniques after the seed records (PR #315, #1204, #1855 and others), each off at its default
    rope_dims: int = 0  # partial RoPE: rotate only the first ROPE_DIMS dims of each head (0: all)
    xsa_last_n: int = 0  # exclusive self attention (arXiv 2603.09078) in the last XSA_LAST_N blocks
    ln_scale: bool = False  # scale block l's normalized sublayer inputs by 1/sqrt(l+1)
    mlp_negative_slope: float = 0.0  # MLP activation leaky_relu(x, slope)^2 (0: relu^2)
    lanes_from: int = 0  # parallel residual lanes from this block on (0: one stream)
    recur_blocks: str = ""  # depth recurrence: contiguous blocks run again, e.g. "4,5" (empty: off)
    virtual_depth: bool = False  # blocks counted by position in the run order, the repeat included
    recur_untie_mlp: bool = False  # the repeated pass has its own MLP weights, copied from the base at the switch
    first_block_mlp_only: bool = False  # block 0 has no attention
    ve_layers: str = ""  # value embeddings added to v at these (virtual) block positions, e.g. "9,10"
    ve_dim: int = 128  # value embeddings: one VOCAB_SIZE x VE_DIM table projected to the KV width
    skip_gates: bool = False  # U-Net skips gated: x <- lerp(w * skip, x, sigmoid(g)), g starting at 0
    lane_formula: str = "stream"  # stream: x0 mix replaces both lanes | read: sublayers read it | parallel (PR #1855)
    smear_zero_start: bool = False  # SmearGate blends a document's first position with zero
    rope_ntk_len: int = 0  # RoPE base NTK-scaled for sequences longer than this (PR #1204: 1024; 0: off)
    doc_attention: bool = False  # each document (from a BOS on) attends only to itself, in every forward pass
    attn_gate_window: int = 0  # sparse attention output gate: y_h *= sigmoid(0.5 W_h . x[:N]) per head (0: off)
    smear_window: int = 0  # SMEAR_MODE=scalar: the gate reads x_t[:SMEAR_WINDOW] only (0: all channels)
    recur_repeats: int = 1  # extra passes of RECUR_BLOCKS (PR #1855: 2)
    recur_in_unet: bool = False  # the U-Net halves split the run's positions, repeats included; controls per block

@dataclasses.dataclass(frozen=True)
class Hyperparameters(ModelConfig):
    """The run's whole configuration: the model's (ModelConfig) and every other setting."""
    # Data and run identity
    data_path: str = "./data/datasets/fineweb10B_sp1024"  # the folder of fineweb_{train,val}_*.bin token shards
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"  # the SentencePiece model of the shards
    run_id: str = ""  # names logs/RUN_ID.txt (empty: a fresh id per run)
    seed: int = 1337  # the random seed: initial weights (the same on every rank), GPTQ's sampled calibration
    preset: str = "auto"  # auto | pr76 | pr236 | pr192 | pr1204 | frontier | sp8192 | smoke (see PRESETS)
    scale: str = "full"  # full: the preset as it is | toy: the preset shrunk by TOY, for a CPU or a small GPU
    # Schedule
    iterations: int = 20000  # optimizer steps at most
    max_wallclock_seconds: float = 600.0  # the training time cap (0: no cap)
    warmup_steps: int = 20  # compile warm-up; weights, optimizers and data are reset after it
    warmdown_iters: int = 2000  # the LR falls linearly to 0 over the last this many steps (at the measured step time)
    warmdown_frac: float = 0.0  # instead: warmdown over the last this fraction of the run (PR #1855: 0.85; 0: off)
    train_batch_tokens: int = 524_288  # tokens per optimizer step, all ranks together
    train_seq_schedule: str = ""  # progressive context "LEN:FRAC,...", e.g. "1024:0,2048:0.3,3072:0.6" (empty: off)
    train_log_every: int = 200  # log the training loss every this many steps
    val_loss_every: int = 0  # evaluate every this many steps (0: only at the end)
    # Evaluation
    eval_seq_len: int = 0  # evaluation window (0: TRAIN_SEQ_LEN)
    eval_stride: int = 64  # sliding-window stride: each window scores its last this many targets (0: no sliding)
    val_batch_size: int = 524_288  # tokens per evaluation batch, all ranks together
    val_tokens: int = 0  # score only the first N validation targets, a proxy for sweeps (0: the whole split)
    # The model's initialization and training (not stored in the artifact)
    qk_gain_init: float = 1.5  # initial per-head query gain after the QK norm
    recur_start_frac: float = 0.5  # the recurrence starts at this fraction of the run (steps or wallclock, further)
    qat_bits: int = 0  # straight-through fake quantization of block matrices while training (PR #192; 0: off)
    # Optimizers: Muon for block matrices and the bigram projection, Adam for the rest
    matrix_lr: float = 0.025  # Muon's learning rate
    scalar_lr: float = 0.025  # Adam's learning rate for the control tensors
    tied_embed_lr: float = 0.035  # Adam's learning rate for the embedding tables
    muon_momentum: float = 0.98  # Muon's Nesterov momentum
    muon_momentum_warmup_steps: int = 1500  # steps of Muon's momentum rising from 0.92 to MUON_MOMENTUM (0: none)
    muon_ns: str = "quintic"  # Newton-Schulz coefficients: quintic (fixed) | polar_express (per step, PR #1855)
    muon_wd: float = 0.04  # Muon's decoupled weight decay
    muon_wd_taper: float = 1.0  # Muon's WD multiplier at the end, linear from MUON_WD_TAPER_FROM (PR #1729; 1: off)
    muon_wd_taper_from: float = 0.7  # the fraction of the run where the WD taper starts
    muon_row_norm: bool = False  # MuonEq-R (arXiv 2603.28254): update rows at unit norm before Newton-Schulz
    adam_beta2: float = 0.95  # Adam's beta2
    adam_wd: float = 0.0  # AdamW decay (PR #76's write-up says 0; its code defaulted to 0.01 coupled L2)
    embed_wd: float = -1.0  # AdamW decay of the embedding tables (-1: ADAM_WD; PR #1855: 0.085)
    bigram_adam: bool = False  # the bigram table and projection in the Adam scalar group (PR #236)
    bigram_proj_adam: bool = False  # only the bigram projection there, the table with the embedding (PR #1204)
    bigram_proj_gain: float = 0.0  # orthogonal init gain of the bigram projection (0: (2 x NUM_LAYERS)^-0.5)
    lr_floor: float = 0.0  # the warmdown's LR multiplier never falls below this
    # Weight averaging (what gets quantized)
    swa_interval: int = 50  # SWA: a snapshot every this many steps (PR #76; 0: off)
    ema_decay: float = 0.0  # EMA of the weights after every step, instead of SWA (0: off)
    # Score-first test-time training (its section), after the standard scores
    ttt_enabled: bool = False  # per-document scoring with LoRA adapters and global SGD phases
    ttt_lr_scale: float = 1.0  # multiplies every TTT learning rate (0: exactly the per-document plain score)
    ttt_lora_rank: int = 80  # rank of the per-document LoRA adapters
    ttt_chunk_tokens: int = 48  # tokens scored, then trained on, per step of a document
    ttt_batch_docs: int = 64  # documents adapting side by side (per GPU)
    ttt_phases: str = "2500"  # global SGD phases after these numbers of scored documents (empty: none)
    eval_budget_seconds: float = 600.0  # TTT stops adapting (and keeps scoring) rather than pass this
    # Artifact
    artifact_path: str = ""  # where the artifact is written (empty: logs/<RUN_ID>.ptz)
    artifact_limit_bytes: int = 16_000_000  # the cap on artifact plus code
    quant_bits_mlp: int = 5  # per-row integer bits of the MLP matrices (4, 5, 6 or 8)
    quant_bits_embed: int = 16  # the tied embedding: 16 (fp16), 8 (int8 per row) or 7 (int7 per row)
    quant_min_range: float = 0.0  # every row's grid spans at least +-this (PR #1204: 1.0; 0: off)
    int6_matrices: int = 0  # int6 for N block matrices and the bigram projection, int5 the rest (PR #1204: 32)
    compressor: str = "zstd"  # zstd | brotli (quality 11, PR #1204) | ans (the integer codes ANS-coded)
    # The 1.06 stack's quantizer (PR #1855, #1908), each off at its default
    sdclip_attn: float = 0.0  # SDClip: row scale k x std(row) / qmax, k for attention matrices (0: CLIP_SEARCH)
    sdclip_mlp: float = 0.0  # SDClip's k for MLP matrices (0: CLIP_SEARCH)
    sdclip_embed: float = 0.0  # SDClip's k for the tied embedding
    sdclip_other: float = 0.0  # SDClip's k for the bigram and value-embedding tables
    gptq_embed: bool = False  # GPTQ rounds the tied embedding as the output head (Hessian of the head's input)
    quant_gates_int8: bool = False  # the attention output gates int8 per row (else fp16)
    lqer_top: int = 0  # LQER: rank-4 int2 x int4 correction of the LQER_TOP matrices with the largest error
    awq_groups: int = 0  # AWQ-lite: the AWQ_GROUPS most salient 64-column groups of the model kept at int8
    # Systems
    compile: str = "auto"  # torch.compile: auto (on when CUDA is present) | 0 | 1
    cpu_autocast: bool = False  # bf16 autocast on CPU too (fast where the CPU has AMX / AVX512-BF16)
    attn_backend: str = "auto"  # attention kernel: auto | flash | efficient | cudnn | math | fa3 | fa4 | flex
    eval_only: str = ""  # path to an artifact: score it (model shape from the artifact), train nothing
    # GPTQ rounding, calibrated after training
    gptq_calib_tokens: int = 524_288  # training tokens read for calibration, in the training time (0: off)
    gptq_reserve_seconds: float = 2.0  # the training loop stops this early to leave time for that read
    gptq_selfgen_seqs: int = 0  # instead: calibrate on this many sequences sampled from the model (PR #1204: 64)
    clip_search: bool = True  # per-row clip search: lower quantization error, more bytes

    @property
    def model_eval_seq_len(self) -> int:
        return self.eval_seq_len or self.train_seq_len

    @property
    def loop_cap_seconds(self) -> float:
        """The training loop's wallclock cap (0: none): MAX_WALLCLOCK_SECONDS less the GPTQ reserve."""
        reserve = self.gptq_reserve_seconds if self.gptq_calib_tokens else 0.0
        return max(self.max_wallclock_seconds - reserve, 0.0) if self.max_wallclock_seconds else 0.0

# A preset's values replace the defaults (PR #76); env vars override both. Bugs left out: docs/notes/configuration.md
PR236 = dict(  # 11L, seq 2048, int6 with an int8 embedding, SWA every 200 steps (PR #236, 1.1400)
    num_layers=11, train_seq_len=2048, bigram_dim=128, bigram_adam=True, muon_momentum=0.99,
    warmdown_iters=3000, adam_wd=0.04, swa_interval=200, quant_bits_mlp=6, quant_bits_embed=8,
)
PR192 = dict(  # 11L, seq 2048, no BigramHash, scalar SmearGate, int6 fake quantization from step 0 (PR #192, 1.1502)
    num_layers=11, train_seq_len=2048, bigram_vocab_size=0, smear_mode="scalar", matrix_lr=0.02,
    scalar_lr=0.02, tied_embed_lr=0.03, muon_momentum=0.99, muon_wd=0.038, warmdown_iters=3000,
    swa_interval=0, qat_bits=6, quant_bits_mlp=6, clip_search=False, gptq_calib_tokens=0,
)
PR1204 = dict(  # the record as it ran: README command, code defaults and logs (PR #1204, 1.1063)
    num_layers=11, train_seq_len=2048, train_batch_tokens=786_432, warmdown_iters=3500, matrix_lr=0.03,
    muon_momentum=0.99, adam_wd=0.04, swa_interval=0, ema_decay=0.997, bigram_vocab_size=2816, bigram_dim=160,
    bigram_proj_adam=True, bigram_proj_gain=1.0, smear_zero_start=True, xsa_last_n=11, rope_dims=16,
    rope_ntk_len=1024, ln_scale=True, mlp_negative_slope=0.5, ve_layers="9,10", first_block_mlp_only=True,
    lanes_from=7, lane_formula="read", skip_gates=True, recur_blocks="4,5", recur_start_frac=0.48,
    recur_untie_mlp=True, virtual_depth=True, quant_bits_mlp=5, quant_bits_embed=8, int6_matrices=32,
    gptq_calib_tokens=0, gptq_selfgen_seqs=64, compressor="brotli", quant_min_range=1.0,
)
# Ours: PR #1204 plus what later records measured beating it (MuonEq-R, query gain 5.0)
FRONTIER = dict(PR1204, muon_row_norm=True, qk_gain_init=5.0)
# The 1.06 stack on 8,192 pieces as its README command and log ran it (PR #1855, 1.0611)
SP8192 = dict(
    data_path="./data/datasets/fineweb10B_sp8192", tokenizer_path="./data/tokenizers/fineweb_8192_bpe.model",
    vocab_size=8192, num_layers=11, mlp_mult=4, train_seq_len=2048, train_batch_tokens=786_432,
    bigram_vocab_size=0, xsa_last_n=11, rope_dims=16, ln_scale=True, mlp_negative_slope=0.5, qk_gain_init=5.0,
    skip_gates=True, lanes_from=8, lane_formula="parallel", recur_blocks="3,4,5", recur_repeats=2,
    recur_start_frac=0.35, recur_in_unet=True, smear_mode="scalar", smear_window=12, attn_gate_window=12,
    doc_attention=True, matrix_lr=0.026, scalar_lr=0.02, tied_embed_lr=0.03, muon_momentum=0.97,
    muon_wd=0.095, muon_row_norm=True, muon_ns="polar_express", adam_beta2=0.99, adam_wd=0.02, embed_wd=0.085,
    warmdown_iters=0, warmdown_frac=0.85, lr_floor=0.1, swa_interval=0, ema_decay=0.9965,
    gptq_calib_tokens=32 * 786_432, gptq_reserve_seconds=12.0, quant_bits_mlp=6, quant_bits_embed=7,
    gptq_embed=True, sdclip_attn=13.0, sdclip_mlp=11.5, sdclip_embed=14.0, sdclip_other=12.85,
    quant_gates_int8=True, lqer_top=3, compressor="ans", ttt_enabled=True, ttt_phases="833,1666,2500",
    eval_stride=0,
)
SMOKE = dict(  # the frontier's pipeline at toy size on the sample in tests/fixtures: the CPU pre-flight check
    data_path=str(SCRIPT_DIR / "tests/fixtures/sample"),
    tokenizer_path=str(SCRIPT_DIR / "tests/fixtures/sample_1024_bpe.model"),
    iterations=60, max_wallclock_seconds=0.0, warmup_steps=2, warmdown_iters=20,
    train_batch_tokens=4096, train_seq_len=128, train_log_every=10, eval_stride=64,
    val_batch_size=16384, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2,
    bigram_vocab_size=256, bigram_dim=32, muon_momentum_warmup_steps=20, swa_interval=0, ema_decay=0.9,
    gptq_calib_tokens=16384, xsa_last_n=2, rope_dims=8, ln_scale=True, mlp_negative_slope=0.5, lanes_from=1,
    recur_blocks="0", muon_row_norm=True, quant_bits_mlp=6,
)
# pr76: the defaults (PR #76, 1.1433)
PRESETS = {"pr76": {}, "pr236": PR236, "pr192": PR192, "pr1204": PR1204, "frontier": FRONTIER, "sp8192": SP8192,
           "smoke": SMOKE}
# SCALE=toy: any preset at tests/golden.py's toy size, its depth and techniques kept (docs/notes/configuration.md)
RECORD_TOKENS = 9_234 * 524_288  # a 600 s run's training tokens: PR #76's 9,234 steps at 65 ms (bench/SPEED.md)
TOY = dict(
    model_dim=128, num_heads=4, num_kv_heads=2, train_seq_len=128, train_batch_tokens=2048, val_batch_size=8192,
    iterations=300, max_wallclock_seconds=0.0, warmup_steps=1, train_log_every=25, ttt_batch_docs=4, ttt_lora_rank=4,
)

def toy_settings(p: Hyperparameters, iterations: int) -> dict:
    """TOY, with p's step counts, EMA horizon and TTT phases at their share of the run (docs/notes/configuration.md)."""
    share = max(iterations, 1) / min(p.iterations, RECORD_TOKENS / p.train_batch_tokens if p.max_wallclock_seconds
                             else math.inf)
    steps = {k: max(1, round(getattr(p, k) * share)) if getattr(p, k) else 0
             for k in ("warmdown_iters", "muon_momentum_warmup_steps", "swa_interval")}
    phases = [max(1, n * TOY["ttt_batch_docs"] // p.ttt_batch_docs) for n in ttt_phase_counts(p)]
    return dict(TOY, **steps, ema_decay=max(1 - (1 - p.ema_decay) / share, 0.5) if p.ema_decay else 0.0,
                gptq_calib_tokens=2048 if p.gptq_calib_tokens else 0,  # one step's tokens
                gptq_selfgen_seqs=4 if p.gptq_selfgen_seqs else 0, ttt_phases=",".join(map(str, phases)))

DOWNLOAD_HINT = ("download FineWeb with python3 data/cached_challenge_fineweb.py --variant sp{vocab_size} (in a clone "
                 "of openai/parameter-golf), or set DATA_PATH and TOKENIZER_PATH")

def parse_env_value(name: str, raw: str, kind: type):
    """One env var's text as the field's type (a NaN or inf fails field_checks); RunError naming it if not one."""
    try:
        return {"0": False, "1": True, "false": False, "true": True}[raw.lower()] if kind is bool else kind(raw)
    except (KeyError, ValueError):
        expected = {int: "an integer", float: "a finite number", bool: "0, 1, true or false"}[kind]
        raise RunError(f"{name}={raw!r}: expected {expected}") from None

def choose_preset(values: dict, cuda_available: bool) -> str:
    """PRESET=auto: smoke without CUDA, frontier on a GPU (without FineWeb an error, not a smoke run exiting 0)."""
    preset, data_path = values.get("preset", "auto"), values.get("data_path", Hyperparameters.data_path)
    if preset == "auto" and cuda_available and not Path(data_path).is_dir():
        hint = DOWNLOAD_HINT.format(vocab_size=values.get("vocab_size", Hyperparameters.vocab_size))
        raise RunError(f"DATA_PATH={data_path} ({Path(data_path).resolve()}): no FineWeb there; {hint}, or run "
                       f"PRESET=smoke for the pre-flight check")
    preset = ("frontier" if cuda_available else "smoke") if preset == "auto" else preset
    if preset == "smoke" and "data_path" not in values and not Path(SMOKE["data_path"]).is_dir():
        raise RunError(f"PRESET=smoke trains on the sample in {SMOKE['data_path']}, which is not here: copy "
                       f"tests/fixtures/ next to train_gpt.py, or set DATA_PATH and TOKENIZER_PATH")
    return preset

# Settings no preset turned and no record needed, now the constant every record ran: set, they stop the run
REMOVED_SETTINGS = dict(
    MUON_MOMENTUM_WARMUP_START="0.92", MUON_BACKEND_STEPS="5", ADAM_BETA1="0.9", ADAM_EPS="1e-8", GRAD_CLIP_NORM="0.3",
    SWA_START_FRAC="0.5", TIED_EMBED_INIT_STD="0.005", BIGRAM_SCALE_INIT="0.05", ZSTD_LEVEL="22",
    GPTQ_SELFGEN_LEN="TRAIN_SEQ_LEN", QUANT_BITS_ATTN="6", TTT_PLAIN_SCORE="0 (the plain score is TTT_LR_SCALE=0)")

def hyperparameters_from_env(env: dict[str, str], cuda_available: bool) -> tuple[Hyperparameters, str]:
    """Build the config from env vars; returns it with the preset actually applied."""
    for name in sorted(env):
        if name.upper() in REMOVED_SETTINGS:
            raise RunError(f"{name} is no longer a setting: every record ran {REMOVED_SETTINGS[name.upper()]}, now a "
                           f"constant (unset it)")
        setting = resembled_setting(name)
        if setting is not None and name != setting:
            raise RunError(f"{name} is not a setting; did you mean {setting}? (nothing reads {name}: unset or "
                           f"rename it)")
    values = {f.name: parse_env_value(f.name.upper(), env[f.name.upper()], type(f.default))
              for f in dataclasses.fields(Hyperparameters) if f.name.upper() in env}
    preset = choose_preset(values, cuda_available)
    chosen = PRESETS.get(preset, {})  # an unknown PRESET fails validate's CHOICES
    if values.get("scale") == "toy":  # between the preset and the env vars
        chosen = {**chosen, **toy_settings(Hyperparameters(**chosen), values.get("iterations", TOY["iterations"]))}
    h = Hyperparameters(**{**chosen, **values, "preset": preset})
    validate(h)
    return h, preset

# An env var that looks like a setting stops the run, other tools' never do (docs/notes/configuration.md)
_KNOB_PREFIXES = tuple("TRAIN_ EVAL_ VAL_ MUON_ ADAM_ SWA_ BIGRAM_ MODEL_ NUM_ MLP_ WARMUP WARMDOWN MATRIX_ SCALAR_ "
                       "TIED_ ARTIFACT_ ZSTD_ GPTQ_ CLIP_ QUANT_ ROPE_ XSA_ LN_ LANES_ RECUR_ QAT_ SMEAR_ LR_ EMA_ "
                       "TTT_ ATTN_ VIRTUAL_ FIRST_ VE_ SKIP_ LANE_".split())
_FOREIGN_PREFIXES = tuple("CUDA TORCH NCCL NV CUDNN CUBLAS TRITON OMP_ MKL KMP_ OPENBLAS GOTO PYTHON PYTEST LD_ LC_ "
                          "XDG_ SSH_ GIT CONDA PIP_ VIRTUAL_ENV MASTER_ TORCHELASTIC LOCAL_ GROUP_ ROLE_ SLURM PMI "
                          "OMPI PMIX HF_ HUGGING TOKENIZERS_ TRANSFORMERS WANDB CI_ RUNNER_ DOCKER KUBERNETES AWS_ "
                          "GOOGLE AZURE RUNPOD JUPYTER SUDO_".split())
# Other trainers' names for ITERATIONS (nanoGPT's max_iters, Hugging Face's max_steps)
_ALIASES = dict.fromkeys("STEPS TRAIN_STEPS NUM_STEPS MAX_STEPS TOTAL_STEPS ITERS MAX_ITERS TRAIN_ITERS "
                         "NUM_ITERS".split(), "ITERATIONS")

def resembled_setting(name: str) -> str | None:
    """The setting an env var's name looks like (itself if it is one), or None for a foreign variable."""
    upper, known = name.upper(), [f.name.upper() for f in dataclasses.fields(Hyperparameters)]
    if upper in known or upper in _ALIASES:
        return _ALIASES.get(upper, upper)
    if upper.startswith(_FOREIGN_PREFIXES):
        return None
    part = [k for k in known if len(upper) >= 5 and (k.startswith(upper + "_") or k.endswith("_" + upper))]
    bare = {k.replace("_", ""): k for k in known}
    close = part or difflib.get_close_matches(upper, known, n=1, cutoff=0.8) or \
        [bare[m] for m in difflib.get_close_matches(upper.replace("_", ""), bare, n=1, cutoff=0.8)]
    if close:  # a part first: LAYERS is NUM_LAYERS (the first such setting), not VE_LAYERS
        return close[0]
    return difflib.get_close_matches(upper, known, n=1, cutoff=0)[0] if upper.startswith(_KNOB_PREFIXES) else None

# Each numeric field's possible values as an interval ("[" and "]" include the end); any other is finite.
RANGES = {
    "[0, inf)": "max_wallclock_seconds warmup_steps warmdown_iters val_loss_every mlp_negative_slope rope_ntk_len "
                "muon_momentum_warmup_steps muon_wd muon_wd_taper adam_wd bigram_proj_gain "
                "swa_interval val_tokens ttt_lr_scale quant_min_range int6_matrices sdclip_attn sdclip_mlp "
                "sdclip_embed sdclip_other lqer_top awq_groups gptq_calib_tokens gptq_reserve_seconds "
                "gptq_selfgen_seqs",
    "[1, inf)": "iterations train_log_every model_dim num_heads num_kv_heads mlp_mult bigram_dim ve_dim "
                "ttt_lora_rank ttt_chunk_tokens ttt_batch_docs",
    "[2, inf)": "train_seq_len num_layers",  # the U-Net pairs encoder and decoder blocks
    "(0, inf)": "logit_softcap qk_gain_init matrix_lr scalar_lr tied_embed_lr eval_budget_seconds "
                "artifact_limit_bytes",
    "(1, inf)": "rope_base",
    "[0, 1)": "recur_start_frac muon_momentum muon_wd_taper_from adam_beta2 lr_floor ema_decay",
    "[0, 1]": "warmdown_frac", "[1, 8]": "recur_repeats",
    "[4, 65536]": "vocab_size",  # ids 0-3 are pad, bos, eos, unk; shards hold uint16 ids
}
CHOICES = dict(  # the fields with a few possible values (PRESET, MUON_NS, COMPRESSOR, ATTN_BACKEND: their tables)
    scale=("full", "toy"), smear_mode=("channel", "scalar"), lane_formula=("stream", "read", "parallel"),
    compile=("auto", "0", "1"), qat_bits=(0, 4, 5, 6, 8), quant_bits_mlp=(4, 5, 6, 8), quant_bits_embed=(7, 8, 16))

def in_interval(value: float, interval: str) -> bool:
    """Whether value lies in an interval written like "[0, 1)" (a bracket includes its end)."""
    lo, hi = (float(end) for end in interval[1:-1].split(","))
    return (lo <= value if interval[0] == "[" else lo < value) and (value <= hi if interval[-1] == "]" else value < hi)

def validate(h: Hyperparameters) -> None:
    """RunError naming the variables for an impossible value or combination; ranges first (some checks divide)."""
    for checks in (field_checks, combination_checks, technique_checks):
        for ok, message in checks(h):
            if not ok:
                raise RunError(message)

def field_checks(h: Hyperparameters) -> list[tuple[bool, str]]:
    """Every field's impossible values: a NaN from ROPE_BASE=0 is found at start, not after training."""
    numbers = {f.name: "(-inf, inf)" for f in dataclasses.fields(h) if type(f.default) in (int, float)}
    numbers.update((name, interval) for interval, names in RANGES.items() for name in names.split())
    choices = dict(CHOICES, preset=("auto", *PRESETS), muon_ns=NEWTON_SCHULZ_COEFFS, compressor=COMPRESSORS,
                   attn_backend=ATTN_BACKENDS)
    return [(in_interval(getattr(h, n), interval), f"{n.upper()}={getattr(h, n)}: must be in {interval}")
            for n, interval in numbers.items()] + [
        (getattr(h, n) in allowed, f"{n.upper()}={getattr(h, n)!r}: expected one of {', '.join(map(str, allowed))}")
        for n, allowed in choices.items()] + [
        (bool(h.data_path) and bool(h.tokenizer_path), "DATA_PATH and TOKENIZER_PATH must not be empty"),
        (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", h.run_id) is not None or not h.run_id,
         f"RUN_ID={h.run_id!r}: expected a file name of letters, digits, '.', '_' and '-' (it names logs/RUN_ID.txt)"),
        (0 <= h.seed < 2**63, "SEED must be in 0..2^63-1"),
        (h.eval_seq_len == 0 or h.eval_seq_len >= 2, "EVAL_SEQ_LEN must be 0 (TRAIN_SEQ_LEN) or >= 2"),
        (h.bigram_vocab_size == 0 or h.bigram_vocab_size >= 2, "BIGRAM_VOCAB_SIZE must be 0 (off) or >= 2"),
        (h.embed_wd >= 0 or h.embed_wd == -1, "EMBED_WD must be >= 0, or -1 (ADAM_WD)"),
        (re.fullmatch(r"\s*(\d+\s*(,\s*\d+\s*)*)?", h.ttt_phases) is not None,
         f"TTT_PHASES={h.ttt_phases!r}: expected document counts like 2500 or 833,1666,2500"),
    ]

def embed_wd(h: Hyperparameters) -> float:
    """AdamW decay of the embedding tables: EMBED_WD, or ADAM_WD where it is -1."""
    return h.adam_wd if h.embed_wd < 0 else h.embed_wd

def combination_checks(h: Hyperparameters) -> list[tuple[bool, str]]:
    per_step = SLICES_PER_STEP * h.train_seq_len
    return [
        (h.model_dim % h.num_heads == 0, "MODEL_DIM must be divisible by NUM_HEADS"),
        ((h.model_dim // h.num_heads) % 2 == 0, "MODEL_DIM / NUM_HEADS must be even (RoPE)"),
        (h.num_heads % h.num_kv_heads == 0, "NUM_HEADS must be a multiple of NUM_KV_HEADS"),
        (h.train_batch_tokens >= per_step and h.train_batch_tokens % per_step == 0,
         f"TRAIN_BATCH_TOKENS must be a positive multiple of {SLICES_PER_STEP} x TRAIN_SEQ_LEN"),
        (not (h.warmdown_frac and h.warmdown_iters), "WARMDOWN_FRAC replaces WARMDOWN_ITERS: set WARMDOWN_ITERS=0"),
        (0 <= h.eval_stride <= h.model_eval_seq_len, "EVAL_STRIDE must be in 0..EVAL_SEQ_LEN"),
        (h.val_batch_size >= h.model_eval_seq_len, "VAL_BATCH_SIZE must hold at least one EVAL_SEQ_LEN window"),
        (h.matrix_lr * h.muon_wd < 1 and h.scalar_lr * h.adam_wd < 1 and h.tied_embed_lr * embed_wd(h) < 1,
         "MATRIX_LR x MUON_WD, SCALAR_LR x ADAM_WD and TIED_EMBED_LR x EMBED_WD must be < 1 (weight decay "
         "multiplies the weights by 1 - lr x wd)"),
        (not h.max_wallclock_seconds or not h.gptq_calib_tokens or h.gptq_reserve_seconds < h.max_wallclock_seconds,
         "GPTQ_RESERVE_SECONDS must be below MAX_WALLCLOCK_SECONDS"),
        (not (h.ema_decay and h.swa_interval), "SWA_INTERVAL and EMA_DECAY are both on: set one of them to 0"),
        (not (h.gptq_selfgen_seqs and h.gptq_calib_tokens),
         "GPTQ_SELFGEN_SEQS and GPTQ_CALIB_TOKENS both calibrate GPTQ: set one of them to 0"),
        (not h.int6_matrices or h.gptq_selfgen_seqs or h.gptq_calib_tokens,
         "INT6_MATRICES ranks matrices by their GPTQ Hessians: set GPTQ_CALIB_TOKENS or GPTQ_SELFGEN_SEQS"),
    ]

def block_list(text: str, name: str) -> tuple[int, ...]:
    """A comma-separated list of integers (block indices, positions, document counts): "4,5" -> (4, 5); "" -> ()."""
    try:
        return tuple(int(part) for part in text.split(",")) if text.strip() else ()
    except ValueError:
        raise RunError(f"{name}={text!r}: expected integers like 4,5") from None

def recurrence_blocks(h: Hyperparameters) -> tuple[int, ...]:
    return block_list(h.recur_blocks, "RECUR_BLOCKS")

def value_embed_positions(h: Hyperparameters) -> tuple[int, ...]:
    return block_list(h.ve_layers, "VE_LAYERS")

def ttt_phase_counts(h: Hyperparameters) -> tuple[int, ...]:
    """TTT_PHASES: the scored-document counts after which a global phase runs."""
    return block_list(h.ttt_phases, "TTT_PHASES")

def run_positions(h: Hyperparameters) -> int:
    """Block positions in the run order with the recurrence on: NUM_LAYERS plus every repeated pass."""
    return h.num_layers + len(recurrence_blocks(h)) * h.recur_repeats

def virtual_depth(h: Hyperparameters) -> int:
    """Blocks holding controls: one per run position with VIRTUAL_DEPTH, else NUM_LAYERS."""
    return run_positions(h) if h.virtual_depth else h.num_layers

def unet_positions(h: Hyperparameters) -> int:
    """The positions the U-Net halves: every run position with VIRTUAL_DEPTH or RECUR_IN_UNET, else NUM_LAYERS."""
    return run_positions(h) if h.virtual_depth or h.recur_in_unet else h.num_layers

def seq_schedule(h: Hyperparameters) -> tuple[tuple[int, float], ...]:
    """TRAIN_SEQ_SCHEDULE's (length, start fraction) pairs: "1024:0,2048:0.3" -> ((1024, 0.0), (2048, 0.3))."""
    try:
        return tuple((int(length), float(start)) for length, start in (part.split(":") for part in
                     h.train_seq_schedule.split(","))) if h.train_seq_schedule.strip() else ((h.train_seq_len, 0.0),)
    except ValueError:
        raise RunError(f"TRAIN_SEQ_SCHEDULE={h.train_seq_schedule!r}: expected LEN:FRAC pairs like "
                       f"1024:0,2048:0.3,3072:0.6") from None

def seq_len_at(h: Hyperparameters, progress: float) -> int:
    """The training sequence length at this fraction of the run (progressive context, PR #2014)."""
    return [length for length, start in seq_schedule(h) if progress >= start][-1]

def technique_checks(h: Hyperparameters) -> list[tuple[bool, str]]:
    head_dim, recur, depth = h.model_dim // h.num_heads, recurrence_blocks(h), virtual_depth(h)
    lengths, starts = zip(*seq_schedule(h))
    return [
        (starts[0] == 0 and all(a < b < 1 for a, b in zip(starts, starts[1:])) and min(lengths) >= 2 and
         lengths[-1] == h.train_seq_len and all(h.train_batch_tokens % (SLICES_PER_STEP * n) == 0 for n in lengths),
         f"TRAIN_SEQ_SCHEDULE={h.train_seq_schedule!r}: lengths >= 2 dividing TRAIN_BATCH_TOKENS / "
         f"{SLICES_PER_STEP}, fractions ascending from 0 and below 1, the last length TRAIN_SEQ_LEN"),
        (0 <= h.smear_window <= h.model_dim and (not h.smear_window or h.smear_mode == "scalar"),
         "SMEAR_WINDOW must be in 0..MODEL_DIM (0: all channels) and needs SMEAR_MODE=scalar (the gate it narrows)"),
        (not (h.smear_zero_start and h.smear_mode == "scalar"),
         "SMEAR_ZERO_START is for SMEAR_MODE=channel: unset one"),
        (0 <= h.attn_gate_window <= h.model_dim, "ATTN_GATE_WINDOW must be in 0..MODEL_DIM (0: off)"),
        (not h.quant_gates_int8 or h.attn_gate_window,
         "QUANT_GATES_INT8 quantizes the attention output gates: it needs ATTN_GATE_WINDOW > 0"),
        (not h.doc_attention or h.attn_backend not in ("flash", *OPTIONAL_KERNELS),
         f"ATTN_BACKEND={h.attn_backend} has no mask for DOC_ATTENTION=1: use auto, flex, efficient, cudnn or math"),
        (h.attn_backend != "flex" or h.doc_attention,
         "ATTN_BACKEND=flex is the kernel of attention within documents: it needs DOC_ATTENTION=1 (else use auto)"),
        (not h.ttt_enabled or h.ttt_chunk_tokens <= h.model_eval_seq_len,
         f"TTT_CHUNK_TOKENS={h.ttt_chunk_tokens} must be <= EVAL_SEQ_LEN={h.model_eval_seq_len} (one window each)"),
        (0 <= h.rope_dims <= head_dim and h.rope_dims % 2 == 0,
         f"ROPE_DIMS must be even and in 0..MODEL_DIM/NUM_HEADS={head_dim} (0: all)"),
        (0 <= h.xsa_last_n <= depth, "XSA_LAST_N must be in 0..NUM_LAYERS (+ the repeat with VIRTUAL_DEPTH)"),
        (0 <= h.lanes_from < h.num_layers, "LANES_FROM must be in 0..NUM_LAYERS-1 (0: off)"),
        (all(b == a + 1 for a, b in zip(recur, recur[1:])),
         f"RECUR_BLOCKS={h.recur_blocks!r} must be contiguous ascending block indices"),
        (all(0 <= b < h.num_layers for b in recur), "RECUR_BLOCKS must name blocks in 0..NUM_LAYERS-1"),
        (not (recur and h.lanes_from) or h.lanes_from > recur[-1],
         "LANES_FROM must come after the last of RECUR_BLOCKS (a repeated block sees one stream)"),
        (recur or not (h.virtual_depth or h.recur_untie_mlp or h.recur_in_unet),
         "VIRTUAL_DEPTH, RECUR_UNTIE_MLP and RECUR_IN_UNET need RECUR_BLOCKS"),
        (all(0 <= v < depth for v in value_embed_positions(h)),
         f"VE_LAYERS must name block positions in 0..{depth - 1} (the repeat counted with VIRTUAL_DEPTH)"),
        (not h.rope_ntk_len or (h.rope_dims or head_dim) >= 4, "ROPE_NTK_LEN needs at least 4 rotated dims"),
        (not (h.bigram_adam and h.bigram_proj_adam),
         "BIGRAM_ADAM already moves the projection: unset BIGRAM_PROJ_ADAM"),
        (not h.gptq_embed or (h.gptq_calib_tokens and h.quant_bits_embed < 16),
         "GPTQ_EMBED needs GPTQ_CALIB_TOKENS > 0 and a quantized embedding (QUANT_BITS_EMBED 7 or 8)"),
        (not h.awq_groups or h.gptq_calib_tokens,
         "AWQ_GROUPS needs GPTQ_CALIB_TOKENS > 0 (the input RMS is the Hessian's diagonal)"),
    ]

def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]

def write_atomically(path: Path, write) -> None:
    """write(a temporary path) in path's folder, then a rename onto path: never a partial file; RunError naming path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if path.exists():
            raise RunError(f"{path} appeared while this run wrote it; the new file stays at {tmp}")
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise RunError(f"{path}: cannot write ({getattr(exc, 'strerror', None) or first_line(exc)})") from None
    except KeyboardInterrupt:  # Ctrl-C mid-write: no partial file either
        tmp.unlink(missing_ok=True)
        raise

def no_log(message: str, console: bool = True) -> None:
    """A Runtime's log until main sets the run's Logger (tests, bench): the lines go nowhere."""

@dataclasses.dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    distributed: bool
    bf16: bool = False  # autocast matrix products to bf16 (always on CUDA; CPU_AUTOCAST on CPU)
    log: typing.Callable[..., None] = no_log  # the run's Logger, set by main once the outputs are claimed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_accum_steps(self) -> int:
        return SLICES_PER_STEP // self.world_size

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

def compile_enabled(h: Hyperparameters, rt: Runtime) -> bool:
    return h.compile == "1" or (h.compile == "auto" and rt.device.type == "cuda")

# -----------------------------------------------------------------------------
# Muon optimizer
#
# Muon (Keller Jordan, modded-nanogpt): momentum SGD, each 2-D matrix's update orthogonalized by Newton-Schulz. Each
# rank orthogonalizes every world_size-th matrix (same shapes in one batched call); one bf16 all-reduce shares them.

# (a, b, c) per step of x <- a x + (b G + c G^2) x, G = x x^T; a schedule's last triple repeats. quintic:
# modded-nanogpt's one triple; polar_express: Amsel et al. 2025's per-step schedule as PR #1855 ran it.
NEWTON_SCHULZ_COEFFS = {
    "quintic": ((3.4445, -4.7750, 2.0315),),
    "polar_express": ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
}

def orthogonalize(grad: Tensor, steps: int, coeffs: str = "quintic") -> Tensor:
    """Newton-Schulz on one matrix (rows, cols) or a stack of same-shape ones (n, rows, cols), in bf16."""
    schedule = NEWTON_SCHULZ_COEFFS[coeffs]
    transposed = grad.size(-2) > grad.size(-1)
    x = (grad.mT if transposed else grad).bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for step in range(steps):
        a, b, c = schedule[min(step, len(schedule) - 1)]
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x

def normalize_rows(update: Tensor) -> Tensor:
    """MuonEq-R (arXiv 2603.28254): every row of the update at unit L2 norm before Newton-Schulz."""
    return update / (update.norm(dim=-1, keepdim=True) + 1e-7)

class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 row_norm: bool = False, rank: int = 0, world_size: int = 1, coeffs: str = "quintic"):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, row_norm=row_norm, coeffs=coeffs))
        self.rank, self.world_size = rank, world_size
        for group in self.param_groups:  # this rank's matrices; created once here, not per step
            for p in group["params"][self.rank::self.world_size]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            offsets = np.cumsum([0] + [p.numel() for p in params]).tolist()
            updates = torch.zeros(offsets[-1], device=params[0].device, dtype=torch.bfloat16)
            for i, update in self.orthogonalized_updates(group).items():
                updates[offsets[i]:offsets[i + 1]] = update.flatten()
            if self.world_size > 1:
                dist.all_reduce(updates)
            for i, p in enumerate(params):
                if p.grad is None:  # not run yet (the repeat's own weights before the switch): untouched
                    continue
                if group["weight_decay"]:  # decoupled weight decay; off, no kernel at all
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(updates[offsets[i]:offsets[i + 1]].view_as(p).to(p.dtype), alpha=-group["lr"])

    def orthogonalized_updates(self, group: dict) -> dict[int, Tensor]:
        """The bf16 update of each matrix this rank owns, by its index in the group."""
        params = group["params"]
        owned = [i for i in range(self.rank, len(params), self.world_size) if params[i].grad is not None]
        if not owned:  # _foreach ops refuse empty lists
            return {}
        grads, buffers = [params[i].grad for i in owned], [self.state[params[i]]["momentum_buffer"] for i in owned]
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, grads)
        nesterov = torch._foreach_add(grads, buffers, alpha=group["momentum"])
        by_shape: dict[torch.Size, list[tuple[int, Tensor]]] = {}
        for i, u in zip(owned, nesterov):
            by_shape.setdefault(params[i].shape, []).append((i, normalize_rows(u) if group["row_norm"] else u))
        updates = {}
        for (rows, cols), members in by_shape.items():
            stacked = orthogonalize(torch.stack([u for _, u in members]), group["backend_steps"], group["coeffs"])
            updates.update(zip([i for i, _ in members], stacked * max(1.0, rows / cols) ** 0.5))
        return updates

# -----------------------------------------------------------------------------
# Data
#
# Shards: 256 little-endian int32 (magic, version, token count, unused), then the uint16 tokens. Before anything
# trains, the validation split's bytes are proved against its decoded text (check_validation_text) and the
# training data is searched for its documents (check_leak). Notes: docs/notes/data.md.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4

def read_shard_header(path: str) -> int:
    """The shard's token count, once its magic, version and size agree (RunError otherwise)."""
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise RunError(f"{path}: {size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    with open(path, "rb") as f:
        magic, version, count = struct.unpack("<3i", f.read(12))
    if magic != SHARD_MAGIC or version != SHARD_VERSION:
        raise RunError(f"{path}: header magic/version {magic}/{version}, expected {SHARD_MAGIC}/{SHARD_VERSION}")
    expected = SHARD_HEADER_BYTES + 2 * count
    if size != expected:  # a negative count is shorter than the header
        raise RunError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes")
    return count

def load_shard(path: str, vocab_size: int) -> np.ndarray:
    """The shard's tokens (uint16); an id >= vocab_size is a RunError."""
    count = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=SHARD_HEADER_BYTES)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise RunError(f"{path}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}")
    return tokens

def shard_files(data_path: str, split: str) -> list[str]:
    """The split's shard files in order (the validation byte sidecar, fineweb_val_bytes_*, is not one)."""
    return sorted(f for f in glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin"))
                  if not os.path.basename(f).startswith("fineweb_val_bytes_"))

BUILD_MARKER = "built_by_build_dataset.txt"  # tools/build_dataset.py writes it first and manifest.json last

def find_shards(h: Hyperparameters, split: str) -> list[str]:
    if not os.path.isdir(h.data_path):
        raise RunError(f"DATA_PATH={h.data_path}: no such directory; {DOWNLOAD_HINT.format(vocab_size=h.vocab_size)}")
    if (Path(h.data_path) / BUILD_MARKER).is_file() and not (Path(h.data_path) / "manifest.json").is_file():
        raise RunError(f"DATA_PATH={h.data_path}: an unfinished build: tools/build_dataset.py's {BUILD_MARKER} "
                       f"is there but not the manifest.json it writes last; build the dataset again")
    files = shard_files(h.data_path, split)
    if not sum(map(read_shard_header, files)):
        raise RunError(f"DATA_PATH={h.data_path}: no fineweb_{split}_*.bin shards, or none holds a token")
    return files

def log_train_budget(h: Hyperparameters, rt: Runtime, files: list[str]) -> None:
    """Logs the shards' tokens against the most the run reads (warm-up aside) and warns if the stream would wrap."""
    available = sum(map(read_shard_header, files))
    per_step = h.train_batch_tokens + SLICES_PER_STEP
    steps = h.iterations + -(-h.gptq_calib_tokens // h.train_batch_tokens)
    bound = "at most, ITERATIONS bound; the wallclock cap decides" if h.max_wallclock_seconds else "exactly"
    rt.log(f"train_shards:{len(files)} train_tokens:{available} planned_train_tokens:{steps * per_step} "
           f"({bound}: {steps} steps incl. GPTQ calibration x {per_step})")
    if steps * per_step > available:
        message = (f"the training stream wraps after step {available // per_step}: {len(files)} shards hold "
                   f"{available} tokens, fewer than the {steps * per_step} planned; training would repeat data")
        rt.log(f"note: {message}, if the run gets that far" if h.max_wallclock_seconds else f"WARNING: {message}")

# CaseOps (PR #1626): capitals as private-use operators TITLE, ALLCAPS, CAPNEXT, ESC (tools/build_dataset.py).
CASEOPS_OPERATORS = ("\ue001", "\ue002", "\ue003", "\ue004")
_CASEOPS_DECODE = re.compile("\ue004([\ue001-\ue004])|\ue002([a-z]+)|[\ue001\ue003]([a-z])|([\ue001-\ue004])")

def caseops_decode(text: str) -> str:
    """The exact inverse of CaseOps (docs/notes/data.md); an operator where the rewrite puts none is a ValueError."""
    def restore(m: re.Match) -> str:
        literal, word, letter, stray = m.groups()
        if stray is not None:
            raise ValueError(f"caseops_decode: operator U+{ord(stray):04X} at character {m.start()} "
                             f"is not followed by what the CaseOps rewrite puts after it")
        return literal or (word or letter).upper()
    return _CASEOPS_DECODE.sub(restore, text)

class TokenStream:
    """The training shards in order, wrapping at the end (calling on_wrap() the first time); a thread reads ahead."""

    def __init__(self, files: list[str], vocab_size: int, on_wrap=None):
        self.files, self.vocab_size, self.on_wrap = files, vocab_size, on_wrap
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        self.next_tokens: Future | None = None
        self.seek(0, 0)

    def seek(self, file_index: int, pos: int, tokens: np.ndarray | None = None) -> None:
        """Continue at `pos` of shard `file_index` (its `tokens`, if read already), reading the next shard."""
        if self.next_tokens is not None:
            self.next_tokens.cancel()
        self.file_index, self.pos = file_index, pos
        self.tokens = load_shard(self.files[file_index], self.vocab_size) if tokens is None else tokens
        self.next_tokens = self.reader.submit(load_shard, self.files[(file_index + 1) % len(self.files)],
                                              self.vocab_size)

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.file_index = (self.file_index + 1) % len(self.files)
                if self.file_index == 0 and self.on_wrap is not None:
                    self.on_wrap, on_wrap = None, self.on_wrap
                    on_wrap()
                self.seek(self.file_index, 0, self.next_tokens.result())  # re-raises a reader's RunError here
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)

class DistributedTokenLoader:
    """Rank r trains on span r of each world_size consecutive spans: the same steps' tokens on 1, 2, 4 or 8 GPUs."""

    def __init__(self, files: list[str], vocab_size: int, rt: Runtime, on_wrap=None):
        self.stream = TokenStream(files, vocab_size, on_wrap)
        self.rank, self.world_size, self.device = rt.rank, rt.world_size, rt.device

    def next_batch(self, tokens_per_slice: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = tokens_per_slice + 1
        chunk = self.stream.take(span * self.world_size)[self.rank * span:(self.rank + 1) * span]
        local = torch.from_numpy(chunk.astype(np.int64)).to(self.device, non_blocking=True)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)

def load_tokenizer(h: Hyperparameters) -> spm.SentencePieceProcessor:
    if not os.path.isfile(h.tokenizer_path):
        raise RunError(f"TOKENIZER_PATH={h.tokenizer_path}: no such file; "
                       f"{DOWNLOAD_HINT.format(vocab_size=h.vocab_size)}")
    try:
        sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    except (RuntimeError, OSError) as exc:
        raise RunError(f"TOKENIZER_PATH={h.tokenizer_path}: not a SentencePiece model ({exc})") from None
    if sp.vocab_size() != h.vocab_size:
        raise RunError(f"TOKENIZER_PATH={h.tokenizer_path}: vocab size {sp.vocab_size()}, "
                       f"but VOCAB_SIZE={h.vocab_size}")
    return sp

def strips_leading_space(sp: spm.SentencePieceProcessor) -> bool:
    """Whether decoding drops a document's first space marker (as the challenge's tokenizers' normalizer does)."""
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581") and piece.strip("\u2581") and not (sp.is_control(i) or sp.is_byte(i)):
            return not sp.decode([i]).startswith(" ")
    return True

def byte_tables(sp: spm.SentencePieceProcessor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token id: base (UTF-8 bytes of the piece, each space marker one space, less a leading marker
    that decoding drops), space (it has that marker), boundary (control/unknown/unused: 0 bytes)."""
    n, strip = sp.vocab_size(), strips_leading_space(sp)
    base, space, boundary = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            space[i] = strip and piece.startswith("\u2581")
            base[i] = len(piece.replace("\u2581", " ").encode("utf-8")) - int(space[i])
    return base, space, boundary

def target_bytes(inputs: np.ndarray | Tensor, targets: np.ndarray | Tensor, tables) -> np.ndarray | Tensor:
    """A target's bytes: base, plus one for a leading space marker unless its predecessor is a boundary."""
    base, space, boundary = tables
    return base[targets] + (space[targets] & ~boundary[inputs])

# The public exports' validation splits (first 50,000 documents), targets as their records logged (+ < 2,048).
OFFICIAL_SPLITS = (  # name, vocab size, byte sidecar, documents, scored targets
    ("fineweb_sp1024", 1024, False, 50_000, 62_021_632),
    ("fineweb_sp8192", 8192, False, 50_000, 40_540_160),
    ("fineweb_sp8192_caseops", 8192, True, 50_000, 47_851_520),
)
REENCODE_DOCS = 512  # documents re-encoded to prove the tokenizer, at least (all if fewer; check_validation_text)
LEAK_MIN_TOKENS = 64  # shorter documents (boilerplate) may repeat legitimately; they are not looked up
LEAK_BLOCK_TOKENS = 1 << 20  # tokens read per sampled block of a training shard

def split_name(vocab_size: int, sidecar: bool, documents: int, targets: int) -> str:
    return next((name for name, vocab, has_sidecar, docs, logged in OFFICIAL_SPLITS if (vocab, has_sidecar, docs)
                 == (vocab_size, sidecar, documents) and logged <= targets < logged + 2048), "custom")

def document_starts(tokens: np.ndarray) -> np.ndarray:
    """The BOS positions: document d is tokens[starts[d]:starts[d + 1]] (the last one runs to the end)."""
    return np.flatnonzero(tokens == BOS_ID)

def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

def check_manifest(h: Hyperparameters, rt: Runtime, files: list[str]) -> str | None:
    """Checks `files` against DATA_PATH/manifest.json's sizes and sha256, logs it, returns its byte convention."""
    path = Path(h.data_path) / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        listed, settings = manifest["files"], manifest["settings"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: not a data manifest ({exc!r})") from None
    for f in files:
        entry = listed.get(os.path.basename(f))
        if entry is None or entry.get("bytes") != os.path.getsize(f) or entry.get("sha256") != file_sha256(f):
            raise RunError(f"{path}: {os.path.basename(f)} is not the file the manifest lists (missing from it, or "
                           f"changed since the build)")
    if settings.get("vocab_size") != h.vocab_size:
        raise RunError(f"{path}: built for vocab size {settings.get('vocab_size')}, but VOCAB_SIZE={h.vocab_size}")
    train = manifest.get("splits", {}).get("train", {})
    rt.log(f"data_manifest: builder:{manifest.get('builder')} version:{manifest.get('builder_version')} created:"
           f"{manifest.get('created_utc')} vocab_size:{settings.get('vocab_size')} caseops:{settings.get('caseops')} "
           f"val_docs:{settings.get('val_docs')} train_dropped_duplicates_of_val:"
           f"{train.get('dropped_duplicates_of_val')} train_dropped_near_duplicates_of_val:"
           f"{train.get('dropped_near_duplicates_of_val')} sha256:{file_sha256(path)}")
    convention = manifest.get("val_bytes") or ("normalized: not recorded (builder version 1: its sidecar counts "
                                               "the normalized text)")
    rt.log(f"data_val_bytes: {convention}")
    return convention

def first_disagreement(sp, tokens: np.ndarray, token_bytes: np.ndarray, starts: np.ndarray, docs: range,
                       caseops: bool, exact: bool = True) -> tuple[int, str, np.ndarray]:
    """(d, reason, totals): the first of `docs` failing a re-encoding ("ids"; REENCODE_DOCS spread over the split) or,
    if `exact`, its byte count (what disagrees); totals: [decoded UTF-8 bytes, documents counted otherwise]."""
    ends = np.append(starts[1:], len(tokens))
    ids = [tokens[starts[d] + 1:ends[d]].tolist() for d in docs]
    reencode_every = max(1, len(starts) // REENCODE_DOCS)
    totals = np.zeros(2, dtype=np.int64)
    for d, doc_ids, text in zip(docs, ids, sp.decode(ids)):
        if d % reencode_every == 0 and sp.encode(text) != doc_ids:
            return d, "ids", totals
        try:
            length = len((caseops_decode(text) if caseops else text).encode("utf-8"))
        except ValueError as exc:  # an operator where the rewrite never puts one
            return d, str(exc), totals
        counted = int(token_bytes[starts[d] + 1:ends[d]].sum())
        if exact and length != counted:
            return d, f"it decodes to {length} UTF-8 bytes, {counted} are counted", totals
        totals += (length, length != counted)
    return len(starts), "", totals

def check_validation_text(h: Hyperparameters, rt: Runtime, sp, tokens: np.ndarray, token_bytes: np.ndarray,
                          sidecar: bool, caseops: bool, exact: bool = True) -> tuple[int, int]:
    """Proves the bpb denominator (not `exact`: only at BOS) and the tokenizer on every validation document, ranks
    sharing them: (decoded UTF-8 bytes, documents counted otherwise), or RunError naming the first that disagrees."""
    starts = document_starts(tokens)
    if len(starts) == 0 or starts[0] != 0:
        raise RunError(f"DATA_PATH={h.data_path}: the validation split does not start with BOS (id {BOS_ID}): "
                       f"every document must (is it a split of this format?)")
    if token_bytes[starts].any():
        raise RunError(f"DATA_PATH={h.data_path}: the byte sidecar gives a BOS nonzero bytes")
    bad, _, totals = first_disagreement(sp, tokens, token_bytes, starts, range(rt.rank, len(starts), rt.world_size),
                                        caseops, exact)
    if rt.world_size > 1:
        first = torch.tensor([bad], dtype=torch.int64, device=rt.device)
        summed = torch.from_numpy(totals).to(rt.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        dist.all_reduce(summed)
        bad, totals = int(first.item()), summed.cpu().numpy()
    if bad < len(starts):
        _, reason, _ = first_disagreement(sp, tokens, token_bytes, starts, range(bad, bad + 1), caseops, exact)
        where = f"validation document {bad} (from token {starts[bad]})"
        if reason == "ids":
            raise RunError(f"TOKENIZER_PATH={h.tokenizer_path}: {where} does not re-encode to its own ids: this is "
                           f"not the tokenizer the shards were made with")
        if sidecar:
            raise RunError(f"DATA_PATH={h.data_path}: fineweb_val_bytes_*.bin: {where}: {reason} by the "
                           f"sidecar, which its manifest says counts the decoded text")
        raise RunError(f"TOKENIZER_PATH={h.tokenizer_path}: {where} {reason} by the per-token rule: "
                       f"a piece this rule does not count right")
    return int(totals[0]), int(totals[1])

@dataclasses.dataclass
class ValidationSet:
    tokens: Tensor  # the validation tokens scored (with VAL_TOKENS, a prefix), int64, on the device
    num_targets: int  # len(tokens) - 1: every token after the first is scored exactly once
    num_bytes: int  # the bpb denominator
    tables: tuple[Tensor, Tensor, Tensor]  # byte_tables() on the device (the warm-up's stand-in uses them)
    split_targets: int  # the whole split's targets (num_targets unless VAL_TOKENS cut a prefix)
    target_bytes: Tensor  # bytes of each target (index j: token j + 1), int32 on the device
    doc_digests: frozenset = frozenset()  # of the split's documents, for the leak check

def load_validation(h: Hyperparameters, sp: spm.SentencePieceProcessor, rt: Runtime) -> ValidationSet:
    """Reads the validation split, names it, counts its bytes and proves them (check_validation_text)."""
    files = find_shards(h, "val")
    sidecar = sorted(glob.glob(os.path.join(h.data_path, "fineweb_val_bytes_*.bin")))
    convention = check_manifest(h, rt, files + sidecar)
    tokens = np.concatenate([load_shard(f, h.vocab_size) for f in files])
    tables = byte_tables(sp)
    caseops = all(sp.piece_to_id(op) != sp.unk_id() for op in CASEOPS_OPERATORS)
    if caseops and not sidecar:
        raise RunError(f"TOKENIZER_PATH={h.tokenizer_path} spells CaseOps operators, but DATA_PATH={h.data_path} "
                       f"has no byte sidecar fineweb_val_bytes_*.bin: the bytes of the original text are unknown")
    # Bytes of text per token (BOS: 0): the sidecar's (one uint16 per token: the CaseOps exports) or the rule's.
    token_bytes = np.concatenate([load_shard(f, 1 << 16) for f in sidecar] if sidecar else
                                 ([0], target_bytes(tokens[:-1], tokens[1:], tables))).astype(np.int64)
    if len(token_bytes) != len(tokens):
        raise RunError(f"DATA_PATH={h.data_path}: the byte sidecar fineweb_val_bytes_*.bin has {len(token_bytes)} "
                       f"counts for {len(tokens)} validation tokens (expected one per token)")
    # A sidecar counts the original text unless its manifest says the normalized one (then proved exactly).
    exact = not sidecar or (convention or "").startswith("normalized")
    decoded, differ = check_validation_text(h, rt, sp, tokens, token_bytes, bool(sidecar), caseops, exact)
    docs, split_targets = len(document_starts(tokens)), len(tokens) - 1
    if not token_bytes.any():
        raise RunError(f"DATA_PATH={h.data_path}: the validation split has nothing to score: {split_targets} "
                       f"targets in {docs} documents, 0 bytes of text")
    name = split_name(h.vocab_size, bool(sidecar), docs, split_targets)
    rt.log(f"val_split:{name} val_split_targets:{split_targets} val_split_sha256:"
           f"{hashlib.sha256(tokens.astype('<u2').tobytes()).hexdigest()} val_split_docs:{docs}")
    source = "rule" if not sidecar else "sidecar" if exact else "sidecar_original"
    rt.log(f"val_bytes_source:{source} val_split_bytes:{int(token_bytes.sum())} decoded_text_bytes:{decoded} "
           f"documents_checked:{docs} reencoded:{-(-docs // max(1, docs // REENCODE_DOCS))}"
           + (f" documents_counted_otherwise:{differ} (the sidecar counts the original text's bytes, the "
              f"denominator; the tokenizer's normalization changed these documents)" if not exact else ""))
    if h.val_tokens > split_targets:
        raise RunError(f"VAL_TOKENS={h.val_tokens}: the validation split has only {split_targets} targets")
    n = h.val_tokens or split_targets  # targets 1..n are scored, the first token being their context
    if n < h.model_eval_seq_len:
        raise RunError(f"DATA_PATH={h.data_path}: {n} validation targets (VAL_TOKENS={h.val_tokens}), "
                       f"fewer than one EVAL_SEQ_LEN={h.model_eval_seq_len} window")
    per_target = token_bytes[1:n + 1]
    return ValidationSet(torch.from_numpy(tokens[:n + 1].astype(np.int64)).to(rt.device), n, int(per_target.sum()),
                         tuple(torch.from_numpy(t).to(rt.device) for t in tables), split_targets,
                         torch.from_numpy(per_target.astype(np.int32)).to(rt.device),
                         frozenset(document_digests(tokens, complete_last=True)))

def training_tokens_as_eval_set(tokens: np.ndarray, tables: tuple[Tensor, Tensor, Tensor]) -> ValidationSet:
    """A span of training tokens in the shape of a ValidationSet: what the compile warm-up scores."""
    span = torch.from_numpy(tokens.astype(np.int64)).to(tables[0].device)
    per_target = target_bytes(span[:-1], span[1:], tables).to(torch.int32)
    return ValidationSet(span, len(span) - 1, int(per_target.sum()), tables, len(span) - 1, per_target)

def document_digests(tokens: np.ndarray, complete_last: bool) -> list[bytes]:
    """128-bit BLAKE2b digests of the documents of >= LEAK_MIN_TOKENS tokens (the last one if complete_last)."""
    bounds = np.append(document_starts(tokens), len(tokens) if complete_last else []).astype(np.int64)
    data = tokens.astype("<u2")
    return [hashlib.blake2b(data[s:e].tobytes(), digest_size=16).digest()
            for s, e in zip(bounds[:-1], bounds[1:]) if e - s >= LEAK_MIN_TOKENS]

def leak_counts(h: Hyperparameters, train_files: list[str], val_digests: frozenset, rank: int,
                world_size: int) -> tuple[int, int, int]:
    """Rank `rank`'s share of the leak check (docs/notes/data.md): (identical shards, tokens scanned, hits)."""
    val_files = shard_files(h.data_path, "val")
    val_sizes, val_hashes = {os.path.getsize(f) for f in val_files}, None
    identical = scanned = hits = 0
    rng = np.random.default_rng(0)
    for i, path in enumerate(train_files):
        count = read_shard_header(path)
        offset = int(rng.integers(0, max(count - LEAK_BLOCK_TOKENS, 0) + 1))  # drawn for all: rank-independent
        if i % world_size != rank:
            continue
        if os.path.getsize(path) in val_sizes:
            val_hashes = val_hashes or {file_sha256(f) for f in val_files}
            identical += file_sha256(path) in val_hashes
        blocks = [(0, count if i == 0 else min(count, LEAK_BLOCK_TOKENS))]
        blocks += [(offset, LEAK_BLOCK_TOKENS)] if i and count > 2 * LEAK_BLOCK_TOKENS else []
        for start, length in blocks:
            block = np.fromfile(path, dtype="<u2", count=length, offset=SHARD_HEADER_BYTES + 2 * start)
            scanned += len(block)
            hits += sum(d in val_digests for d in document_digests(block, complete_last=False))
    return identical, scanned, hits

def check_leak(h: Hyperparameters, rt: Runtime, train_files: list[str], val: ValidationSet) -> None:
    """Warns in the log (which submit.py then fails) if leak_counts finds validation text in the training data."""
    t0 = time.perf_counter()
    counts = leak_counts(h, train_files, val.doc_digests, rt.rank, rt.world_size)
    if rt.world_size > 1:
        reduced = torch.tensor(counts, dtype=torch.int64, device=val.tokens.device)
        dist.all_reduce(reduced)
        counts = reduced.tolist()
    identical, scanned, hits = counts
    rt.log(f"leak_check: val_docs_sampled:{len(val.doc_digests)} train_tokens_scanned:{scanned} hits:{hits} "
           f"identical_shards:{identical} time_ms:{1000 * (time.perf_counter() - t0):.0f} (sees exact repeats of "
           f"documents only, by digest; a near duplicate, one character changed or a line added, is the data "
           f"builder's to drop)")
    if hits or identical:
        rt.log(f"WARNING: validation leak: {hits} validation documents found in {scanned} training tokens scanned, "
               f"{identical} training shards identical to a validation shard; the score would be invalid "
               f"(validation text must never be trained on)")

# -----------------------------------------------------------------------------
# Model
#
# Pre-norm GPT (PR #76 on): GQA attention with RMS-normed q/k, RoPE and a per-head query gain; relu^2 MLP; output
# scales and an x0 mix per block; U-Net skips; a tied, soft-capped head; BigramHash and SmearGate in front. A
# preset chooses parts at init, and no forward pass tests a setting: each technique, a layer plan per recurrence
# state and each block's lane route, which GPT.forward walks over a (lanes, B, T, C) stream. Notes: docs/notes/model.md.

def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))

# A part the preset leaves out: `unchanged` where it would change its input (QAT, XSA, the attention output gate,
# BigramHash), `absent` where it would add one (GPT.values without VE_LAYERS, GPT.mask without DOC_ATTENTION)
def unchanged(x: Tensor, *args) -> Tensor:
    return x

def absent(*args) -> None:
    return None

def fake_quantized(w: Tensor, bits: int) -> Tensor:
    """QAT_BITS (PR #192): while w trains, w + stopgrad(q(w) - w), q the export's per-row quantizer."""
    if not (w.requires_grad and torch.is_grad_enabled()):
        return w
    return w + (dequantize_rows(*quantize_rows(w.detach(), bits, clip_search=False)) - w).detach()

class Linear(nn.Linear):
    """Bias-free; its weight seen through fake_quantized with QAT_BITS. lora: per-row adapters (A, B, scale)
    during score-first TTT."""

    def __init__(self, in_features: int, out_features: int, qat_bits: int = 0):
        super().__init__(in_features, out_features, bias=False)
        self.qat_bits, self.lora = qat_bits, None
        self.seen = fake_quantized if qat_bits else unchanged

    def forward(self, x: Tensor) -> Tensor:
        return low_rank_added(x, F.linear(x, self.seen(self.weight, self.qat_bits)), self.lora)

def low_rank_added(x: Tensor, y: Tensor, lora) -> Tensor:
    """y plus row b's LoRA correction (x A_b^T) B_b^T * scale; x (B, T, in), A (B, r, in), B (B, out, r)."""
    if lora is None:
        return y
    a, b, scale = lora
    return y + (x @ a.transpose(1, 2).to(x.dtype)) @ (b.transpose(1, 2) * scale).to(x.dtype)

class Rotary(nn.Module):
    """RoPE on the first `dims` dims of each head (partial RoPE). With ntk_len, rows of n > ntk_len use the base
    NTK-scaled by (n / ntk_len)^(dims / (dims - 2)) (PR #1204); n: max(row length, `length`)."""

    def __init__(self, dims: int, max_len: int, base: float, ntk_len: int = 0):
        super().__init__()
        self.dims, self.base, self.ntk_len = dims, base, ntk_len or math.inf  # 0: no row length rescales the base
        angles = self.angles(max_len, base)
        self.register_buffer("cos", angles.cos()[None, None], persistent=False)  # (1, 1, max_len, dims/2)
        self.register_buffer("sin", angles.sin()[None, None], persistent=False)

    def angles(self, length: int, base: float) -> Tensor:  # (length, dims/2)
        inverse_frequencies = 1.0 / base ** (torch.arange(0, self.dims, 2, dtype=torch.float32) / self.dims)
        return torch.outer(torch.arange(length, dtype=torch.float32), inverse_frequencies)

    def forward(self, x: Tensor, length: int = 0) -> Tensor:  # x: (B, heads, T, hd)
        T, n = x.size(-2), max(x.size(-2), length)
        cos, sin = self.cos[:, :, :T], self.sin[:, :, :T]
        if n > self.ntk_len:
            angles = self.angles(T, self.base * (n / self.ntk_len) ** (self.dims / (self.dims - 2))).to(x.device)
            cos, sin = angles.cos(), angles.sin()
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2, rest = x.split((self.dims // 2, self.dims // 2, x.size(-1) - self.dims), dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)

def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA (arXiv 2603.09078): per head y <- y - (y . vhat) vhat, vhat the token's own value direction.
    y (B, H, T, hd); v (B, Hkv, T, hd), broadcast over its group's query heads."""
    y = y.unflatten(1, (v.size(1), -1))  # (B, Hkv, group, T, hd)
    vhat = F.normalize(v, dim=-1).unsqueeze(2)  # (B, Hkv, 1, T, hd)
    return (y - (y * vhat).sum(dim=-1, keepdim=True) * vhat).flatten(1, 2)

# ATTN_BACKEND: `auto` lets SDPA choose a fused kernel (math off); flash, efficient, cudnn, math pin one; fa3 / fa4
# run where they import, on CUDA. DOC_ATTENTION (PR #1530 on): FlexAttention's block mask where it runs, else dense.
SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
OPTIONAL_KERNELS = {"fa3": "flash_attn_interface", "fa4": "flash_attn.cute"}  # their flash_attn_func
ATTN_BACKENDS = ("auto", *SDPA_KERNELS, *OPTIONAL_KERNELS, "flex")
FLEX_BLOCK = 128  # FlexAttention's tile: a row length that is a multiple of it runs the block mask

def select_sdpa_kernels(name: str) -> None:
    """Allows the SDPA kernels that ATTN_BACKEND=name permits (torch's process-wide switches)."""
    sdpa = name if name in SDPA_KERNELS else "auto"
    torch.backends.cuda.enable_flash_sdp(sdpa in ("auto", "flash"))
    torch.backends.cuda.enable_mem_efficient_sdp(sdpa in ("auto", "efficient"))
    torch.backends.cuda.enable_cudnn_sdp(sdpa in ("auto", "cudnn"))
    torch.backends.cuda.enable_math_sdp(sdpa == "math")

@functools.lru_cache(maxsize=None)
def optional_kernel(name: str):
    """The flash_attn_func of FA3 / FA4 when ATTN_BACKEND names one and it imports; else None."""
    try:
        return importlib.import_module(OPTIONAL_KERNELS[name]).flash_attn_func if name in OPTIONAL_KERNELS else None
    except Exception:  # not installed, or built for another torch / CUDA: SDPA runs instead
        return None

def causal_attention(q: Tensor, k: Tensor, v: Tensor, kernel=None, mask: Tensor | BlockMask | None = None) -> Tensor:
    """q (B, H, T, hd) over k, v (B, Hkv, T, hd), GQA. kernel: a flash_attn_func (B, T, heads, hd), CUDA only.
    mask (attention_mask): a BlockMask or (B, 1, T, T) bool replacing causality; None: causal."""
    gqa = k.size(1) != q.size(1)
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if kernel is not None and q.is_cuda and mask is None:
        y = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return (y[0] if isinstance(y, tuple) else y).transpose(1, 2)  # some versions also return the LSE
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)

def document_ids(tokens: Tensor) -> Tensor:
    """(B, T): how many BOS up to and including t (a row's first position starts a document too)."""
    return torch.cumsum(tokens == BOS_ID, dim=1)

def document_mask(tokens: Tensor) -> Tensor:
    """(B, 1, T, T) bool from tokens (B, T): query t may attend to key s <= t of its own document."""
    document = document_ids(tokens)
    causal = torch.ones(tokens.size(1), tokens.size(1), dtype=torch.bool, device=tokens.device).tril()
    return (document[:, None, :, None] == document[:, None, None, :]) & causal

def document_block_mask(tokens: Tensor) -> BlockMask:
    """document_mask() as a BlockMask (T a multiple of FLEX_BLOCK). Documents are contiguous: query tile i meets key
    tile j <= i when i's first document <= j's last; the pair needs no mask when j < i and both lie in one document."""
    n, document = tokens.size(1) // FLEX_BLOCK, document_ids(tokens)
    first, last = document[:, ::FLEX_BLOCK], document[:, FLEX_BLOCK - 1::FLEX_BLOCK]  # (B, n)
    below = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
    touch = below & (first[:, :, None] <= last[:, None, :])  # (B, query tile, key tile)
    full = below.tril(-1) & (first[:, None, :] == last[:, :, None])

    def tile_lists(chosen: Tensor) -> tuple[Tensor, Tensor]:  # counts (B, 1, n), indices (B, 1, n, n)
        order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)
        return chosen.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def same_document(b, h, q, kv):
        return (q >= kv) & (document[b, q] == document[b, kv])

    return BlockMask.from_kv_blocks(*tile_lists(touch & ~full), *tile_lists(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=same_document)

def uses_block_mask(backend: str, length: int, cuda: bool, grad: bool) -> bool:
    """FlexAttention's block mask for DOC_ATTENTION: ATTN_BACKEND flex (auto on CUDA), rows a multiple of
    FLEX_BLOCK, on CUDA or without gradients (it has no backward on CPU, torch 2.13)."""
    return (backend == "flex" or (backend == "auto" and cuda)) and length % FLEX_BLOCK == 0 and (cuda or not grad)

def attention_mask(tokens: Tensor, backend: str) -> Tensor | BlockMask:
    """The DOC_ATTENTION mask for tokens (B, T), built once per forward pass: block mask or dense."""
    block = uses_block_mask(backend, tokens.size(1), tokens.is_cuda, torch.is_grad_enabled())
    return document_block_mask(tokens) if block else document_mask(tokens)

def attention_kernel_report(h: Hyperparameters, rt) -> str:
    """The log's attention_backend line: the attention ATTN_BACKEND selects for training (scoring with EVAL_ONLY)
    and whether FA3 / FA4 imported. What torch then dispatches is the GPU check's probe (bench/attn_check.py)."""
    name, cuda = h.attn_backend, rt.device.type == "cuda"
    if name in OPTIONAL_KERNELS:
        module, kernel = OPTIONAL_KERNELS[name], optional_kernel(name)
        if kernel and cuda:
            return f"{name} ({module}.flash_attn_func)"
        why = "needs CUDA" if kernel else "does not import"
        return f"sdpa auto; ATTN_BACKEND={name}: {module} {why}, SDPA auto runs instead"
    if h.doc_attention and uses_block_mask(name, h.train_seq_len, cuda, not h.eval_only):
        return f"flex (FlexAttention, {FLEX_BLOCK}x{FLEX_BLOCK} block mask) within documents"
    return f"sdpa {name if name in SDPA_KERNELS else 'auto'}" + " within documents (dense mask)" * h.doc_attention

def check_pinned_kernel(h: Hyperparameters, rt: Runtime) -> None:
    """A pinned SDPA kernel (ATTN_BACKEND=flash|efficient|cudnn|math) runs one small attention at the run's dtype
    at start: one that cannot run here is a one-line error, not a traceback at the first step."""
    if h.attn_backend not in SDPA_KERNELS:
        return
    head_dim = h.model_dim // h.num_heads
    q = torch.zeros(1, h.num_heads, FLEX_BLOCK, head_dim, device=rt.device, dtype=torch.bfloat16 if rt.bf16 else None)
    try:
        causal_attention(q, q[:, :h.num_kv_heads], q[:, :h.num_kv_heads])
    except RuntimeError as exc:
        raise RunError(f"ATTN_BACKEND={h.attn_backend}: no kernel it allows runs attention on {rt.device.type} "
                       f"({first_line(exc)}); use ATTN_BACKEND=auto") from None

class Attend(typing.NamedTuple):
    """Shared by every attention layer of a forward pass: the DOC_ATTENTION mask (None: causal), RoPE's length."""
    mask: Tensor | BlockMask | None = None
    rope_len: int = 0

ATTN_GATE_SCALE = 0.5  # PR #1855 tuned the sparse gate's logit scale 1.0 -> 0.5 ("softer head-output gate")

def gate_heads(y: Tensor, x: Tensor, gate: Tensor) -> Tensor:
    """ATTN_GATE_WINDOW=N (PR #1787 / #1855): head h's output y (B, H, T, hd) times
    sigmoid(ATTN_GATE_SCALE * gate[h] . x[:N]); x (B, T, C), gate (H, N) from zero."""
    weight = torch.sigmoid(ATTN_GATE_SCALE * F.linear(x[..., :gate.size(1)], gate.to(x.dtype)))
    return y * weight.transpose(1, 2)[..., None]  # (B, T, H) -> (B, H, T, 1)

class Attention(nn.Module):
    """Attention matrices, RoPE and the output gate (gate_heads or unchanged); query gain and XSA
    (remove_self_value or unchanged) come from the run position's controls."""

    def __init__(self, h: Hyperparameters, max_len: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = h.num_heads, h.num_kv_heads, h.model_dim // h.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = Linear(h.model_dim, h.model_dim, h.qat_bits)
        self.c_k = Linear(h.model_dim, kv_dim, h.qat_bits)
        self.c_v = Linear(h.model_dim, kv_dim, h.qat_bits)
        self.proj = Linear(h.model_dim, h.model_dim, h.qat_bits)
        self.rotary = Rotary(h.rope_dims or self.head_dim, max_len, h.rope_base, h.rope_ntk_len)
        self.kernel = optional_kernel(h.attn_backend)  # None: SDPA
        self.gate = nn.Parameter(torch.zeros(h.num_heads, h.attn_gate_window)) if h.attn_gate_window else None
        self.gated = gate_heads if h.attn_gate_window else unchanged

    def forward(self, x: Tensor, q_gain: Tensor, xsa=unchanged, value_embed: Tensor | None = None,
                attend: Attend = Attend()) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.c_v(x) if value_embed is None else self.c_v(x) + value_embed  # value_embed: (B, T, Hkv * hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = self.rotary(rms_norm(q), attend.rope_len) * q_gain.to(q.dtype)[None, :, None, None]
        k = self.rotary(rms_norm(k), attend.rope_len)
        y = self.gated(xsa(causal_attention(q, k, v, self.kernel, attend.mask), v), x, self.gate)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

class MLP(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.fc = Linear(h.model_dim, h.mlp_mult * h.model_dim, h.qat_bits)
        self.proj = Linear(h.mlp_mult * h.model_dim, h.model_dim, h.qat_bits)
        self.negative_slope = h.mlp_negative_slope  # 0: relu^2 (PR #76); 0.5: LeakyReLU(0.5)^2

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.negative_slope).square())

# Lane routes, one per block, chosen at init: x (lanes, B, T, C) -> the same. `ctl`: the block whose controls
# run (Block.attention, Block.feed_forward, mix, norm); `body`: the one whose weights and lane scalars do.
def one_lane(ctl: "Block", body: "Block", x: Tensor, x0: Tensor, mlp: MLP, ve, attend: Attend) -> Tensor:
    """One stream: x <- the x0 mix, then attention and the MLP each add their output."""
    x = ctl.mix(x, x0)
    x = x + ctl.attention(body, ctl.norm(x[0]), ve, attend)
    return x + ctl.feed_forward(mlp, ctl.norm(x[0]))

def mlp_lane(ctl: "Block", body: "Block", x: Tensor, x0: Tensor, mlp: MLP, ve, attend: Attend) -> Tensor:
    """FIRST_BLOCK_MLP_ONLY's block 0: x <- the x0 mix, then the MLP adds its output."""
    x = ctl.mix(x, x0)
    return x + ctl.feed_forward(mlp, ctl.norm(x[0]))

def stream_lanes(ctl: "Block", body: "Block", x: Tensor, x0: Tensor, mlp: MLP, ve, attend: Attend) -> Tensor:
    """LANE_FORMULA=stream: lane i <- lane_keep[i] * the x0 mix, then += lane_write[s, i] * sublayer s; attention
    reads lane 0, the MLP lane 1."""
    write = body.lane_write[:, :, None, None, None]
    x = body.lane_keep[:, None, None, None] * ctl.mix(x, x0)
    x = x + write[0] * ctl.attention(body, ctl.norm(x[0]), ve, attend)
    return x + write[1] * ctl.feed_forward(mlp, ctl.norm(x[1]))

def read_lanes(ctl: "Block", body: "Block", x: Tensor, x0: Tensor, mlp: MLP, ve, attend: Attend) -> Tensor:
    """LANE_FORMULA=read (PR #1204): sublayer s reads its lane's x0 mix (attention lane 0, the MLP lane 1);
    lane i <- lane_keep[s] * lane i + lane_write[s, i] * its output."""
    write = body.lane_write[:, :, None, None, None]
    x = body.lane_keep[0] * x + write[0] * ctl.attention(body, ctl.norm(ctl.mix(x[0], x0)), ve, attend)
    return body.lane_keep[1] * x + write[1] * ctl.feed_forward(mlp, ctl.norm(ctl.mix(x[1], x0)))

def parallel_lanes(ctl: "Block", body: "Block", x: Tensor, x0: Tensor, mlp: MLP, ve, attend: Attend) -> Tensor:
    """LANE_FORMULA=parallel (PR #1855): attention reads lane 0's x0 mix, the MLP lane 1, both the block's input;
    lane i <- lane_keep[i] * lane i + sum over s of lane_write[s, i] * sublayer s."""
    write = body.lane_write[:, :, None, None, None]
    out = body.lane_keep[:, None, None, None] * x
    out = out + write[0] * ctl.attention(body, ctl.norm(ctl.mix(x[0], x0)), ve, attend)
    return out + write[1] * ctl.feed_forward(mlp, ctl.norm(x[1]))

LANE_FORMULAS = {"stream": (stream_lanes, 1.0), "read": (read_lanes, 1.1 ** 0.5), "parallel": (parallel_lanes, 1.1)}

def block_lanes(h: Hyperparameters, index: int) -> int:
    """Residual lanes block `index` runs on: two from LANES_FROM on (blocks with weights), else one."""
    return 2 if h.lanes_from and h.lanes_from <= index < h.num_layers else 1

class Block(nn.Module):
    """Attention then MLP on RMS-normed inputs (times 1/sqrt(index + 1) with LN_SCALE). Weights (none past NUM_LAYERS,
    no attention in block 0 with FIRST_BLOCK_MLP_ONLY) and controls, which VIRTUAL_DEPTH combines across blocks."""

    def __init__(self, h: Hyperparameters, index: int, max_len: int):
        super().__init__()
        has_weights = index < h.num_layers
        has_attn = not (index == 0 and h.first_block_mlp_only)
        self.attn = Attention(h, max_len) if has_weights and has_attn else None
        self.mlp = MLP(h) if has_weights else None
        self.xsa = remove_self_value if index >= virtual_depth(h) - h.xsa_last_n else unchanged
        if has_attn:
            self.attn_scale = nn.Parameter(torch.ones(h.model_dim))
            self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
        self.mlp_scale = nn.Parameter(torch.ones(h.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(h.model_dim), torch.zeros(h.model_dim))))
        self.norm_scale = (index + 1) ** -0.5 if h.ln_scale else 1.0
        self.lanes = block_lanes(h, index)
        self.route = one_lane if self.attn is not None else mlp_lane
        if self.lanes == 2:  # the lane formula's route and its scalars
            self.route, keep = LANE_FORMULAS[h.lane_formula]
            self.lane_write = nn.Parameter(torch.ones(2, 2))
            self.lane_keep = nn.Parameter(torch.full((2,), keep))

    def forward(self, x: Tensor, x0: Tensor, body: "Block | None" = None, mlp: "MLP | None" = None,
                value_embed: Tensor | None = None, attend: Attend = Attend()) -> Tensor:
        """x (lanes, B, T, C), x0 (B, T, C): these controls around body's weights and route (default: this block)."""
        body = body or self
        return body.route(self, body, x, x0, mlp or body.mlp, value_embed, attend)

    def attention(self, body: "Block", x: Tensor, value_embed: Tensor | None, attend: Attend) -> Tensor:
        return self.attn_scale * body.attn(x, self.q_gain, self.xsa, value_embed, attend)

    def feed_forward(self, mlp: MLP, x: Tensor) -> Tensor:
        return self.mlp_scale * mlp(x)

    def mix(self, x: Tensor, x0: Tensor) -> Tensor:
        return self.resid_mix[0] * x + self.resid_mix[1] * x0

    def norm(self, x: Tensor) -> Tensor:
        return rms_norm(x) * self.norm_scale

def first_of_document(tokens: Tensor) -> Tensor:
    """True where a position must not look at its predecessor: position 0 and every BOS."""
    mask = tokens == BOS_ID
    mask[:, 0] = True
    return mask

class BigramHash(nn.Module):
    """A hashed embedding of the (previous, current) token pair; the last bucket: no same-document predecessor."""
    PREV_MULT, CUR_MULT = 1_000_003, 92_821  # odd multipliers spread the pairs over the buckets

    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.buckets = h.bigram_vocab_size
        self.table = nn.Embedding(h.bigram_vocab_size, h.bigram_dim)
        self.proj = nn.Linear(h.bigram_dim, h.model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))  # the table starts at zero

    def bucket_ids(self, tokens: Tensor) -> Tensor:
        prev = F.pad(tokens[:, :-1], (1, 0))
        ids = torch.bitwise_xor(prev * self.PREV_MULT, tokens * self.CUR_MULT) % (self.buckets - 1)
        return torch.where(first_of_document(tokens), self.buckets - 1, ids)

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:  # x (B, T, C) plus the bigram embedding
        return x + self.scale * self.proj(self.table(self.bucket_ids(tokens)))

# SmearGate's formulas, one chosen at init: x (B, T, C), prev its x_{t-1}, same_document (B, T, 1) bool
def smear_channel(smear: "SmearGate", x: Tensor, prev: Tensor, same_document: Tensor) -> Tensor:
    return x + torch.sigmoid(smear.gate) * same_document * (prev - x)

def smear_from_zero(smear: "SmearGate", x: Tensor, prev: Tensor, same_document: Tensor) -> Tensor:
    return x + torch.sigmoid(smear.gate) * (prev * same_document - x)

def smear_scalar(smear: "SmearGate", x: Tensor, prev: Tensor, same_document: Tensor) -> Tensor:
    weight = smear.strength * torch.sigmoid(x[..., :smear.gate.numel()] @ smear.gate.to(x.dtype)).unsqueeze(-1)
    return x + weight * same_document * prev

class SmearGate(nn.Module):
    """Never across a BOS. "channel" (PR #76): x_t + sigmoid(gate) * (x_{t-1} - x_t); zero_start (PR #1204): a
    document's first position blends with zero. "scalar" (PR #192): x_t + strength * sigmoid(gate . x_t[:window])
    * x_{t-1} (window: PR #1667 / #1855)."""

    def __init__(self, dim: int, mode: str, zero_start: bool = False, window: int = 0):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(window or dim))
        if mode == "scalar":
            self.strength = nn.Parameter(torch.zeros(()))
        self.formula = smear_scalar if mode == "scalar" else smear_from_zero if zero_start else smear_channel

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        return self.formula(self, x, prev, (~first_of_document(tokens)).unsqueeze(-1))

def norm_then_smear(smear: SmearGate, x: Tensor, tokens: Tensor) -> Tensor:
    return smear(rms_norm(x), tokens)

def smear_then_norm(smear: SmearGate, x: Tensor, tokens: Tensor) -> Tensor:  # PR #192's order
    return rms_norm(smear(x, tokens))

class ValueEmbedding(nn.Module):
    """VE_LAYERS (PR #1204): a token table projected to the KV width, times a scale, added to the values at each
    listed run position times that position's scale."""

    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.table = nn.Embedding(h.vocab_size, h.ve_dim)
        self.proj = nn.Linear(h.ve_dim, h.num_kv_heads * (h.model_dim // h.num_heads), bias=False)
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.position_scales = nn.Parameter(torch.ones(len(value_embed_positions(h))))

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T, Hkv * hd), before the per-position scale
        return self.scale * self.proj(self.table(tokens))

class Step(typing.NamedTuple):
    """One run position of the layer plan."""
    block: int  # whose weights (attention, MLP, lane route) run
    controls: int  # whose controls (output scales, x0 mix, query gain, XSA) run
    mlp: int | None  # the untied repeat's MLP (repeat_mlps index); None: the block's own
    ve: int | None  # the value embedding's position scale; None: no value embedding
    lanes: int  # residual lanes from here on
    push: bool  # its output is pushed for the U-Net
    pop: tuple[int, bool] | None  # the skip popped into its input: (pair, into lane 0 only)

def layer_plan(h: Hyperparameters, recur_active: bool) -> tuple[Step, ...]:
    """Blocks 0..NUM_LAYERS-1, with the recurrence on the RECUR_BLOCKS group RECUR_REPEATS times more after its first
    pass. U-Net: the first half pushes, the rest pops in reverse; halves of the positions (VIRTUAL_DEPTH,
    RECUR_IN_UNET) or of the NUM_LAYERS blocks (a repeat takes no part)."""
    recur, values = recurrence_blocks(h), value_embed_positions(h)
    order = [(i, 0) for i in range(h.num_layers)]
    if recur_active and recur:
        order[recur[-1] + 1:recur[-1] + 1] = [(i, r) for r in range(1, h.recur_repeats + 1) for i in recur]
    by_position = h.virtual_depth or h.recur_in_unet
    num_encoder = (len(order) if by_position else h.num_layers) // 2
    plan, pairs, lanes = [], 0, 1
    for pos, (block, repeat) in enumerate(order):
        push = pos < num_encoder if by_position else block < num_encoder and not repeat
        lanes = max(lanes, block_lanes(h, block))
        pop = None
        if not push and (by_position or not repeat) and sum(s.push for s in plan) > pairs:
            pop, pairs = (pairs, block_lanes(h, block) == 2 and h.lane_formula == "parallel"), pairs + 1
        controls = pos if h.virtual_depth else block
        mlp = (repeat - 1) * len(recur) + block - recur[0] if repeat and h.recur_untie_mlp else None
        ve = values.index(controls) if controls in values else None
        plan.append(Step(block, controls, mlp, ve, lanes, push, pop))
    return tuple(plan)

def added_skip(x: Tensor, skip: Tensor, gates: Tensor | None, pair: int) -> Tensor:
    return x + skip

def gated_skip(x: Tensor, skip: Tensor, gates: Tensor, pair: int) -> Tensor:  # SKIP_GATES (PR #1204)
    return torch.lerp(skip, x, torch.sigmoid(gates[pair]))

class GPT(nn.Module):
    """Embedding (token, BigramHash, SmearGate), the blocks walked by the layer plan in force, the tied head.
    Parameter names and their order are the artifact's (its bytes depend on them), and so is the init's draw order."""

    def __init__(self, h: Hyperparameters):
        super().__init__()
        max_len = max(*(length for length, _ in seq_schedule(h)), h.model_eval_seq_len)
        self.logit_softcap = h.logit_softcap
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)
        self.bigram = BigramHash(h) if h.bigram_vocab_size else None
        self.smear = SmearGate(h.model_dim, h.smear_mode, h.smear_zero_start, h.smear_window)
        self.value_embed = ValueEmbedding(h) if h.ve_layers.strip() else None
        self.blocks = nn.ModuleList(Block(h, i, max_len) for i in range(virtual_depth(h)))
        self.skip_weights = nn.Parameter(torch.ones(unet_positions(h) // 2, h.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(unet_positions(h) // 2, h.model_dim)) if h.skip_gates else None
        self.recur_blocks = recurrence_blocks(h)
        repeats = len(self.recur_blocks) * h.recur_repeats  # RECUR_UNTIE_MLP: an MLP per repeated position
        self.repeat_mlps = nn.ModuleList(MLP(h) for _ in range(repeats)) if h.recur_untie_mlp else None
        self.plans = (layer_plan(h, False), layer_plan(h, True))
        self.recur_active = False  # which plan runs: set by start_recurrence() at RECUR_START_FRAC, and for scoring
        self.lora = None  # LoRA on the tied head during score-first TTT (DocumentAdapters)
        self.head_input = nn.Identity()  # where GPTQ_EMBED's calibration reads the head's input
        # Parts chosen once: a preset leaves a part out with `unchanged` or `absent` (the forward pass calls them all)
        self.with_bigram = self.bigram.__call__ if self.bigram is not None else unchanged
        self.norm_and_smear = smear_then_norm if h.smear_mode == "scalar" else norm_then_smear
        self.join_skip = gated_skip if h.skip_gates else added_skip
        self.values = self.value_embed.__call__ if self.value_embed is not None else absent
        self.mask = functools.partial(attention_mask, backend=h.attn_backend) if h.doc_attention else absent
        self.rope_len = h.model_eval_seq_len  # the context the per-document rows are cut from
        self._init_weights(h)

    def _init_weights(self, h: Hyperparameters) -> None:
        nn.init.normal_(self.tok_emb.weight, std=0.005)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith(("attn.proj", "mlp.proj")):
                    nn.init.zeros_(module.weight)  # each block starts as the identity
                elif min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight)
        if self.bigram is not None:  # the table starts at zero, so its projection scales like an output layer
            nn.init.zeros_(self.bigram.table.weight)
            nn.init.orthogonal_(self.bigram.proj.weight, gain=h.bigram_proj_gain or (2 * h.num_layers) ** -0.5)
        if self.value_embed is not None:  # as PR #1204's init
            nn.init.normal_(self.value_embed.table.weight, std=0.01)
            if min(self.value_embed.proj.weight.shape) < 64:
                nn.init.zeros_(self.value_embed.proj.weight)

    def plan(self) -> tuple[Step, ...]:
        """The plan GPT.forward walks: plans[1] once start_recurrence() (or scoring) set recur_active."""
        return self.plans[self.recur_active]

    def start_recurrence(self) -> None:
        """The switch to the plan with the repeats; an untied repeat MLP starts as a copy of its block's (PR #1204)."""
        for step in [s for s in self.plans[True] if s.mlp is not None and not self.recur_active]:
            self.repeat_mlps[step.mlp].load_state_dict(self.blocks[step.block].mlp.state_dict())
        self.recur_active = True

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T, C): token (+ BigramHash) embedding, RMS-normed and smeared (PR #192 smeared before the norm)."""
        return self.norm_and_smear(self.smear, self.with_bigram(self.tok_emb(input_ids), input_ids), input_ids)

    def skip(self, x: Tensor, skip: Tensor, pair: int, first_lane_only: bool = False) -> Tensor:
        """The U-Net skip w * skip joined to x (added_skip or gated_skip) at the pair-th decoder position; into every
        lane, or lane 0 only (LANE_FORMULA=parallel)."""
        skip, lanes = self.skip_weights[pair] * skip, x[:1] if first_lane_only else x
        lanes = self.join_skip(lanes, skip, self.skip_gates, pair)
        return torch.cat((lanes, x[1:])) if first_lane_only else lanes

    def forward(self, input_ids: Tensor, target_ids: Tensor | None = None, reduction: str = "mean",
                one_document: bool = False) -> Tensor:
        """Logits (B, T, V) without targets; else the cross-entropy, averaged or per token (B, T). one_document:
        rows of one document each, cut from an EVAL_SEQ_LEN context (TTT): causal, RoPE at that length."""
        x0 = self.embed(input_ids)
        ve = self.values(input_ids)
        attend = Attend(rope_len=self.rope_len) if one_document else Attend(self.mask(input_ids))
        x, skips = x0[None], []  # (lanes, B, T, C)
        for step in self.plan():
            x = x.expand(step.lanes, -1, -1, -1)
            if step.pop is not None:
                x = self.skip(x, skips.pop(), *step.pop)
            mlp = self.repeat_mlps[step.mlp] if step.mlp is not None else None
            value_embed = ve * self.value_embed.position_scales[step.ve] if step.ve is not None else None
            x = self.blocks[step.controls](x, x0, self.blocks[step.block], mlp, value_embed, attend)
            if step.push:
                skips.append(x)
        hidden = self.head_input(rms_norm(x.mean(dim=0)))
        logits = low_rank_added(hidden, F.linear(hidden, self.tok_emb.weight), self.lora).float()
        logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        if target_ids is None:
            return logits
        losses = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none")
        return losses.mean() if reduction == "mean" else losses.view_as(target_ids)

def partition(named: list[tuple[str, Tensor]], rules: tuple[tuple[str, str], ...], table: str) -> dict[str, list]:
    """Each named tensor in the group of the one rule matching its whole name. A name matched by no rule or two,
    or a rule matching nothing, stops the run (the public record's int5 rule silently matched nothing)."""
    groups: dict[str, list] = {group: [] for _, group in rules}
    for name, tensor in named:
        hits = [group for pattern, group in rules if re.fullmatch(pattern, name)]
        if len(hits) != 1:
            raise RunError(f"{table}: parameter {name} matches {len(hits)} rules, expected exactly 1")
        groups[hits[0]].append((name, tensor))
    for pattern, group in rules:
        if not any(re.fullmatch(pattern, name) for name, _ in named):
            raise RunError(f"{table}: rule {pattern!r} ({group}) matches no parameter")
    return groups

BLOCK_ATTN = r"blocks\.\d+\.attn\.(c_q|c_k|c_v|proj)\.weight"
BLOCK_MLP = r"blocks\.\d+\.mlp\.(fc|proj)\.weight|repeat_mlps\.\d+\.(fc|proj)\.weight"
BLOCK_MATRICES = f"{BLOCK_ATTN}|{BLOCK_MLP}"
GATE_TENSORS = r"blocks\.\d+\.attn\.gate"  # ATTN_GATE_WINDOW's attention output gates (PR #1855)
CONTROL_TENSORS = (r"blocks\.\d+\.(attn_scale|mlp_scale|resid_mix|q_gain|lane_write|lane_keep)|skip_weights"
                   r"|skip_gates|smear\.(gate|strength)|bigram\.scale|value_embed\.(scale|position_scales)")
def parameter_kinds(h: Hyperparameters) -> dict[str, tuple[str, str, int]]:
    """The one table of parameter kinds, those this model has: kind -> (pattern of whole names, optimizer group,
    quantization bits; 16: fp16). The bigram projection is Adam's with BIGRAM_PROJ_ADAM (PR #1204), the table too
    with BIGRAM_ADAM (PR #236)."""
    kinds = {
        "attn": (BLOCK_ATTN, "muon", 6),
        "mlp": (BLOCK_MLP, "muon", h.quant_bits_mlp),
        "embed": (r"tok_emb\.weight", "adam_embed", h.quant_bits_embed),
        "control": (CONTROL_TENSORS, "adam_scalar", 16),
        "gate": (GATE_TENSORS, "adam_scalar", 8 if h.quant_gates_int8 else 16),
        "bigram_table": (r"bigram\.table\.weight", "adam_scalar" if h.bigram_adam else "adam_embed", 6),
        "bigram_proj": (r"bigram\.proj\.weight", "adam_scalar" if h.bigram_adam or h.bigram_proj_adam else "muon", 16),
        "value_table": (r"value_embed\.table\.weight", "adam_embed", h.quant_bits_embed),
        "value_proj": (r"value_embed\.proj\.weight", "adam_scalar", 16),
    }
    has = {"gate": h.attn_gate_window, "bigram": h.bigram_vocab_size, "value": h.ve_layers.strip()}
    return {kind: row for kind, row in kinds.items() if has.get(kind.split("_")[0], True)}

def optimizer_rules(h: Hyperparameters) -> tuple[tuple[str, str], ...]:
    return tuple((pattern, group) for pattern, group, _ in parameter_kinds(h).values())

def build_optimizers(h: Hyperparameters, rt: Runtime, model: GPT) -> list[torch.optim.Optimizer]:
    params = {group: [p for _, p in members] for group, members in
              partition(list(model.named_parameters()), optimizer_rules(h), "optimizer_rules").items()}
    adam = dict(betas=(0.9, h.adam_beta2), eps=1e-8, fused=next(model.parameters()).is_cuda)
    optimizers = [
        Muon(params["muon"], lr=h.matrix_lr, momentum=h.muon_momentum, backend_steps=5, weight_decay=h.muon_wd,
             row_norm=h.muon_row_norm, rank=rt.rank, world_size=rt.world_size, coeffs=h.muon_ns),
        torch.optim.AdamW(params["adam_embed"], lr=h.tied_embed_lr, weight_decay=embed_wd(h), **adam),
        torch.optim.AdamW(params["adam_scalar"], lr=h.scalar_lr, weight_decay=h.adam_wd, **adam),
    ]
    for group in (group for opt in optimizers for group in opt.param_groups):
        group["base_lr"] = group["lr"]
    return optimizers

# -----------------------------------------------------------------------------
# Evaluation
#
# One routine scores any window plan (window_plan: disjoint windows, or sliding by EVAL_STRIDE and scoring the
# targets new to each); checked_score proves every target scored once. Notes: docs/notes/evaluation.md.

def window_plan(num_targets: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, score_from) per window over target indices [0, num_targets); the last reaches the end."""
    count = max(0, -(-(num_targets - seq_len) // stride)) + 1
    starts = np.arange(count, dtype=np.int64) * stride
    ends = np.minimum(starts + seq_len, num_targets)
    return starts, ends, np.concatenate(([0], ends[:-1]))

def scored_sums(losses: Tensor, scored: Tensor, nbytes: Tensor) -> Tensor:
    """(loss in nats, targets, bytes) summed over the `scored` positions, as float64."""
    return torch.stack((torch.where(scored, losses.double(), 0.0).sum(), scored.sum().double(),
                        torch.where(scored, nbytes, 0).sum().double()))

@torch.no_grad()
def score_windows(model, val: ValidationSet, seq_len: int, windows: tuple[np.ndarray, ...],
                  batch_windows: int, autocast) -> Tensor:
    """Sums (loss in nats, scored targets, bytes) over the windows, float64 on the device. The last batch
    is padded with empty windows (one shape: no recompile); positions past a window's end are unscored."""
    device = val.tokens.device
    plan = np.zeros((3, -(-len(windows[0]) // batch_windows) * batch_windows), dtype=np.int64)
    plan[:, :len(windows[0])] = windows
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for start, end, score_from in torch.from_numpy(plan).to(device).view(3, -1, batch_windows).unbind(1):
        pos = start[:, None] + torch.arange(seq_len, device=device)  # (B, T) target indices
        scored = (pos >= score_from[:, None]) & (pos < end[:, None])
        pos = pos.clamp_max(val.num_targets - 1)
        with autocast:
            losses = model(val.tokens[pos], val.tokens[pos + 1], reduction="none")
        sums += scored_sums(losses, scored, val.target_bytes[pos])
    return sums

def evaluate(model, val: ValidationSet, seq_len: int, stride: int, batch_tokens: int, rt) -> tuple[float, float]:
    """Returns (val_loss in nats per token, val_bpb) over the whole validation set."""
    plan = window_plan(val.num_targets, seq_len, stride)
    per_rank = -(-len(plan[0]) // rt.world_size)
    mine = tuple(a[rt.rank * per_rank:(rt.rank + 1) * per_rank] for a in plan)
    batch_windows = max(1, batch_tokens // (seq_len * rt.world_size))
    return checked_score(rt, score_windows(model, val, seq_len, mine, batch_windows, rt.autocast()), val, "evaluation")

def checked_score(rt, sums: Tensor, val: ValidationSet, what: str) -> tuple[float, float]:
    """(val_loss, val_bpb) from every rank's scored_sums once targets and bytes are the set's and the loss finite."""
    if rt.distributed:
        dist.all_reduce(sums)
    loss_sum, targets, nbytes = sums.tolist()
    if int(targets) != val.num_targets or int(nbytes) != val.num_bytes:
        raise RunError(f"{what} scored {int(targets)} targets / {int(nbytes)} bytes, expected "
                       f"{val.num_targets} / {val.num_bytes}")
    if not math.isfinite(loss_sum):
        raise RunError(f"validation loss is {loss_sum}: the model diverged")
    return loss_sum / targets, loss_sum / math.log(2) / nbytes

def build_eval_graph(h: Hyperparameters, rt: Runtime, model: nn.Module, tokens: ValidationSet) -> float:
    """Seconds to score one batch of `tokens` (training or random ones, never the validation split) so that
    torch.compile builds the evaluation graph, with evaluate()'s shapes, before any timing."""
    t0 = time.perf_counter()
    seq_len = h.model_eval_seq_len
    batch_windows = max(1, h.val_batch_size // (seq_len * rt.world_size))
    score_windows(model, tokens, seq_len, window_plan(seq_len, seq_len, seq_len), batch_windows, rt.autocast())
    rt.sync()
    return time.perf_counter() - t0

def random_eval_set(h: Hyperparameters, tables) -> ValidationSet:
    """EVAL_SEQ_LEN + 1 seeded random tokens, BOS first: what EVAL_ONLY's compile warm-up scores."""
    tokens = np.random.default_rng(0).integers(BOS_ID + 3, h.vocab_size, h.model_eval_seq_len + 1)
    tokens[0] = BOS_ID
    return training_tokens_as_eval_set(tokens, tables)

def score_artifact(h: Hyperparameters, rt: Runtime, model: nn.Module, val: ValidationSet) -> None:
    """The final lines: standard and sliding-window evaluation of the model loaded from the artifact."""
    seq_len = h.model_eval_seq_len
    rt.log(f"val_tokens:{val.num_targets} val_bytes:{val.num_bytes} of_val_tokens:{val.split_targets}")
    evals = [("final_roundtrip", seq_len)] + ([("final_sliding", h.eval_stride)] if h.eval_stride else [])
    for label, stride in evals:
        rt.sync()
        t0 = time.perf_counter()
        val_loss, val_bpb = evaluate(model, val, seq_len, stride, h.val_batch_size, rt)
        rt.sync()
        rt.log(f"{label} val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} seq_len:{seq_len} stride:{stride} "
               f"eval_time_ms:{1000 * (time.perf_counter() - t0):.0f}")

# -----------------------------------------------------------------------------
# Score-first test-time training (TTT)
#
# The records' evaluation (PR #1855 on), per document: each chunk of TTT_CHUNK_TOKENS targets is scored in
# the window of up to EVAL_SEQ_LEN tokens ending at the chunk's end, then (if the document goes on) used for
# one step of the document's own LoRA adapters, TTT_BATCH_DOCS documents side by side. After the document
# counts in TTT_PHASES every rank runs one SGD epoch over the base weights on the documents scored so far.
# warm_up_ttt compiles every graph on random tokens; TTTBudget stops adapting in time. docs/notes/ttt.md.

TTT_LORA_ALPHA = 144.0  # the records' LoRA scale is alpha / rank, alpha 144 at rank 80
TTT_LR, TTT_BETA2, TTT_WEIGHT_DECAY = 1e-4, 0.99, 0.5  # the adapters' Adam (no momentum), as the records
TTT_PHASE_LR, TTT_PHASE_MOMENTUM, TTT_PHASE_ROWS, TTT_PHASE_CLIP = 1e-3, 0.9, 32, 1.0  # the global SGD phase
H100_MEMORY_GIB = 75  # a peak above this would not fit an 80 GB H100 (what an H200 would hide)
CLAIM_KEYS = itertools.count()  # names the store counters of each per-document evaluation of a run

@dataclasses.dataclass
class Documents:
    """Document d is validation tokens [start[d], end[d]): its BOS, its text and the next BOS; its target t is
    validation target start[d] + t. order: the scoring order, longest first, ties by position."""
    start: np.ndarray
    end: np.ndarray
    order: np.ndarray

    @property
    def num_targets(self) -> np.ndarray:
        return self.end - self.start - 1

def split_documents(tokens: np.ndarray) -> Documents:
    """The documents of a validation stream; a final BOS starts none (it is the last document's last target)."""
    starts = document_starts(tokens).astype(np.int64)
    starts = starts[starts < len(tokens) - 1]
    end = np.append(starts[1:] + 1, len(tokens))
    return Documents(starts, end, np.lexsort((starts, starts - end)))

class DocumentAdapters:
    """LoRA (Hu et al. 2021, arXiv 2106.09685) in `slots` slots on every block matrix and the tied head: for
    a matrix (out, in), A (slots, rank, in), B (slots, out, rank); row b gets (x A_b^T) B_b^T * alpha / rank.
    A reset gives every slot one seeded A, B = 0 and fresh Adam state: a score is independent of its slot."""

    def __init__(self, model: GPT, slots: int, rank: int):
        device, generator = model.tok_emb.weight.device, torch.Generator().manual_seed(0)
        self.sites = [m for m in model.modules() if isinstance(m, Linear)] + [model]
        shapes = [(site.tok_emb.weight if site is model else site.weight).shape for site in self.sites]
        self.a_init = [((2 * torch.rand(1, rank, n, generator=generator) - 1) * n ** -0.5).to(device)
                       for _, n in shapes]  # (1, rank, in): every slot resets to it
        self.a = [a.repeat(slots, 1, 1).requires_grad_() for a in self.a_init]
        self.b = [torch.zeros(slots, n, rank, device=device, requires_grad=True) for n, _ in shapes]
        self.scale, self.steps = TTT_LORA_ALPHA / rank, 0
        self.square_avg = [torch.zeros_like(p) for p in self.a + self.b]

    def attach(self, on: bool) -> None:
        for site, a, b in zip(self.sites, self.a, self.b):
            site.lora = (a, b, self.scale) if on else None

    @torch.no_grad()
    def reset(self) -> None:
        for a, a_init in zip(self.a, self.a_init):
            a.copy_(a_init.expand_as(a))
        for t in self.b + self.square_avg:
            t.zero_()
        self.steps = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.steps += 1
        correction = 1 - TTT_BETA2 ** self.steps
        for p, s in zip(self.a + self.b, self.square_avg):
            s.mul_(TTT_BETA2).addcmul_(p.grad, p.grad, value=1 - TTT_BETA2)
            p.mul_(1 - lr * TTT_WEIGHT_DECAY).addcdiv_(p.grad, (s / correction).sqrt_().add_(1e-8), value=-lr)
            p.grad = None

def padded_length(width: int, seq_len: int) -> int:
    """`width` positions padded to a power of two, at least 64 (short rows share one shape), at most seq_len."""
    return min(max(1 << max(width - 1, 0).bit_length(), 64), seq_len)

def chunk_windows(num_targets: int, chunk: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(lo, first, T) per chunk of a batch whose longest document has num_targets targets: the chunk
    scores targets [lo, lo + chunk) in the window of targets [first, first + T) (T padded)."""
    return [(lo, max(lo + chunk - seq_len, 0), padded_length(min(lo + chunk, seq_len), seq_len))
            for lo in range(0, max(num_targets, 1), chunk)]

def ttt_graphs(h: Hyperparameters) -> list[int]:
    """The padded row lengths TTT runs (each with adapters and gradients, and plain)."""
    return sorted({padded_length(1 << i, h.model_eval_seq_len) for i in range(h.model_eval_seq_len.bit_length() + 1)})

def batch_work(docs: Documents, batches: list[np.ndarray], h: Hyperparameters) -> list[list[int]]:
    """Positions per chunk of each batch: the rows (TTT_BATCH_DOCS) times the padded window length."""
    return [[h.ttt_batch_docs * T for _, _, T in chunk_windows(int(docs.num_targets[b].max()), h.ttt_chunk_tokens,
                                                                h.model_eval_seq_len)] for b in batches]

class TTTBudget:
    """When TTT stops adapting so that the evaluation ends by `deadline` (a `clock` time). `work`: positions
    per chunk of each batch. Once a batch is measured, a chunk (or phase) adapts only if the time left covers
    it adapted plus the rest of this rank's work plain, at costs measured per shape and mode. Stopped, it stays."""

    PLAIN_SHARE = 1 / 3  # forward only, of forward + backward (an estimate until measured)

    def __init__(self, work: list[list[int]], world_size: int, deadline: float, clock=time.perf_counter):
        self.work, self.world_size, self.deadline, self.clock = work, world_size, deadline, clock
        self.shapes = sorted({p for chunks in work for p in chunks})
        self.shape_of = [np.searchsorted(self.shapes, chunks) for chunks in work]
        per_batch = [np.bincount(shapes, minlength=len(self.shapes)) for shapes in self.shape_of]
        self.after = np.cumsum((per_batch + [np.zeros(len(self.shapes))])[::-1], axis=0)[::-1]  # chunks of batches b..
        self.seconds = {}  # (positions, adapted) -> (seconds, chunks)
        self.phase_rate = None  # seconds per position, once a phase has run
        self.first_batch, self.adapting = None, deadline > -math.inf  # first_batch: the first this rank scored

    def cost(self, positions: int, adapted: bool) -> float:
        """Estimated seconds of one chunk of `positions` in that mode."""
        measured = {p: s / c for (p, a), (s, c) in self.seconds.items() if a == adapted}
        if measured:
            largest = max(measured)
            return measured.get(positions, measured[largest] * positions / largest)
        return self.PLAIN_SHARE * self.cost(positions, True) if not adapted and self.seconds else 0.0

    def fits(self, now: float, seconds: float, counts: np.ndarray) -> bool:
        """Whether `seconds` from `now`, then `counts` chunks of each shape scored plain, end by the deadline."""
        return now + seconds + float(counts @ np.array([self.cost(p, False) for p in self.shapes])) <= self.deadline

    def adapt(self, batch: int, chunk: int) -> bool:
        if self.adapting:
            now = self.clock()
            self.first_batch = batch if self.first_batch is None else self.first_batch
            self.adapting = now < self.deadline
            if self.adapting and batch != self.first_batch:  # a batch measured: this chunk adapted, the rest plain
                rest = np.bincount(self.shape_of[batch][chunk + 1:], minlength=len(self.shapes))
                rest = rest + self.after[batch + 1] / self.world_size
                self.adapting = self.fits(now, self.cost(self.work[batch][chunk], True), rest)
        return self.adapting

    def observe(self, positions: int, seconds: float, adapted: bool) -> None:
        spent, chunks = self.seconds.get((positions, adapted), (0.0, 0))
        self.seconds[positions, adapted] = (spent + seconds, chunks + 1)

    def phase_fits(self, rt, positions: int, next_batch: int) -> bool:
        """Whether a phase over `positions` fits on every rank (a collective, MIN over ranks); if not, TTT stops."""
        rate = self.phase_rate if self.phase_rate is not None else self.cost(self.shapes[-1], True) / self.shapes[-1]
        fits = self.adapting and self.fits(self.clock(), positions / self.world_size * rate,
                                           self.after[next_batch] / self.world_size)
        go = torch.tensor([float(fits)], device=rt.device)
        if rt.distributed:
            dist.all_reduce(go, op=dist.ReduceOp.MIN)
        self.adapting = bool(go.item())
        return self.adapting

    def report(self, rt) -> str:
        """The ttt_adapted: line, summed over ranks (a collective)."""
        done = [sum(p * c for (p, a), (_, c) in self.seconds.items() if a == mode) for mode in (True, False)]
        done = torch.tensor(done + [not self.adapting], dtype=torch.float64, device=rt.device)
        if rt.distributed:
            dist.all_reduce(done)
        adapted, plain, stopped = done.tolist()
        share = adapted / max(adapted + plain, 1)
        return (f"ttt_adapted: positions {adapted:.0f} of {adapted + plain:.0f} ({share:.1%}) "
                f"scored with adapters; ranks out of time: {stopped:.0f} of {rt.world_size}")

def score_batch(forward: nn.Module, adapters: DocumentAdapters, budget: TTTBudget, index: int, val: ValidationSet,
                docs: Documents, batch: np.ndarray, h: Hyperparameters, rt, trace: list | None) -> Tensor:
    """Scores the documents `batch` (batch `index`; one adapter slot each, a short batch padded with empty rows)
    chunk after chunk; while `budget` allows, each chunk then adapts the slots. Returns their scored_sums.
    `trace` (tests) gets what was scored, in order, with each target's loss, and what trained."""
    chunk, pad = h.ttt_chunk_tokens, (0, h.ttt_batch_docs - len(batch))
    n_host = np.pad(docs.num_targets[batch], pad)
    start, n = (torch.from_numpy(a).to(rt.device) for a in (np.pad(docs.start[batch], pad), n_host))
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    adapters.reset()
    for c, (lo, first, T) in enumerate(chunk_windows(int(n_host.max()), chunk, h.model_eval_seq_len)):
        t0, adapt = time.perf_counter(), budget.adapt(index, c)
        adapters.attach(adapt)  # out of time, the rest is scored plain
        pos = torch.arange(first, first + T, device=rt.device)[None, :]  # (1, T) target index in the document
        scored = (pos >= lo) & (pos < torch.clamp(n, max=lo + chunk)[:, None])  # padding past an end: causal
        where = start[:, None] + torch.minimum(pos, (n - 1).clamp_min(0)[:, None])  # (B, T) validation target
        with torch.set_grad_enabled(adapt), rt.autocast():
            losses = forward(val.tokens[where], val.tokens[where + 1], reduction="none", one_document=True)
        sums += scored_sums(losses.detach(), scored, val.target_bytes[where])
        goes_on = lo + chunk < n_host  # decided on the host: no device sync
        if trace is not None:
            trace += [("score", int(d), lo, int(min(lo + chunk, e)), row[mask].tolist())
                      for d, e, row, mask in zip(batch, n_host, losses.detach().double(), scored) if lo < e]
            trace += [("update", int(d), lo, lo + chunk) for d, g in zip(batch, goes_on) if g and adapt]
        if adapt and goes_on.any():
            per_doc = torch.where(scored, losses, 0.0).sum(dim=1) / scored.sum(dim=1).clamp_min(1)
            (per_doc * (n > lo + chunk)).sum().backward()  # the documents that go on
            adapters.step(TTT_LR * h.ttt_lr_scale)
        rt.sync()
        budget.observe(h.ttt_batch_docs * T, time.perf_counter() - t0, adapt)
    adapters.attach(False)
    return sums

def claimed_batches(rt, first: int, stop: int, key: str):
    """Batch indices first..stop-1, each to one rank: under torchrun ranks claim the next as they finish
    (an atomic counter `key` in the process group's store)."""
    if not rt.distributed:
        yield from range(first, stop)
        return
    store = dist.distributed_c10d._get_default_store()
    while (index := first + store.add(key, 1) - 1) < stop:
        yield index

def phase_rows(docs: Documents, scored: np.ndarray, seq_len: int) -> np.ndarray:
    """The documents `scored` packed back to back as training reads its stream: (steps, SLICES_PER_STEP, rows
    per slice, seq_len) validation target indices, -1 for padding; TTT_PHASE_ROWS rows a step on any world size."""
    flat = np.concatenate([np.arange(docs.start[d], docs.start[d] + docs.num_targets[d]) for d in scored])
    step = (SLICES_PER_STEP, -(-TTT_PHASE_ROWS // SLICES_PER_STEP), seq_len)
    return np.pad(flat, (0, -len(flat) % math.prod(step)), constant_values=-1).reshape(-1, *step)

def global_phase(h: Hyperparameters, rt, model: GPT, forward: nn.Module, val: ValidationSet, rows: np.ndarray) -> None:
    """One epoch of SGD (momentum, cosine LR, clip) over the base weights on `rows` (phase_rows), each rank
    taking its slices of a step, the gradients all-reduced."""
    lr, params = TTT_PHASE_LR * h.ttt_lr_scale, list(model.requires_grad_().parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=TTT_PHASE_MOMENTUM)
    for step in range(len(rows)):
        real_targets = max(int((rows[step] >= 0).sum()), 1)
        for part in rows[step, rt.rank * rt.grad_accum_steps:(rt.rank + 1) * rt.grad_accum_steps]:
            index = torch.from_numpy(part).to(rt.device)
            safe = index.clamp_min(0)
            with rt.autocast():
                losses = forward(val.tokens[safe], val.tokens[safe + 1], reduction="none")
            (torch.where(index >= 0, losses, 0.0).sum() / real_targets).backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if rt.distributed:
                dist.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(params, TTT_PHASE_CLIP)
        opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / len(rows)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    rt.sync()

def evaluate_documents(h: Hyperparameters, rt: Runtime, model: GPT, forward: nn.Module, val: ValidationSet,
                       deadline: float = math.inf, trace: list | None = None) -> tuple[float, float]:
    """Logs the final_ttt lines and returns checked_score's (val_loss, val_bpb) per document of `model` through
    `forward` (it or its compiled form), with score-first TTT adapting while TTTBudget finds time before `deadline`
    (perf_counter: evaluation start + EVAL_BUDGET_SECONDS; -inf: plain, as TTT_LR_SCALE=0 is bit for bit). After
    the batches of a TTT_PHASES count, global_phase trains on them if it fits on every rank."""
    rt.sync()
    t0 = time.perf_counter()
    docs = split_documents(val.tokens.cpu().numpy())
    batches = [docs.order[i:i + h.ttt_batch_docs] for i in range(0, len(docs.order), h.ttt_batch_docs)]
    model.requires_grad_(False)
    adapters = DocumentAdapters(model, h.ttt_batch_docs, h.ttt_lora_rank)
    budget = TTTBudget(batch_work(docs, batches, h), rt.world_size, deadline)
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    key, first = f"ttt{next(CLAIM_KEYS)}", 0  # every rank makes the same calls, so the keys agree
    phases = {-(-c // h.ttt_batch_docs) for c in ttt_phase_counts(h)}  # whole batches
    for phase, stop in enumerate(sorted(p for p in phases if 0 < p < len(batches)) + [len(batches)]):
        for b in claimed_batches(rt, first, stop, f"{key}_{phase}"):
            was = budget.adapting
            sums += score_batch(forward, adapters, budget, b, val, docs, batches[b], h, rt, trace)
            if was and not budget.adapting:
                rt.log(f"ttt: adaptation stopped in batch {b + 1} of {len(batches)} on rank {rt.rank}, "
                       f"{time.perf_counter() - t0:.0f}s in: adapting the rest would pass EVAL_BUDGET_SECONDS="
                       f"{h.eval_budget_seconds:g} of evaluation; the rest is scored without adapters")
        if stop == len(batches):
            break
        first, was, scored = stop, budget.adapting, np.concatenate(batches[:stop])
        rows = phase_rows(docs, scored, h.model_eval_seq_len)
        if budget.phase_fits(rt, rows.size, stop):
            tp = time.perf_counter()
            global_phase(h, rt, model, forward, val, rows)
            budget.phase_rate = (time.perf_counter() - tp) / (rows.size / rt.world_size)  # s per position
            if trace is not None:
                trace.append(("phase", tuple(int(d) for d in scored)))
            rt.log(f"ttt_phase:{phase + 1} documents_scored:{len(scored)} steps:{len(rows)} "
                   f"time_ms:{1000 * (time.perf_counter() - tp):.0f}")
        elif was:
            rt.log(f"ttt: adaptation stopped before phase {phase + 1} (it would not fit EVAL_BUDGET_SECONDS="
                   f"{h.eval_budget_seconds:g} on some rank); the rest is scored without adapters")
    model.requires_grad_(True)
    rt.log(budget.report(rt))
    val_loss, val_bpb = checked_score(rt, sums, val, "per-document evaluation")
    rt.sync()
    ms = 1000 * (time.perf_counter() - t0)
    rt.log(f"final_ttt val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} chunk:{h.ttt_chunk_tokens} eval_time_ms:{ms:.0f}")
    rt.log(f"val_tokens:{val.num_targets} val_bytes:{val.num_bytes} of_val_tokens:{val.split_targets}")
    rt.log(f"ttt_eval_time_ms:{ms:.0f}")
    return val_loss, val_bpb

def warm_up_ttt(h: Hyperparameters, rt: Runtime, model: GPT, forward: nn.Module) -> float:
    """Compiles every graph TTT runs (ttt_graphs with and without adapters, the phase's rows) on random tokens,
    no optimizer step: no validation token is read. Logs the CUDA peak memory; returns the seconds taken."""
    if not compile_enabled(h, rt):
        return 0.0
    t0, cuda, lengths = time.perf_counter(), rt.device.type == "cuda", ttt_graphs(h)
    if cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    rows, per_slice = h.ttt_batch_docs, -(-TTT_PHASE_ROWS // SLICES_PER_STEP)
    ids = torch.randint(BOS_ID + 3, h.vocab_size, (max(rows, per_slice), h.model_eval_seq_len + 1),
                        generator=torch.Generator().manual_seed(0)).to(rt.device)
    ids[:, 0] = BOS_ID
    model.requires_grad_(False)
    adapters = DocumentAdapters(model, rows, h.ttt_lora_rank)
    for T in lengths:
        inputs, targets = ids[:rows, :T].contiguous(), ids[:rows, 1:T + 1].contiguous()  # as scoring's rows
        adapters.attach(True)
        with rt.autocast():
            forward(inputs, targets, reduction="none", one_document=True).mean().backward()
        adapters.attach(False)
        with torch.no_grad(), rt.autocast():
            forward(inputs, targets, reduction="none", one_document=True)
    model.requires_grad_(True)
    with rt.autocast():
        forward(ids[:per_slice, :-1].contiguous(), ids[:per_slice, 1:].contiguous(), reduction="none").mean().backward()
    model.zero_grad(set_to_none=True)
    rt.sync()
    memory = ""
    if cuda:
        peak = torch.cuda.max_memory_allocated(rt.device) / 2 ** 30
        memory = f"; peak_memory_gib:{peak:.1f}" + (f" WARNING: over {H100_MEMORY_GIB} GiB, an 80 GB H100 would "
                                                    "not hold it" if peak > H100_MEMORY_GIB else "")
    rt.log(f"ttt_warmup: {2 * len(lengths) + 1} graphs (rows {lengths[0]}..{lengths[-1]}, a phase) built on random "
           f"tokens in {1000 * (time.perf_counter() - t0):.0f}ms (not evaluation time){memory}")
    return time.perf_counter() - t0

# Targets (phase: documents) per second on 8xH100, from PR #1855's log (the figures: docs/notes/ttt.md).
RECORD_RATES = dict(forward=47_851_520 / 6.718, ttt=47_851_520 / (508.8 - 84.4), phase=(833 + 1666 + 2500) / 84.4)

def eval_plan(h: Hyperparameters, num_targets: int, num_documents: int) -> str:
    """The `eval_plan:` line: estimated seconds per pass at RECORD_RATES, the total, and a warning when
    it passes EVAL_BUDGET_SECONDS."""
    passes = {"roundtrip": num_targets / RECORD_RATES["forward"]}
    if h.eval_stride:
        passes["sliding"] = num_targets * h.model_eval_seq_len / h.eval_stride / RECORD_RATES["forward"]
    if h.ttt_enabled:
        passes["ttt"] = num_targets / RECORD_RATES["ttt"]
        phases = [min(c, num_documents) for c in ttt_phase_counts(h)]
        if phases:
            passes["ttt_phases"] = sum(phases) / RECORD_RATES["phase"]
    total = sum(passes.values())
    line = (" ".join(f"{name}_s:{seconds:.0f}" for name, seconds in passes.items()) + f" total_s:{total:.0f} "
            f"budget_s:{h.eval_budget_seconds:g} (estimates for 8xH100 at PR #1855's logged rates: forward "
            f"{RECORD_RATES['forward'] / 1e6:.2f}M targets/s, TTT {RECORD_RATES['ttt'] / 1e3:.1f}K targets/s, "
            f"phases {RECORD_RATES['phase']:.1f} documents/s; {num_targets} targets, {num_documents} documents)")
    if total > h.eval_budget_seconds:
        line += (" WARNING: over EVAL_BUDGET_SECONDS: TTT would stop adapting early"
                 + (" (EVAL_STRIDE=0 drops the sliding window)" if h.eval_stride else ""))
    return "eval_plan: " + line

# -----------------------------------------------------------------------------
# Quantization and serialization
#
# One per-row quantizer (int8 containers, bits by class; PR #76), its scale searched or SDClip'd (PR #1855),
# GPTQ on calibration Hessians, then LQER, AWQ-lite and fit_to_limit(); the artifact is a MAGIC, a frame
# table, a JSON header and byte-planed sections, loaded without pickle. docs/artifact.md has the format,
# docs/notes/quantization.md the measurements and history.

QUANT_BITS = {"int4": 4, "int5": 5, "int6": 6, "int7": 7, "int8": 8}
CLASS_BITS = {**QUANT_BITS, "fp16": 16}
BITS_CLASS = {bits: cls for cls, bits in CLASS_BITS.items()}
DEMOTIONS = {"fp16": "int8", "int7": "int6", "int6": "int5", "int5": "int4"}  # fit_to_limit's ladder
CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(26))  # 1.00, 0.98, ..., 0.50
SELFGEN_TEMPERATURE = 0.8  # PR #1204's sampling temperature for its GPTQ calibration text
SELFGEN_BATCH = 8  # sequences sampled side by side (PR #1204)
LQER_RANK, LQER_GROUP = 4, 32  # B's scales per 32 values (PR #2135; PR #1855 ran groups of 64)
LQER_PARTS = ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale")  # the error's factors A (int2), B (int4)
AWQ_PARTS = ("awq_q", "awq_group")  # a matrix's int8 columns (AWQ_GROUPS) and their groups' indices
AWQ_WIDTH = 64  # columns per AWQ-lite group (PR #1908)
ARTIFACT_MAGIC = b"PGOLF\x00A3"  # zstd frames
BROTLI_MAGIC = b"PGOLF\x00B3"  # brotli streams, each after the CRC-32 of its part (brotli has no checksum)
ANS_MAGIC = b"PGOLF\x00N3"  # as BROTLI_MAGIC, but the integer sections ANS-coded: each frame tagged A or B
COMPRESSORS = {"zstd": ARTIFACT_MAGIC, "brotli": BROTLI_MAGIC, "ans": ANS_MAGIC}
BROTLI_QUALITY = 11  # brotli's highest, as PR #1204 (its default 4 MiB window)
ANS_COLUMN_BUCKETS = 4  # COMPRESSOR=ans: a kind of matrix's columns in this many models, by the RMS of their codes
ARTIFACT_DTYPES = {"int8": np.int8, "float16": np.float16}
ARTIFACT_MAX_HEADER_BYTES = 1 << 24  # the JSON header: ~200 bytes per tensor
ARTIFACT_MAX_PAYLOAD_BYTES = 1 << 31  # the arrays: many times what a 16 MB artifact can hold

def quant_rules(h: Hyperparameters) -> tuple[tuple[str, str], ...]:
    """(name pattern, class) for partition(), from parameter_kinds' bits."""
    return tuple((pattern, BITS_CLASS[bits]) for pattern, _, bits in parameter_kinds(h).values())

def quantize_rows(w: Tensor, bits: int, clip_search: bool = True, clip_k: float = 0.0,
                  min_range: float = 0.0) -> tuple[Tensor, Tensor]:
    """(int8 codes in [-qmax, qmax], fp16 scale per row) of w (rows, cols): scale clip_k x std / qmax (SDClip), else
    the best of CLIP_RATIOS x the row's max (clip_search) or the max; at least min_range / qmax (PR #1204)."""
    qmax = 2 ** (bits - 1) - 1
    w, floor = w.float(), max(2.0 ** -24, min_range / qmax)
    if clip_k > 0:
        widths = [clip_k * w.std(dim=1, keepdim=True) / qmax]
    else:  # fp16 rounds to within 2^-11 relative: the nudge keeps ratio x amax representable
        amax = w.abs().amax(dim=1, keepdim=True)
        widths = [amax * ratio / qmax * (1 + 2.0 ** -10) for ratio in (CLIP_RATIOS if clip_search else (1.0,))]
    best = None
    for width in widths:
        scale = width.clamp_min(floor).half().float()
        q = torch.clamp(torch.round(w / scale), -qmax, qmax)
        err = (q * scale - w).square().sum(dim=1, keepdim=True)
        if best is not None:  # per row, the first of the least errors
            better = err < best[2]
            q, scale, err = (torch.where(better, new, old) for new, old in zip((q, scale, err), best))
        best = q, scale, err
    return best[0].to(torch.int8), best[1].squeeze(1).half()

def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]

def quant_plan(state: dict[str, Tensor], h: Hyperparameters,
               hessians: dict[str, Tensor] | None = None) -> dict[str, str]:
    """name -> class by quant_rules(h); INT6_MATRICES ranks the block matrices and bigram projection, the bigram
    table int8 (PR #1204)."""
    classes = partition(list(state.items()), quant_rules(h), "quant_rules")
    owner = {name: cls for cls, members in classes.items() for name, _ in members}
    plan = {name: owner[name] for name in state}  # the state dict's order, whatever the rules' order
    if h.int6_matrices:
        ranked = [n for n in plan if re.fullmatch(BLOCK_MATRICES, n) or n == "bigram.proj.weight"]
        plan.update(int6_by_trace(ranked, hessians or {}, recurrence_blocks(h), h.int6_matrices))
        if "bigram.table.weight" in plan:
            plan["bigram.table.weight"] = "int8"
    return plan

def int6_by_trace(names: list[str], hessians: dict[str, Tensor], repeated: tuple[int, ...],
                  count: int) -> dict[str, str]:
    """int6 for `count` of `names`, int5 for the rest (PR #1204: 32 of 67): the matrices of the `repeated`
    blocks (they run twice) first, then by the trace of their input Hessian (0 without one)."""
    twice = tuple(f"blocks.{i}." for i in repeated) + ("repeat_mlps.",)
    trace = {name: hessians[name].diagonal().sum().item() if name in hessians else 0.0 for name in names}
    chosen = set(sorted(names, key=lambda name: (not name.startswith(twice), -trace[name], name))[:count])
    return {name: "int6" if name in chosen else "int5" for name in names}

def gptq_round(w: Tensor, hessian: Tensor, bits: int, scale: Tensor, block: int = 128,
               keep: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """int8 codes of w (rows, cols) on the per-row `scale`, each column's rounding error pushed onto the columns
    not yet rounded (GPTQ, Frantar et al. 2022). keep = (columns, per-row step): those go int8 (AWQ_GROUPS)."""
    steps = scale.float().reshape(-1, 1).expand(w.shape).clone()  # (rows, cols): each entry's step
    limits = torch.full((w.size(1),), 2.0 ** (bits - 1) - 1)
    if keep is not None:
        steps[:, keep[0]] = keep[1].float()[:, None]
        limits[keep[0]] = 127.0
    w, hessian = w.float().clone(), hessian.float().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(hessian.diagonal(), descending=True)  # act-order: largest input energy first
    w, hessian, steps, limits = w[:, order], hessian[order][:, order], steps[:, order], limits[order].tolist()
    hessian.diagonal().add_(0.01 * hessian.diagonal().mean())  # damping, as in the paper
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    q = torch.zeros_like(w)
    for i0 in range(0, w.size(1), block):
        i1 = min(i0 + block, w.size(1))
        errors = torch.zeros(w.size(0), i1 - i0, device=w.device)
        for i in range(i0, i1):
            q[:, i] = torch.clamp(torch.round(w[:, i] / steps[:, i]), -limits[i], limits[i])
            errors[:, i - i0] = (w[:, i] - q[:, i] * steps[:, i]) / inverse[i, i]
            w[:, i:i1] -= errors[:, i - i0, None] * inverse[i, i:i1][None, :]
        w[:, i1:] -= errors @ inverse[i0:i1, i1:]
    return q[:, torch.argsort(order)].to(torch.int8)

@torch.no_grad()
def input_hessians(model: GPT, batches, total_tokens: int, rt, head: bool = False) -> dict[str, Tensor]:
    """E[x x^T] (fp32, (in, in)) of the inputs of each block matrix (`head`: of the tied head, as tok_emb.weight),
    over the (B, T) `batches` (this rank's share of `total_tokens`). Eager model: the hooks need its inputs."""
    modules = {f"{name}.weight": module for name, module in model.named_modules()
               if re.fullmatch(BLOCK_MATRICES, f"{name}.weight") and not name.endswith(("c_k", "c_v"))}
    if head:
        modules["tok_emb.weight"] = model.head_input
    weights = {name: model.get_parameter(name) for name in modules}
    sums = {name: torch.zeros(w.size(1), w.size(1), device=w.device) for name, w in weights.items()}

    def hook(name: str, module, args) -> None:
        x = args[0].detach().flatten(0, -2).float()
        with torch.autocast(x.device.type, enabled=False):  # sums in fp32, not bf16
            sums[name].addmm_(x.T, x)

    hooks = [module.register_forward_pre_hook(functools.partial(hook, name)) for name, module in modules.items()]
    for inputs in batches:
        with rt.autocast():
            model(inputs)
    for hook in hooks:
        hook.remove()
    for total in sums.values():
        if rt.distributed:
            dist.all_reduce(total)
        total /= total_tokens
    sums = {name: total for name, total in sums.items() if total.any()}  # a matrix that never ran has none
    for name in list(sums):  # keys and values read the same input as queries
        if name.endswith("attn.c_q.weight"):
            sums[name.replace("c_q", "c_k")] = sums[name.replace("c_q", "c_v")] = sums[name]
    return sums

def collect_hessians(model: GPT, loader: DistributedTokenLoader, h: Hyperparameters, rt,
                     batches: int | None = None) -> dict[str, Tensor]:
    """input_hessians() on GPTQ_CALIB_TOKENS training tokens (rounded up to whole steps: the same spans on
    any world size; the stream goes on where training stopped), or on `batches` micro-batches."""
    tokens_per_slice = h.train_batch_tokens // SLICES_PER_STEP
    batches = batches or -(-h.gptq_calib_tokens // h.train_batch_tokens) * rt.grad_accum_steps
    inputs = (loader.next_batch(tokens_per_slice, h.train_seq_len)[0] for _ in range(batches))
    return input_hessians(model, inputs, batches * tokens_per_slice * rt.world_size, rt, h.gptq_embed)

@torch.no_grad()
def sample_batch(model: GPT, count: int, length: int, seed: int, rt) -> Tensor:
    """(count, length) tokens sampled from BOS at SELFGEN_TEMPERATURE, seeded; no KV cache (PR #1204's calibration)."""
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    tokens = torch.full((count, 1), BOS_ID, dtype=torch.int64, device=rt.device)
    for _ in range(length - 1):
        with rt.autocast():
            logits = model(tokens)[:, -1].float()
        probs = torch.softmax(logits / SELFGEN_TEMPERATURE, dim=-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return tokens

def selfgen_hessians(model: GPT, h: Hyperparameters, rt) -> dict[str, Tensor]:
    """input_hessians() on GPTQ_SELFGEN_SEQS sampled sequences (PR #1204; reads no data); batch b of SELFGEN_BATCH,
    seeded SEED + b, goes to rank b % world_size: the same text on any world size."""
    length = h.train_seq_len
    mine = list(range(0, h.gptq_selfgen_seqs, SELFGEN_BATCH))[rt.rank::rt.world_size]
    batches = [sample_batch(model, min(SELFGEN_BATCH, h.gptq_selfgen_seqs - start), length,
                            h.seed + start // SELFGEN_BATCH, rt) for start in mine]  # all sampled before any hook
    return input_hessians(model, batches, h.gptq_selfgen_seqs * length, rt, h.gptq_embed)

def calibrate(h: Hyperparameters, rt: Runtime, base_model: GPT,
              loader: DistributedTokenLoader) -> tuple[dict | None, float]:
    """GPTQ's Hessians (None without GPTQ) and the milliseconds that count as training (those reading training data)."""
    if not (h.gptq_calib_tokens or h.gptq_selfgen_seqs):
        return None, 0.0
    t0 = time.perf_counter()
    if h.gptq_calib_tokens:
        hessians = collect_hessians(base_model, loader, h, rt)
        source = f"{-(-h.gptq_calib_tokens // h.train_batch_tokens) * h.train_batch_tokens} training tokens"
    else:
        hessians = selfgen_hessians(base_model, h, rt)
        source = f"{h.gptq_selfgen_seqs} sampled sequences of {h.train_seq_len} tokens"
    rt.sync()
    ms = 1000 * (time.perf_counter() - t0)
    rt.log(f"gptq_calibration: {len(hessians)} matrices from {source} in {ms:.0f}ms"
           + ("" if h.gptq_calib_tokens else " (no data read; not in train_time_ms)"))
    return hessians, ms if h.gptq_calib_tokens else 0.0

def salient_groups(state: dict[str, Tensor], plan: dict[str, str], hessians: dict[str, Tensor],
                   count: int) -> dict[str, list[int]]:
    """AWQ-lite (PR #1908): {name: [group, ...]}, the `count` most salient AWQ_WIDTH-column groups of the GPTQ'd
    matrices below int8 (1-128 groups wide), by the sum over a group's columns of input RMS x mean |w|."""
    scored = []
    for name, hessian in hessians.items():
        w = state[name].detach().float()
        if QUANT_BITS.get(plan.get(name), 8) >= 8 or w.size(1) % AWQ_WIDTH or w.size(1) > 128 * AWQ_WIDTH:
            continue
        saliency = hessian.diagonal().float().clamp_min(0).sqrt().cpu() * w.abs().mean(dim=0).cpu()
        scored += [(-score, name, g) for g, score in enumerate(saliency.view(-1, AWQ_WIDTH).sum(dim=1).tolist())]
    top = sorted(scored)[:count]
    return {name: sorted(g for _, n, g in top if n == name) for name in dict.fromkeys(n for _, n, _ in top)}

def awq_columns(groups) -> Tensor:
    return torch.tensor([g * AWQ_WIDTH + i for g in groups for i in range(AWQ_WIDTH)], dtype=torch.long)

def awq_scale(scale: Tensor, bits: int) -> Tensor:
    """AWQ's int8 step per row: the row's range on the int8 grid (no scale of its own to store)."""
    return scale.float() * (2 ** (bits - 1) - 1) / 127

class QuantRecipe(typing.NamedTuple):
    """How one tensor is quantized, resolved once by quant_recipes(); clip_k 0: the clip search (or the row's max)."""
    cls: str
    clip_k: float = 0.0
    hessian: Tensor | None = None
    awq: tuple[int, ...] = ()
    clip_search: bool = True
    min_range: float = 0.0

def quant_recipes(state: dict[str, Tensor], h: Hyperparameters,
                  hessians: dict[str, Tensor] | None = None) -> dict[str, QuantRecipe]:
    """name -> QuantRecipe by h: quant_plan()'s class, SDClip's k by kind (SDCLIP_*; gates 0), Hessian, AWQ groups."""
    hessians = hessians or {}
    plan = quant_plan(state, h, hessians)
    kinds = ((GATE_TENSORS, 0.0), (BLOCK_ATTN, h.sdclip_attn), (BLOCK_MLP, h.sdclip_mlp),
             (r"tok_emb\.weight", h.sdclip_embed))
    clip_k = {name: next((k for pattern, k in kinds if re.fullmatch(pattern, name)), h.sdclip_other)
              for name, cls in plan.items() if cls in QUANT_BITS}
    awq = salient_groups(state, plan, hessians, h.awq_groups) if h.awq_groups else {}
    return {name: QuantRecipe(cls, clip_k.get(name, 0.0), hessians.get(name), tuple(awq.get(name, ())),
                              h.clip_search, h.quant_min_range) for name, cls in plan.items()}

def quantize_tensor(tensor: Tensor, recipe: QuantRecipe) -> dict:
    """One tensor's artifact entry {class, shape, arrays}: fp16 `value`, or codes `q` and one `scale` per
    row (rows: the last dimension), GPTQ-rounded given a Hessian, the AWQ groups int8 (AWQ_PARTS)."""
    cls, clip_k, hessian, awq, clip_search, min_range = recipe
    tensor, arrays = tensor.detach().float(), {}
    if cls not in QUANT_BITS:
        arrays["value"] = tensor.half()
    else:
        bits, rows = QUANT_BITS[cls], tensor.reshape(-1, tensor.shape[-1])
        q, scale = quantize_rows(rows, bits, clip_search, clip_k, min_range)
        if hessian is not None:
            cols = awq_columns(awq)
            q = gptq_round(rows, hessian, bits, scale, keep=(cols, awq_scale(scale, bits)) if awq else None)
            if awq:
                arrays = {"awq_q": q[:, cols].clone(), "awq_group": torch.tensor(awq, dtype=torch.int8)}
                q[:, cols] = 0  # the class's section keeps the class's range
        arrays.update(q=q, scale=scale)
    return {"class": cls, "shape": list(tensor.shape), "arrays": {k: v.cpu().numpy() for k, v in arrays.items()}}

def dequantize_tensor(entry: dict) -> Tensor:
    """The float tensor of an entry; ValueError where its AWQ groups lie outside it."""
    arrays = {part: torch.from_numpy(np.array(a)) for part, a in entry["arrays"].items()}
    if entry["class"] not in QUANT_BITS:
        return arrays["value"].float().view(entry["shape"])
    w = dequantize_rows(arrays["q"], arrays["scale"])
    if "awq_q" in arrays:
        groups = arrays["awq_group"].tolist()
        if any(not 0 <= g < w.size(1) // AWQ_WIDTH for g in groups):
            raise ValueError(f"AWQ groups {groups} outside the {w.size(1)} columns")
        step = awq_scale(arrays["scale"], QUANT_BITS[entry["class"]])
        w[:, awq_columns(groups)] = arrays["awq_q"].float() * step[:, None]
    if "lqer_a" in arrays:  # LQER's A @ B: A int2 with one scale, B int4 with one scale per LQER_GROUP values
        a = arrays["lqer_a"].float() * arrays["lqer_a_scale"].float()
        b = dequantize_rows(arrays["lqer_b"].reshape(-1, LQER_GROUP), arrays["lqer_b_scale"])
        w = w + a @ b.view(arrays["lqer_b"].shape)
    return w.view(entry["shape"])

def dequantize_state(quantized: dict[str, dict]) -> dict[str, Tensor]:
    return {name: dequantize_tensor(entry) for name, entry in quantized.items()}

def add_low_rank_corrections(state: dict[str, Tensor], quantized: dict[str, dict], top: int) -> list[str]:
    """LQER (PR #1855) for the `top` quantized matrices (whole LQER_GROUPs wide) of largest ||E||_F, E = W - Q(W):
    E ~ A @ B, A (rows, LQER_RANK) = sqrt(S) U from E's SVD rounded to {-1, 0, 1} x one scale, then B refit to the
    rounded A by least squares, int4 per LQER_GROUP values. Returns their names, largest error first."""
    errors = {}
    for name, entry in quantized.items():
        if entry["class"] in QUANT_BITS and len(entry["shape"]) == 2 and entry["shape"][1] % LQER_GROUP == 0:
            errors[name] = state[name].detach().float().cpu() - dequantize_tensor(entry)
    chosen = sorted(errors, key=lambda n: (-float(errors[n].norm()), n))[:top]
    for name in chosen:
        u, s, vh = torch.linalg.svd(errors[name], full_matrices=False)
        rank = min(LQER_RANK, len(s))
        qa, sa = quantize_rows((u[:, :rank] * s[:rank].sqrt()).reshape(1, -1), 2)
        a = dequantize_rows(qa, sa).view(-1, rank)
        qb, sb = quantize_rows((torch.linalg.pinv(a) @ errors[name]).reshape(-1, LQER_GROUP), 4)
        parts = {"lqer_a": qa.view(-1, rank), "lqer_a_scale": sa, "lqer_b": qb.view(rank, -1), "lqer_b_scale": sb}
        quantized[name]["arrays"].update({k: v.numpy() for k, v in parts.items()})
    return chosen

def quantize_state(state: dict[str, Tensor], recipes: dict[str, QuantRecipe]) -> dict[str, dict]:
    return {name: quantize_tensor(state[name], recipe) for name, recipe in recipes.items()}

def quantize_model(state: dict[str, Tensor], h: Hyperparameters, hessians: dict[str, Tensor] | None,
                   log=no_log) -> tuple[dict[str, dict], dict[str, QuantRecipe]]:
    """The export before any fitting: each tensor by its recipe, then LQER. Returns (entries, recipes)."""
    recipes = quant_recipes(state, h, hessians)
    if h.int6_matrices:
        int6 = sorted(n for n, r in recipes.items() if r.cls == "int6" and re.fullmatch(BLOCK_MATRICES, n))
        log(f"int6_matrices: {len(int6)} (repeated blocks first, then by Hessian trace), the other block matrices "
            f"int5: {','.join(int6)}")
    quantized = quantize_state(state, recipes)
    if h.lqer_top:
        log(f"lqer: rank-{LQER_RANK} corrections of {','.join(add_low_rank_corrections(state, quantized, h.lqer_top))}")
    return quantized, recipes

def output_error(tensor: Tensor, entry: dict, hessian: Tensor | None) -> float:
    """The squared error an entry adds to its layer's output: tr(dW H dW^T), H = I without a Hessian."""
    delta = dequantize_tensor(entry).to(tensor.device) - tensor.detach().float()
    return (delta.square() if hessian is None else (delta @ hessian.float()) * delta).sum().item()

def fit_to_limit(state: dict[str, Tensor], quantized: dict[str, dict], recipes: dict[str, QuantRecipe], serialize,
                 budget: int, log) -> tuple[bytes, list[str]]:
    """(serialize(quantized), moves): while over `budget` bytes, demotes tensors a class each (AWQ dropped), least
    output_error per byte saved first, until 1.25x the overshoot is expected saved; re-measures; RunError if none."""
    blob, moves = serialize(quantized), []
    while len(blob) > budget:
        overshoot = len(blob) - budget
        candidates = []
        for name, entry in quantized.items():
            target = DEMOTIONS.get(entry["class"])
            if target is None or re.fullmatch(f"{CONTROL_TENSORS}|{GATE_TENSORS}", name):
                continue
            hessian = recipes[name].hessian
            demoted = quantize_tensor(state[name], recipes[name]._replace(cls=target, awq=()))
            saving = (CLASS_BITS[entry["class"]] - CLASS_BITS[target]) * state[name].numel() / 8
            cost = output_error(state[name], demoted, hessian) - output_error(state[name], entry, hessian)
            candidates.append((cost / saving, name, target, demoted, saving))
        if not candidates:
            raise RunError(f"artifact is {overshoot} bytes over its budget with every matrix at its lowest "
                           f"class; raise ARTIFACT_LIMIT_BYTES or shrink the model")
        expected = 0.0
        for _, name, target, demoted, saving in sorted(candidates, key=lambda c: c[:2]):
            moves.append(f"{name}:{quantized[name]['class']}->{target}")
            log(f"fit: {moves[-1]} (expected to save ~{saving:.0f} bytes of {overshoot} over)")
            quantized[name] = demoted
            expected += saving
            if expected >= 1.25 * overshoot:
                break
        blob = serialize(quantized)
    return blob, moves

def to_byte_planes(array: np.ndarray) -> bytes:
    """All first bytes, then all second bytes, ...: fp16's sign/exponent bytes compress better apart."""
    return array.reshape(-1).view(np.uint8).reshape(-1, array.itemsize).T.tobytes()

def from_byte_planes(data, dtype: np.dtype) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8).reshape(dtype.itemsize, -1)
    return np.ascontiguousarray(planes.T).view(dtype).ravel()

def serialize_artifact(quantized: dict[str, dict], model_config: dict, compressor: str = "zstd") -> bytes:
    """pack_frames() of a JSON header (model, classes, shapes, each array's dtype, shape, offset) and a section per
    part (each class's codes, scales, fp16 values, extras) in byte planes (ans: codes as (name, array) lists)."""
    blobs, sections, offset = [], [], 0
    extras = sorted(AWQ_PARTS + LQER_PARTS)
    for part, cls in [("q", cls) for cls in QUANT_BITS] + [(part, None) for part in ("scale", "value", *extras)]:
        coded, chunks = part == "q" and compressor == "ans", []
        for name, entry in quantized.items():
            if part in entry["arrays"] and cls in (None, entry["class"]):
                array = np.asarray(entry["arrays"][part], order="C")  # (ascontiguousarray makes 0-d 1-d)
                blobs.append(dict(name=name, part=part, dtype=array.dtype.name, shape=list(array.shape),
                                  offset=offset, nbytes=array.nbytes))
                chunks.append((name, array) if coded else to_byte_planes(array))
                offset += array.nbytes
        if chunks:
            sections.append(chunks if coded else b"".join(chunks))
    header = json.dumps(dict(model=model_config, classes={n: e["class"] for n, e in quantized.items()},
                             shapes={n: e["shape"] for n, e in quantized.items()}, blobs=blobs)).encode()
    return pack_frames([header] + sections, compressor)

def pack_frames(parts: list, compressor: str = "zstd") -> bytes:
    """MAGIC, u32 frame count, u64 length per frame, the frames: checksummed zstd, or the part's CRC-32 (u32) and
    its brotli stream; ans tags each b"B" or, where shorter for a list of (name, int8 array), b"A" (ans_encode)."""
    if compressor == "zstd":
        zstd = zstandard.ZstdCompressor(level=22, write_checksum=True)
        frames = [zstd.compress(part) for part in parts]
    else:
        codec, frames = brotli_module(), []
        for part in parts:
            data = b"".join(array.tobytes() for _, array in part) if isinstance(part, list) else part
            crc = struct.pack("<I", zlib.crc32(data))
            frame = crc + codec.compress(data, quality=BROTLI_QUALITY)
            if compressor == "ans":
                coded = crc + ans_encode(part) if isinstance(part, list) else frame
                frame = b"A" + coded if len(coded) < len(frame) else b"B" + frame
            frames.append(frame)
    table = struct.pack(f"<I{len(frames)}Q", len(frames), *map(len, frames))
    return COMPRESSORS[compressor] + table + b"".join(frames)

def brotli_module(package: str = "brotli"):
    """brotli (or constriction, COMPRESSOR=ans's coder), imported where used; missing, a one-line RunError."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise RunError(f"COMPRESSOR={'ans' if package == 'constriction' else 'brotli'} (or reading an artifact "
                       f"written with it) needs the {package} package: pip install {package}") from None

def ans_encode(arrays: list[tuple[str, np.ndarray]]) -> bytes:
    """Codes (rows, cols) ANS-coded (constriction), a static model per kind (name less block index) and column bucket
    (by the RMS of its codes: PR #1855's lrzip context). u32 length, brotli'd JSON of the models, u32 ANS words."""
    constriction = brotli_module("constriction")
    matrices = [array.astype(np.int32) for _, array in arrays]
    kinds = [re.sub(r"\.\d+\.", ".", name) for name, _ in arrays]
    buckets = []
    for m in matrices:
        rms = np.sqrt(np.square(m, dtype=np.float64).mean(0)) if m.size else np.zeros(m.shape[1])
        edges = np.quantile(rms, np.linspace(0, 1, ANS_COLUMN_BUCKETS + 1)[1:-1]) if m.size else []
        buckets.append(np.searchsorted(edges, rms, side="right"))
    models, symbols = [], []
    for group in ans_groups(kinds, buckets):
        values = np.concatenate([matrices[i][:, buckets[i] == b].ravel() for i, b in group])
        low = int(values.min()) if values.size else 0
        models.append([low, np.bincount(values - low).tolist() if values.size else []])
        symbols.append(values - low)
    meta = dict(shapes=[list(m.shape) for m in matrices], kinds=kinds, buckets=[b.tolist() for b in buckets],
                models=models)
    coder = constriction.stream.stack.AnsCoder()
    for (low, counts), values in reversed(list(zip(models, symbols))):  # a stack: the last group first
        if values.size:
            coder.encode_reverse(values.astype(np.int32), ans_model(constriction, counts))
    head = brotli_module().compress(json.dumps(meta).encode(), quality=BROTLI_QUALITY)
    return struct.pack("<I", len(head)) + head + coder.get_compressed().astype("<u4").tobytes()

def ans_groups(kinds: list[str], buckets: list[np.ndarray]) -> list[list[tuple[int, int]]]:
    """(matrix index, bucket) members per model, in coding order: kinds sorted, buckets up."""
    return [[(i, b) for i in range(len(kinds)) if kinds[i] == kind] for kind in sorted(set(kinds))
            for b in range(ANS_COLUMN_BUCKETS)]

def ans_model(constriction, counts: list[int]):
    """Symbol i (code low + i) at probability counts[i] / sum; a lone symbol gets an unused second (needs two)."""
    return constriction.stream.model.Categorical(np.asarray(list(counts) + [0] * (len(counts) < 2), dtype=np.float64),
                                                 perfect=False)

def ans_decode(payload: bytes, max_bytes: int) -> bytes:
    """ans_encode()'s arrays as int8 bytes, end to end; ValueError where the payload describes more than
    `max_bytes` values (checked before anything is decoded) or does not decode (the frame's CRC-32 checks it)."""
    constriction = brotli_module("constriction")
    (head_len,) = struct.unpack_from("<I", payload)
    meta = json.loads(brotli_decode(payload[4:4 + head_len], ARTIFACT_MAX_HEADER_BYTES))
    shapes, kinds, buckets = meta["shapes"], meta["kinds"], [np.asarray(b, dtype=np.int64) for b in meta["buckets"]]
    if sum(r * c for r, c in shapes) > max_bytes or any(b.shape != (c,) for b, (_, c) in zip(buckets, shapes)):
        raise ValueError("an ANS frame whose description does not add up")
    try:
        matrices = [np.zeros((r, c), dtype=np.int32) for r, c in shapes]
        words = np.frombuffer(payload[4 + head_len:], dtype="<u4").astype(np.uint32)
        coder = constriction.stream.stack.AnsCoder(words) if words.size else constriction.stream.stack.AnsCoder()
        for group, (low, counts) in zip(ans_groups(kinds, buckets), meta["models"]):
            sizes = [shapes[i][0] * int((buckets[i] == b).sum()) for i, b in group]
            values = coder.decode(ans_model(constriction, counts), sum(sizes)) + low if sum(sizes) else np.zeros(0)
            for (i, b), chunk in zip(group, np.split(values, np.cumsum(sizes)[:-1])):
                matrices[i][:, buckets[i] == b] = chunk.reshape(shapes[i][0], int((buckets[i] == b).sum()))
    except Exception as exc:  # the coder's own error, or a description that does not fit, on a damaged frame
        raise ValueError(f"an ANS stream that does not decode ({type(exc).__name__}: {exc})") from None
    return b"".join(m.astype(np.int8).tobytes() for m in matrices)

def unpack_frames(data: bytes) -> list[bytes]:
    """The compressed frames, as the frame table cuts them (the table must cover the file exactly)."""
    (count,) = struct.unpack_from("<I", data, len(ARTIFACT_MAGIC))  # a count the file cannot hold: struct.error
    lengths = struct.unpack_from(f"<{count}Q", data, len(ARTIFACT_MAGIC) + 4)
    pos = len(ARTIFACT_MAGIC) + 4 + 8 * count
    if pos + sum(lengths) != len(data):
        raise ValueError(f"the frames cover {pos + sum(lengths)} bytes, the file has {len(data)}")
    ends = list(itertools.accumulate(lengths, initial=pos))
    return [data[start:end] for start, end in zip(ends, ends[1:])]

def brotli_decode(stream: bytes, max_bytes: int) -> bytes:
    """A brotli stream (it declares no size) decoded into a bounded buffer; ValueError unless it ends within it."""
    codec = brotli_module()
    decoder = codec.Decompressor()
    try:
        data = decoder.process(stream, output_buffer_limit=max_bytes + 1)
    except codec.error as exc:
        raise ValueError(f"a brotli stream that does not decode ({exc})") from None
    if len(data) > max_bytes or not decoder.is_finished():
        raise ValueError("a brotli stream longer than its bound or cut short")
    return data

def decompress_frame(frame: bytes, max_bytes: int, compressor: str = "zstd") -> bytes:
    """One frame within `max_bytes` (zstd's declared size checked before allocating), else ValueError; a brotli
    or ANS part must match its CRC-32."""
    if compressor == "zstd":
        params = zstandard.get_frame_parameters(frame)
        if not params.has_checksum or params.dict_id:
            raise ValueError("a frame without its checksum, or with a dictionary")
        if params.content_size > max_bytes:  # an unknown size reads as 2^64 - 1
            raise ValueError(f"a frame declares {params.content_size} bytes where at most {max_bytes} can be")
        return zstandard.ZstdDecompressor().decompress(frame, max_output_size=max_bytes, allow_extra_data=False)
    tag, frame = (frame[:1], frame[1:]) if compressor == "ans" else (b"B", frame)
    if tag not in (b"A", b"B"):
        raise ValueError("a frame tagged neither A nor B")
    part = (ans_decode if tag == b"A" else brotli_decode)(frame[4:], max_bytes)
    if struct.unpack_from("<I", frame)[0] != zlib.crc32(part):
        raise ValueError("a frame failing its CRC-32")
    return part

def payload_bytes(blobs: list[dict]) -> int:
    """The bytes the header's arrays take, checked: sizes follow from dtype and shape, arrays lie end to end."""
    total = 0
    for blob in blobs:
        if not all(isinstance(d, int) and d >= 0 for d in blob["shape"]):
            raise ValueError(f"array {blob['name']} has shape {blob['shape']}")
        nbytes = math.prod(blob["shape"]) * np.dtype(ARTIFACT_DTYPES[blob["dtype"]]).itemsize
        if blob["offset"] != total or blob["nbytes"] != nbytes:
            raise ValueError(f"array {blob['name']} does not lie where its size puts it")
        total += nbytes
    if total > ARTIFACT_MAX_PAYLOAD_BYTES:
        raise ValueError(f"the arrays would take {total} bytes")
    return total

def deserialize_artifact(data: bytes, source: str) -> tuple[dict, dict[str, dict]]:
    """(model config, entries); any damage is a one-line RunError naming `source`. Each frame decompresses
    within what the format allows: the header ARTIFACT_MAX_HEADER_BYTES, the sections what it says."""
    compressor = next((name for name, magic in COMPRESSORS.items() if data.startswith(magic)), None)
    if compressor is None:
        raise RunError(f"{source}: corrupt or truncated artifact, or not one written by this script (bad magic)")
    try:
        header_frame, *section_frames = unpack_frames(data)
        header = json.loads(decompress_frame(header_frame, ARTIFACT_MAX_HEADER_BYTES, compressor))
        remaining = payload_bytes(header["blobs"])
        sections = []
        for frame in section_frames:
            sections.append(decompress_frame(frame, remaining, compressor))
            remaining -= len(sections[-1])
        if remaining:
            raise ValueError(f"the sections lack {remaining} bytes of the arrays")
        body = memoryview(b"".join(sections))
        quantized = {name: {"class": cls, "shape": header["shapes"][name], "arrays": {}}
                     for name, cls in header["classes"].items()}
        for blob in header["blobs"]:
            array = from_byte_planes(body[blob["offset"]:blob["offset"] + blob["nbytes"]],
                                     np.dtype(ARTIFACT_DTYPES[blob["dtype"]])).reshape(blob["shape"])
            quantized[blob["name"]]["arrays"][blob["part"]] = array
        layouts = [{"q", "scale", *awq, *lqer} for awq in ((), AWQ_PARTS) for lqer in ((), LQER_PARTS)]
        for name, entry in quantized.items():  # the class's arrays and whole extras (AWQ, LQER), nothing else
            if set(entry["arrays"]) not in (layouts if entry["class"] in QUANT_BITS else [{"value"}]):
                raise ValueError(f"tensor {name} ({entry['class']}) lacks its arrays or has others")
        # a field the writer did not know yet loads at its default (docs/artifact.md); an unknown one is damage
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        config = {**defaults, **header["model"]}
        if config.keys() != defaults.keys() or any(type(v) is not type(defaults[k]) for k, v in config.items()):
            raise ValueError("the model's shape is not described as this script describes it")
        return config, quantized
    except (zstandard.ZstdError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RunError(f"{source}: corrupt or truncated artifact ({type(exc).__name__}: {exc})") from None

def model_config(h: ModelConfig) -> dict:
    """What the artifact stores: the ModelConfig fields of h, in their order."""
    return {f.name: getattr(h, f.name) for f in dataclasses.fields(ModelConfig)}

# The code counts as the file that ships (docs/artifact.md): the program LZMA'd and base85'd in a two-line stub.
SHIPPED_HEAD = b'import lzma,base64\nexec(compile(lzma.decompress(base64.b85decode(b"'
SHIPPED_TAIL = b'")),"train_gpt.py","exec"))\n'

def minified(source: str) -> str:
    """The program of `source` without comments and docstrings (ast.unparse; a fixed point)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)

def shipped_form(code: bytes) -> bytes:
    """The self-extracting file that ships for this source (itself if it is one already)."""
    if code.startswith(SHIPPED_HEAD):
        return code
    packed = lzma.compress(minified(code.decode("utf-8")).encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)
    return SHIPPED_HEAD + base64.b85encode(packed) + SHIPPED_TAIL

def readable_source(code: bytes) -> str:
    """The program text of this file: the source itself, or what a shipped form runs."""
    if code.startswith(SHIPPED_HEAD):
        code = lzma.decompress(base64.b85decode(code[len(SHIPPED_HEAD):-len(SHIPPED_TAIL)]))
    return code.decode("utf-8")

def write_artifact(h: Hyperparameters, rt: Runtime, base_model: GPT, path: Path, code_bytes: int,
                   hessians: dict[str, Tensor] | None = None) -> None:
    """Quantizes and compresses the model, fits it under the byte limit, writes it (rank 0); every rank
    computes the same bytes, so a RunError stops all of them together."""
    t0 = time.perf_counter()
    if code_bytes >= h.artifact_limit_bytes:
        raise RunError(f"ARTIFACT_LIMIT_BYTES={h.artifact_limit_bytes} leaves no room: the code alone is "
                       f"{code_bytes} bytes")
    state = base_model.state_dict()
    config = model_config(h)
    if not base_model.recur_active:  # the run ended before the repeat was switched on: score without it
        if h.virtual_depth or h.recur_untie_mlp or h.recur_in_unet:
            raise RunError("the run ended before RECUR_START_FRAC: a VIRTUAL_DEPTH / RECUR_UNTIE_MLP / RECUR_IN_UNET "
                           "model cannot be scored without its repeat (lower RECUR_START_FRAC)")
        config["recur_blocks"] = ""
    quantized, recipes = quantize_model(state, h, hessians, rt.log)
    blob, moves = fit_to_limit(state, quantized, recipes, lambda q: serialize_artifact(q, config, h.compressor),
                               h.artifact_limit_bytes - code_bytes, rt.log)
    for cls in sorted({e["class"] for e in quantized.values()}):
        members = [e for e in quantized.values() if e["class"] == cls]
        rt.log(f"quant class:{cls} tensors:{len(members)} params:{sum(math.prod(e['shape']) for e in members)}")
    rt.log(f"quantize+compress: {1000 * (time.perf_counter() - t0):.0f}ms compressor:{h.compressor}")
    if rt.is_main:
        write_atomically(path, lambda tmp: tmp.write_bytes(blob))
    if rt.distributed:
        dist.barrier()
    log_artifact_bytes(h, rt, path, code_bytes, moves)

def log_artifact_bytes(h: Hyperparameters, rt: Runtime, path: Path, code_bytes: int, moves: list[str] | None) -> None:
    """The byte budget of the exact files that ship: this script (as logged) and the artifact on disk."""
    blob = path.read_bytes()
    model_bytes, digest = len(blob), hashlib.sha256(blob).hexdigest()
    total = code_bytes + model_bytes
    fit = "" if moves is None else f" fit_moves:{len(moves)}"
    rt.log(f"artifact_bytes:{total} code_bytes:{code_bytes} model_bytes:{model_bytes} "
           f"limit:{h.artifact_limit_bytes} margin:{h.artifact_limit_bytes - total}{fit} artifact_sha256:{digest}")
    if moves:
        rt.log(f"fit_changes:{','.join(moves)}")
    if total > h.artifact_limit_bytes:
        raise RunError(f"{path}: code + model = {total} bytes, over ARTIFACT_LIMIT_BYTES={h.artifact_limit_bytes}")

def load_artifact(path: Path, max_bytes: int) -> tuple[dict, dict[str, Tensor]]:
    """The artifact at `path`, read only if it is a file of at most `max_bytes` (the byte limit)."""
    if not path.is_file():
        raise RunError(f"{path}: no such artifact (not a file)")
    try:
        if path.stat().st_size > max_bytes:
            raise RunError(f"{path}: {path.stat().st_size} bytes, over ARTIFACT_LIMIT_BYTES={max_bytes}: "
                           f"not an artifact that fits")
        data = path.read_bytes()
    except OSError as exc:
        raise RunError(f"{path}: cannot read the artifact ({exc.strerror or exc})") from None
    config, quantized = deserialize_artifact(data, str(path))
    try:
        return config, dequantize_state(quantized)
    except (RuntimeError, ValueError) as exc:
        raise RunError(f"{path}: corrupt or truncated artifact ({type(exc).__name__}: {first_line(exc)})") from None

def load_weights(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """The artifact's weights into the model it describes; a mismatch is a damaged artifact."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RunError(f"{path}: corrupt or truncated artifact (its tensors do not fit its model: "
                       f"{first_line(exc)})") from None

# -----------------------------------------------------------------------------
# Weight averaging
#
# What gets quantized is an average of the weights along the run, by an averager: observe() after each step,
# average() (the state to load; None keeps the final weights), summary() for the log. SWA (PR #76): a snapshot
# every SWA_INTERVAL steps once the LR scale is below SWA.START_FRAC, summed in fp32. EMA (PR #1204 and later):
# an fp32 shadow <- d * shadow + (1 - d) * weight after every step, from the initial weights.

class FinalWeights:
    def observe(self, model: nn.Module, step: int, lr_scale: float) -> None:
        pass

    def average(self) -> dict[str, Tensor] | None:
        return None

    def summary(self) -> str:
        return "averaging: none, final weights kept"

class SWA:
    START_FRAC = 0.5  # snapshots once the LR scale falls below this (PR #76)

    def __init__(self, interval: int, start_frac: float = START_FRAC):
        self.interval, self.start_frac = interval, start_frac
        self.total: dict[str, Tensor] = {}
        self.count = 0

    @torch.no_grad()
    def observe(self, model: nn.Module, step: int, lr_scale: float) -> None:
        if lr_scale < self.start_frac and step % self.interval == 0:
            for k, v in model.state_dict().items():
                self.total[k] = self.total[k].add_(v.float()) if self.count else v.float().clone()
            self.count += 1

    def average(self) -> dict[str, Tensor] | None:
        return {k: v / self.count for k, v in self.total.items()} if self.count else None

    def summary(self) -> str:
        return f"swa: averaged {self.count} snapshots" if self.count else "swa: no snapshots, final weights kept"

class EMA:
    def __init__(self, decay: float, model: nn.Module):
        self.decay, self.updates = decay, 0
        self.weights = list(model.state_dict().values())  # detached views of the live parameters
        self.shadow = {k: v.float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def observe(self, model: nn.Module, step: int, lr_scale: float) -> None:
        torch._foreach_lerp_(list(self.shadow.values()), [w.float() for w in self.weights], 1.0 - self.decay)
        self.updates += 1

    def average(self) -> dict[str, Tensor]:
        return self.shadow

    def summary(self) -> str:
        """The log line; a WARNING when the run is shorter than the horizon 1 / (1 - decay)."""
        line = f"ema: decay {self.decay!r} over {self.updates} updates"
        if self.updates < 1 / (1 - self.decay):
            line += (f" WARNING: the run is shorter than the average's horizon ({1 / (1 - self.decay):.0f} updates): "
                     f"the initial weights still make up {self.decay ** self.updates:.0%} of what is scored "
                     f"(lower EMA_DECAY for a short run)")
        return line

def make_averager(h: Hyperparameters, model: nn.Module):
    """The run's averaging: EMA_DECAY, else SWA_INTERVAL, else the final weights."""
    if h.ema_decay:
        return EMA(h.ema_decay, model)
    return SWA(h.swa_interval) if h.swa_interval else FinalWeights()

# -----------------------------------------------------------------------------
# Training loop
#
# A step is SLICES_PER_STEP micro-batches (8 / world_size per rank), one optimizer update. The LR
# scale falls linearly to 0 over the warmdown, projected from the mean step time; compilation is
# done in a warm-up before the clock. The loop stops before a step that would cross the cap.

def build_model(h: Hyperparameters, rt: Runtime) -> GPT:
    torch.manual_seed(h.seed)  # the same initial weights on every rank and device
    return GPT(h).to(rt.device)

def compiled_graphs(h: Hyperparameters) -> int:
    """The graphs (dynamo cache entries of GPT.forward) the warm-ups build: per recurrence state, one per
    TRAIN_SEQ_SCHEDULE length and the eval batch; with TTT, ttt_graphs' rows with and without adapters, and one."""
    training = (2 if h.recur_blocks else 1) * (len(seq_schedule(h)) + 1)
    return training + (2 * len(ttt_graphs(h)) + 1 if h.ttt_enabled else 0)

def maybe_compile(h: Hyperparameters, rt: Runtime, model: GPT, backend: str = "inductor") -> nn.Module:
    """The model compiled (where enabled), dynamo's recompile limit (past it a shape runs eagerly, silently)
    above every graph the warm-ups build, so an unplanned graph meets compiled_graphs_only instead."""
    if not compile_enabled(h, rt):
        return model
    config = torch._dynamo.config
    name = "recompile" if hasattr(config, "recompile_limit") else "cache_size"  # torch < 2.7: cache_size_limit
    limit, accumulated = f"{name}_limit", f"accumulated_{name}_limit"
    setattr(config, limit, max(getattr(config, limit), compiled_graphs(h) + 8))
    setattr(config, accumulated, max(getattr(config, accumulated), 2 * getattr(config, limit)))
    return torch.compile(model, dynamic=False, backend=backend)

@contextlib.contextmanager
def compiled_graphs_only(h: Hyperparameters, rt: Runtime, where: str):
    """Inside it torch.compile may build nothing (set_stance fail_on_recompile): every graph the timed
    loop and the scoring use was built in a warm-up. A compilation stops the run with one line."""
    try:
        with torch.compiler.set_stance("fail_on_recompile") if compile_enabled(h, rt) else contextlib.nullcontext():
            yield
    except RuntimeError as exc:
        if not compile_enabled(h, rt) or "recompil" not in str(exc).lower():
            raise
        raise RunError(f"torch.compile compiled {where}; every graph must be built during warm-up "
                       f"({first_line(exc)})") from None

def wrap_model(h: Hyperparameters, rt: Runtime, base_model: GPT, backend: str = "inductor") -> nn.Module:
    """The module the training loop calls: compiled (where enabled), under DDP when distributed (RoPE tables need
    no sync; VIRTUAL_DEPTH / RECUR_UNTIE_MLP's own parameters get no gradient before the switch)."""
    compiled = maybe_compile(h, rt, base_model, backend)
    if not rt.distributed:
        return compiled
    with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; 2.6-2.12 know only that name
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        return DDP(compiled, broadcast_buffers=False, find_unused_parameters=bool(h.virtual_depth or h.recur_untie_mlp))

@dataclasses.dataclass
class Progress:
    """What an interrupt's line says: the step reached, whether training or scoring began, the lab's outputs."""
    step: int = 0
    started: bool = False
    outputs: list = dataclasses.field(default_factory=list)

PROGRESS = Progress()

def run_progress(h: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """How far the run is: the larger of step / ITERATIONS and elapsed time / the loop's cap."""
    cap_ms = 1000 * h.loop_cap_seconds
    return max(step / h.iterations, elapsed_ms / cap_ms if cap_ms else 0.0)

def lr_scale(h: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """1, then linear to 0 at the run's end, never below LR_FLOOR: over its last WARMDOWN_FRAC (PR #1855: 0.85
    of the wallclock), or over its last WARMDOWN_ITERS steps, projected from the mean step time."""
    if h.warmdown_frac:
        return max(min(1.0, (1.0 - run_progress(h, step, elapsed_ms)) / h.warmdown_frac), h.lr_floor)
    if h.warmdown_iters == 0:
        return 1.0
    scale = min(1.0, max(h.iterations - step, 0) / h.warmdown_iters)
    if h.loop_cap_seconds > 0 and step > 0 and elapsed_ms > 0:  # the time left over the warmdown's projected time
        scale = min(scale, max(1000 * h.loop_cap_seconds - elapsed_ms, 0.0) / (h.warmdown_iters * elapsed_ms / step))
    return max(scale, h.lr_floor)

def muon_wd_scale(h: Hyperparameters, progress: float) -> float:
    """Muon's weight decay factor: 1 to MUON_WD_TAPER_FROM of the run, then linear to MUON_WD_TAPER (PR #1729)."""
    ramp = min(max((progress - h.muon_wd_taper_from) / (1.0 - h.muon_wd_taper_from), 0.0), 1.0)
    return 1.0 + (h.muon_wd_taper - 1.0) * ramp

def muon_momentum(h: Hyperparameters, step: int) -> float:
    frac = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * 0.92 + frac * h.muon_momentum

def train_step(h: Hyperparameters, rt: Runtime, model: nn.Module, optimizers, loader: DistributedTokenLoader,
               step: int, scale: float, progress: float = 0.0) -> Tensor:
    """One optimizer step at this fraction of the run (its sequence length, Muon's WD taper); returns
    the step's mean training loss (on the device, not synced)."""
    seq_len, total = seq_len_at(h, progress), torch.zeros((), device=rt.device)  # seq_len parses the schedule: once
    for micro in range(rt.grad_accum_steps):
        inputs, targets = loader.next_batch(h.train_batch_tokens // SLICES_PER_STEP, seq_len)
        syncs = not rt.distributed or micro == rt.grad_accum_steps - 1  # DDP all-reduces on the last only
        with (contextlib.nullcontext() if syncs else model.no_sync()), rt.autocast():
            loss = model(inputs, targets)
        (loss / rt.grad_accum_steps).backward()
        total += loss.detach()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
    optimizers[0].param_groups[0]["momentum"] = muon_momentum(h, step)
    optimizers[0].param_groups[0]["weight_decay"] = h.muon_wd * muon_wd_scale(h, progress)
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total / rt.grad_accum_steps

def mean_over_ranks(rt: Runtime, value: Tensor) -> float:
    if rt.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= rt.world_size
    return value.item()

def warm_up_and_reset(h, rt, base_model, model, optimizers, make_loader, tables) -> float:
    """Builds every compiled graph before the clock: WARMUP_STEPS training steps (split among TRAIN_SEQ_SCHEDULE's
    lengths; again with the recurrence on), an eval batch of training tokens (`tables`: the byte tables), one GPTQ
    calibration batch; then restores weights and optimizer state (the caller rebuilds the loader). Returns ms."""
    if h.warmup_steps == 0:
        return 0.0
    t0 = time.perf_counter()
    initial_model = copy.deepcopy(base_model.state_dict())
    initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    loader = make_loader()
    schedule = seq_schedule(h)
    per_length = -(-h.warmup_steps // len(schedule))  # TRAIN_SEQ_SCHEDULE: every length, ~WARMUP_STEPS in all
    states = (False, True) if base_model.recur_blocks else (False,)
    for recur_active in states:
        if recur_active:
            base_model.start_recurrence()
        for _, start in schedule:
            for step in range(per_length):
                train_step(h, rt, model, optimizers, loader, step, scale=1.0, progress=start)
        stand_in = training_tokens_as_eval_set(loader.stream.take(h.model_eval_seq_len + 1), tables)
        build_eval_graph(h, rt, model_for_eval(model), stand_in)
    if h.gptq_calib_tokens:  # GPTQ's one-time costs (first eager calls, allocations) here, not on the clock
        collect_hessians(base_model, loader, h, rt, batches=1)
    base_model.recur_active = False
    base_model.load_state_dict(initial_model, strict=True)
    for opt, state in zip(optimizers, initial_opts):
        opt.load_state_dict(state)
        opt.zero_grad(set_to_none=True)
    rt.sync()
    elapsed = 1000 * (time.perf_counter() - t0)
    gptq = ", one GPTQ calibration batch" if h.gptq_calib_tokens else ""
    rt.log(f"warmup: {len(states) * per_length * len(schedule)} steps and {len(states)} eval batches{gptq} "
           f"({len(states)} recurrence states; training tokens) in {elapsed:.0f}ms; "
           f"weights, optimizers and data reset")
    return elapsed

def first_nonfinite(first: Tensor, loss: Tensor, step: int) -> Tensor:
    """`first` (step, loss) of the first non-finite training loss (step 0: none yet) with `loss` folded in, on
    the device: the divergence check costs no host sync of its own; agreed_clock reads it."""
    new = torch.stack([torch.full_like(loss, step), loss.float()])
    return torch.where(~torch.isfinite(loss) & (first[0] == 0), new, first)

def agreed_clock(rt: Runtime, clock_ms: float, first: Tensor, step: int) -> float:
    """The slowest rank's clock (ms), by one all-reduce MAX over (clock, -the first step at which a rank's loss
    was not finite); a RunError if there is such a step (first_nonfinite's `first`)."""
    bad = torch.where(first[0] == 0, math.inf, first[0].double())
    both = torch.stack((torch.tensor(clock_ms, dtype=torch.float64, device=bad.device), -bad.double()))
    if rt.distributed:
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    clock, negative_step = both.tolist()
    if math.isfinite(negative_step):
        here_step, here_loss = first.tolist()
        value = here_loss if here_step == -negative_step else "not finite (on another rank)"
        raise RunError(f"train_loss is {value} at step {-negative_step:.0f} (found at step {step}): the run "
                       f"diverged (try a lower MATRIX_LR / SCALAR_LR / TIED_EMBED_LR); nothing was written")
    return clock

def model_for_eval(model: nn.Module) -> nn.Module:
    """The compiled module under DDP: evaluation needs no gradient synchronization."""
    return model.module if isinstance(model, DDP) else model

CLOCK_CHECK_STEPS = 8  # the most steps between two readings of the device-synced clock

def first_step_at_fraction(frac: float, iterations: int) -> int:
    """The first step s with s / iterations >= frac (the step-based progress the loop compares)."""
    s = max(math.ceil(frac * iterations) - 1, 0)  # never past the answer: the product is off by an ulp at most
    while s / iterations < frac:
        s += 1
    return s

def next_clock_check(h: Hyperparameters, step: int, elapsed_ms: float, cap_ms: float, recur_pending: bool) -> int:
    """The step after which the loop next syncs and agrees on the clock: at most CLOCK_CHECK_STEPS ahead,
    and half the steps estimated to remain before the cap or the recurrence switch, so it lands on them."""
    step_ms = elapsed_ms / step
    gap = float(CLOCK_CHECK_STEPS)
    if cap_ms:
        gap = min(gap, ((cap_ms - elapsed_ms) / step_ms - 1) / 2)
    if recur_pending:
        gap = min(gap, first_step_at_fraction(h.recur_start_frac, h.iterations) - step)
        if cap_ms:
            gap = min(gap, (h.recur_start_frac * cap_ms - elapsed_ms) / step_ms / 2)
    return step + max(int(gap), 1)

def log_progress(h: Hyperparameters, rt: Runtime, step: int, train_loss: float, elapsed_ms: float, cap_ms: float,
                 scale: float) -> None:
    step_ms = elapsed_ms / step
    eta_s = min(h.iterations - step, (cap_ms - elapsed_ms) / step_ms if cap_ms else math.inf) * step_ms / 1000
    rt.log(f"step:{step}/{h.iterations} train_loss:{train_loss:.4f} train_time:{elapsed_ms:.0f}ms "
           f"step_avg:{step_ms:.2f}ms eta:{max(eta_s, 0):.0f}s lr_scale:{scale:.4f}")

def train(h, rt, base_model, model, optimizers, loader, val, averagers) -> tuple[int, float]:
    """The timed loop, `averagers` observing every step; returns (steps, training ms). The clock is read (synced, the
    slowest rank's) only at check and log steps, so all ranks stop, switch and schedule alike; else extrapolated."""
    nonfinite, cap_ms = torch.zeros(2, device=rt.device), 1000 * h.loop_cap_seconds  # (step, loss): none yet
    step, train_ms, agreed_ms, agreed_step, check_at = 0, 0.0, 0.0, 0, 1  # agreed: the last clock check's reading
    seq_len = seq_len_at(h, 0.0)
    if base_model.recur_blocks and h.recur_start_frac == 0:
        base_model.start_recurrence()
    rt.sync()
    t0 = time.perf_counter()
    while step < h.iterations:
        elapsed_ms = agreed_ms + (step - agreed_step) * (agreed_ms / agreed_step if agreed_step else 0.0)
        scale, progress = lr_scale(h, step, elapsed_ms), run_progress(h, step, elapsed_ms)
        if h.train_seq_schedule and seq_len_at(h, progress) != seq_len:
            seq_len = seq_len_at(h, progress)  # host arithmetic on the agreed clock: the same step on every rank
            rt.log(f"train_seq_len:{seq_len} from step {step + 1}")
        loss = train_step(h, rt, model, optimizers, loader, step, scale, progress)
        step = PROGRESS.step = step + 1
        for averager in averagers:
            averager.observe(base_model, step, scale)
        nonfinite = first_nonfinite(nonfinite, loss, step)
        last = step == h.iterations
        validate_now = bool(h.val_loss_every) and step % h.val_loss_every == 0
        if not (step == check_at or last or validate_now or step % h.train_log_every == 0):
            continue
        rt.sync()
        agreed_ms = agreed_clock(rt, train_ms + 1000 * (time.perf_counter() - t0), nonfinite, step)
        elapsed_ms, agreed_step = agreed_ms, step
        reached_cap = cap_ms > 0 and elapsed_ms + elapsed_ms / step > cap_ms  # would the next step cross it?
        if base_model.recur_blocks and not base_model.recur_active and \
                run_progress(h, step, elapsed_ms) >= h.recur_start_frac:
            base_model.start_recurrence()  # its compiled graph was built during warm-up
            times = "twice" if h.recur_repeats == 1 else f"{h.recur_repeats + 1} times"
            rt.log(f"recurrence: blocks {h.recur_blocks} run {times} from step {step + 1}")
        recur_pending = bool(base_model.recur_blocks) and not base_model.recur_active
        check_at = next_clock_check(h, step, elapsed_ms, cap_ms, recur_pending)
        last = last or reached_cap
        if step % h.train_log_every == 0 or last:  # the loss is finite: the divergence check ran at this step
            log_progress(h, rt, step, mean_over_ranks(rt, loss), elapsed_ms, cap_ms, scale)
        if validate_now and not last:
            train_ms += 1000 * (time.perf_counter() - t0)  # the clock stops while we validate
            val_loss, val_bpb = evaluate(model_for_eval(model), val, h.model_eval_seq_len, h.model_eval_seq_len,
                                         h.val_batch_size, rt)
            rt.log(f"step:{step}/{h.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f}")
            rt.sync()
            t0 = time.perf_counter()
        if reached_cap:
            rt.log(f"stopping_early: wallclock_cap train_time:{elapsed_ms:.0f}ms step:{step}/{h.iterations}")
            break
    rt.sync()
    return step, train_ms + 1000 * (time.perf_counter() - t0)

def train_weights(h: Hyperparameters, rt: Runtime, base_model: GPT, make_loader, val: ValidationSet,
                  also=()) -> tuple[nn.Module, DistributedTokenLoader, int, float, list]:
    """Warm-up, then the timed loop. Returns (the module trained, the loader where training left it, steps, training
    ms, averagers: the run's own, then one per function of the model in `also`). bench/lab.py replaces it."""
    optimizers = build_optimizers(h, rt, base_model)
    model = wrap_model(h, rt, base_model)
    warm_up_and_reset(h, rt, base_model, model, optimizers, make_loader, val.tables)
    loader = make_loader()
    averagers = [make_averager(h, base_model)] + [make(base_model) for make in also]
    with compiled_graphs_only(h, rt, "inside the timed loop (WARMUP_STEPS >= 1 builds them)"):
        steps, train_ms = train(h, rt, base_model, model, optimizers, loader, val, averagers)
    return model, loader, steps, train_ms, averagers

def train_model(h: Hyperparameters, rt: Runtime, val: ValidationSet) -> tuple[GPT, nn.Module, dict | None]:
    """Builds, trains and averages the model, then calibrates GPTQ. Returns the model, the module to evaluate
    it with (compiled where enabled) and the Hessians (None without GPTQ)."""
    train_files = find_shards(h, "train")
    log_train_budget(h, rt, train_files)
    check_leak(h, rt, train_files, val)
    base_model = build_model(h, rt)
    rt.log(f"model_params:{sum(p.numel() for p in base_model.parameters())} compile:{compile_enabled(h, rt)}")

    def make_loader():
        return DistributedTokenLoader(train_files, h.vocab_size, rt, lambda: rt.log(
            f"WARNING: the training stream wrapped: all {len(train_files)} train shards are used up, "
            f"training repeats them from the first"))

    PROGRESS.started = True
    model, loader, steps, train_ms, averagers = train_weights(h, rt, base_model, make_loader, val)
    average = averagers[0].average()
    if average is not None:
        base_model.load_state_dict(average, strict=True)
    rt.log(averagers[0].summary())
    hessians, calib_ms = calibrate(h, rt, base_model, loader)
    train_ms += calib_ms
    rt.log(f"train_done steps:{steps} train_time_ms:{train_ms:.0f}")
    if h.max_wallclock_seconds and train_ms > 1000 * h.max_wallclock_seconds:
        rt.log(f"WARNING: training took {train_ms / 1000:.1f}s, over MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds}")
    if rt.device.type == "cuda":
        rt.log(f"peak_memory_allocated_mib:{torch.cuda.max_memory_allocated() // 2**20} "
               f"peak_memory_reserved_mib:{torch.cuda.max_memory_reserved() // 2**20}")
    return base_model, model_for_eval(model), hessians

# -----------------------------------------------------------------------------
# Main

def init_runtime() -> Runtime:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    world_size, rank, local_rank = (parse_env_value(name, os.environ.get(name, default), int)
                                    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))
    if world_size not in (1, 2, 4, 8):
        raise RunError(f"WORLD_SIZE={world_size}: must divide {SLICES_PER_STEP} (1, 2, 4 or 8 processes)")
    if not (0 <= rank < world_size and 0 <= local_rank < world_size):
        raise RunError(f"RANK={rank}, LOCAL_RANK={local_rank}: expected 0..WORLD_SIZE-1={world_size - 1}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Runtime(rank=rank, world_size=world_size, device=device, distributed=world_size > 1, bf16=cuda)

@dataclasses.dataclass
class Logger:
    """Rank 0 writes every line to logs/<RUN_ID>.txt (created by claim_outputs) and, unless told
    otherwise, to stdout. A line that cannot be written stops the run (the error goes to stderr)."""
    path: Path | None

    def __call__(self, message: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(message, flush=True)
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(message + "\n")
        except OSError as exc:
            path, self.path = self.path, None  # the error line itself cannot go there either
            raise RunError(f"{path}: cannot write the log ({exc.strerror or exc})") from None

# A finished run is never lost: before anything runs, rank 0 checks the output folders for room, refuses
# an existing ARTIFACT_PATH and claims logs/<RUN_ID>.txt (else <RUN_ID>_2, ...); files are written whole.
LOG_ROOM_BYTES = 1 << 20  # a log holds this file's source and a line per TRAIN_LOG_EVERY steps

def check_room(folder: Path, need: int, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        probe.write_bytes(b"")
        probe.unlink()
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise RunError(f"{what}: cannot write into {folder} ({exc.strerror or exc})") from None
    if free < need:
        raise RunError(f"{what}: {folder} has {free} bytes free, less than the {need} its output may need")

def check_new_output(name: str, value: str, need: int) -> None:
    """An output path (the setting `name`) that no file holds yet, in a folder with `need` bytes free."""
    if Path(value).exists() or Path(value).is_symlink():
        raise RunError(f"{name}={value} already exists; a run never replaces an earlier output: move it "
                       f"away or choose another path")
    check_room(Path(value).absolute().parent, need, name)

def claim_files(h: Hyperparameters) -> tuple[str, Path, Path, str]:
    """(run id, log path, artifact path, a note if the run id changed) on rank 0; the log is created."""
    logs = SCRIPT_DIR / "logs"
    check_room(logs, LOG_ROOM_BYTES, "the log folder")
    if h.artifact_path and not h.eval_only:
        check_new_output("ARTIFACT_PATH", h.artifact_path, h.artifact_limit_bytes)
    if not (h.eval_only or h.artifact_path):
        check_room(logs, h.artifact_limit_bytes, "ARTIFACT_PATH (logs/<RUN_ID>.ptz)")
    wanted = h.run_id or f"{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
    for n in range(1, 1000):
        run_id = wanted if n == 1 else f"{wanted}_{n}"
        log_path, artifact = logs / f"{run_id}.txt", Path(h.eval_only or h.artifact_path or logs / f"{run_id}.ptz")
        if artifact.exists() and not (h.eval_only or h.artifact_path):
            continue
        try:
            log_path.open("x").close()  # check_room has just written a file there
        except FileExistsError:
            continue
        except OSError as exc:  # a full disk or a permission change since check_room
            raise RunError(f"{log_path}: cannot create the log ({exc.strerror or exc})") from None
        note = "" if n == 1 else (f"outputs: logs/{wanted}.txt or .ptz exists (an earlier run's); this run is "
                                  f"RUN_ID={run_id}, so nothing is replaced")
        return run_id, log_path, artifact, note
    raise RunError(f"RUN_ID={wanted}: logs/{wanted}.txt and 998 numbered successors exist; choose another RUN_ID")

def claim_outputs(h: Hyperparameters, rt: Runtime) -> tuple[str, Path, Path, str]:
    """claim_files on rank 0, shared with every rank (its error too, so all ranks stop together)."""
    try:
        claimed = [claim_files(h) if rt.is_main else None]
    except RunError as exc:
        claimed = [str(exc)]
    if rt.distributed:
        dist.broadcast_object_list(claimed, src=0)
    if isinstance(claimed[0], str):
        raise RunError(claimed[0])
    return claimed[0]

def log_header(h: Hyperparameters, rt: Runtime, preset: str, run_id: str, code: bytes, shipped: bytes) -> None:
    """The run's identity, its readable source, and `code:`, the shipped form's size (code_bytes) and sha256."""
    source = readable_source(code)
    rt.log(f"run_id:{run_id} start_utc:{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    rt.log(f"====== source {Path(__file__).name} ({len(source.encode('utf-8'))} bytes) ======", console=False)
    rt.log(source, console=False)
    rt.log("====== end source ======", console=False)
    rt.log(f"code: shipped_bytes:{len(shipped)} shipped_sha256:{hashlib.sha256(shipped).hexdigest()} "
           f"source_bytes:{len(source.encode('utf-8'))} (the self-extracting form that ships and counts)")
    for field in dataclasses.fields(h):
        rt.log(f"hparam {field.name.upper()}={getattr(h, field.name)}", console=False)
    rt.log(f"versions python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
           f"sentencepiece:{spm.__version__} zstandard:{zstandard.__version__}")
    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor() or "cpu"
    rt.log(f"device:{device_name.replace(' ', '_')} world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum_steps} "
           f"seed:{h.seed} preset:{preset} scale:{h.scale}")
    if preset == "smoke":
        rt.log("preset smoke (PRESET=smoke, or auto without CUDA): the tiny CPU configuration on the bundled "
               "sample; this is a pre-flight check, not a record")

def configure(rt: Runtime) -> tuple[Hyperparameters, str, Runtime]:
    """The config from the environment, and what it implies for the runtime (bf16 autocast, TF32)."""
    h, preset = hyperparameters_from_env(dict(os.environ), torch.cuda.is_available())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    select_sdpa_kernels(h.attn_backend)
    return h, preset, dataclasses.replace(rt, bf16=rt.device.type == "cuda" or h.cpu_autocast)

def set_aside_if_not_started(log: Logger) -> None:
    """A run that stopped before it trained or scored: its log becomes logs/<RUN_ID>.stopped.txt (replacing
    an earlier one) without the copy of the source, so that no tool takes it for a run's log."""
    if PROGRESS.started or log.path is None:
        return
    text = log.path.read_text(encoding="utf-8")
    log.path.with_suffix(".stopped.txt").write_text(
        re.sub(r"(?ms)^====== source .*?^====== end source ======\n", "", text, count=1), encoding="utf-8")
    log.path.unlink()

def train_write_score(h: Hyperparameters, preset: str, rt: Runtime, run_id: str, artifact_path: Path) -> None:
    t_start = time.perf_counter()
    packages = {"brotli": ["brotli"], "ans": ["brotli", "constriction"]}.get(h.compressor, [])
    for package in [] if h.eval_only else packages:  # a missing one stops the run here, not after training
        brotli_module(package)
    if h.eval_only:
        config, state = load_artifact(Path(h.eval_only), h.artifact_limit_bytes)
        h = dataclasses.replace(h, **config)  # the artifact decides the model's shape
        try:
            validate(h)
        except RunError as exc:
            raise RunError(f"{h.eval_only}: its model does not fit this run's settings (PRESET={preset}: {exc}); "
                           f"score it with the PRESET and settings it was trained with") from None
    code = Path(__file__).read_bytes()  # read once: the logged source is the one whose shipped form counts
    shipped = shipped_form(code)
    log_header(h, rt, preset, run_id, code, shipped)
    check_pinned_kernel(h, rt)
    rt.log(f"attention_backend:{attention_kernel_report(h, rt)}")
    val = load_validation(h, load_tokenizer(h), rt)
    rt.log(eval_plan(h, val.num_targets, len(document_starts(val.tokens.cpu().numpy()))))

    if h.eval_only:
        rt.log(f"eval_only: scoring {artifact_path}; nothing is trained")
        base_model = build_model(h, rt)
        load_weights(base_model, state, artifact_path)
        base_model.recur_active = bool(base_model.recur_blocks)  # the artifact names them only if they ran
        eval_model = maybe_compile(h, rt, base_model)  # evaluation needs no DDP
        PROGRESS.started = True
        # Compilation on random tokens (no validation token is read before it is scored): not evaluation time.
        t_start += build_eval_graph(h, rt, eval_model, random_eval_set(h, val.tables))
        if h.ttt_enabled:
            t_start += warm_up_ttt(h, rt, base_model, eval_model)
        log_artifact_bytes(h, rt, artifact_path, len(shipped), None)
    else:
        base_model, eval_model, hessians = train_model(h, rt, val)
        with compiled_graphs_only(h, rt, "in the pre-quantization evaluation"):
            val_loss, val_bpb = evaluate(eval_model, val, h.model_eval_seq_len, h.model_eval_seq_len,
                                         h.val_batch_size, rt)
        rt.log(f"pre_quant val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
        write_artifact(h, rt, base_model, artifact_path, len(shipped), hessians)
        if h.ttt_enabled:
            warm_up_ttt(h, rt, base_model, eval_model)
        t_start = time.perf_counter()  # evaluation starts from the artifact on disk
        _, state = load_artifact(artifact_path, h.artifact_limit_bytes)
        load_weights(base_model, state, artifact_path)
    with compiled_graphs_only(h, rt, "while scoring"):
        score_artifact(h, rt, eval_model, val)
        if h.ttt_enabled:
            evaluate_documents(h, rt, base_model, eval_model, val, deadline=t_start + h.eval_budget_seconds)
    rt.log(f"eval_done eval_time_ms:{1000 * (time.perf_counter() - t_start):.0f}")
    rt.log(f"artifact_path:{artifact_path}")

def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler, kill, a launcher passing one on) ends the run as Ctrl-C does

def main() -> int:
    """Trains, writes and scores (or, with EVAL_ONLY, scores). Exits 0; 1 after a RunError, 130 after Ctrl-C or
    SIGTERM, the log ending with one line (an interrupt's says where the run was and what it wrote), then
    set_aside_if_not_started."""
    sigterm, log = signal.signal(signal.SIGTERM, interrupt), None
    try:
        h, preset, rt = configure(init_runtime())
        run_id, log_path, artifact_path, note = claim_outputs(h, rt)
        t_start, PROGRESS.step, PROGRESS.started = time.perf_counter(), 0, False  # an interrupt reads it
        log = Logger(log_path if rt.is_main else None)
        rt = dataclasses.replace(rt, log=log)
        if note:
            log(note)
        train_write_score(h, preset, rt, run_id, artifact_path)
        if rt.distributed:
            dist.barrier()  # no rank tears its connections down while another still reads from them
        return 0
    except RunError as exc:
        if log is not None:
            log(f"error: {exc}", console=False)
            set_aside_if_not_started(log)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if log is None:
            print("interrupted before the run began; nothing written", file=sys.stderr, flush=True)
            return 130  # 128 + SIGINT, as a shell reports a Ctrl-C
        written = [str(path) for path in PROGRESS.outputs + ([] if h.eval_only else [artifact_path]) if path.exists()]
        kept = log_path if PROGRESS.started else log_path.with_suffix(".stopped.txt")
        log(f"interrupted at step {PROGRESS.step} after {time.perf_counter() - t_start:.1f} s; wrote "
            f"{', '.join(written) + ' and' if written else 'nothing but'} this log ({kept})")
        set_aside_if_not_started(log)
        return 130
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        if dist.is_initialized():  # only init_runtime starts a process group
            dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
