# Shared fixtures and helpers for the suite: python3 -m pytest -q tests
"""Everything here runs on CPU from the files bundled in tests/fixtures; nothing outside the repository
is read. Helpers: tiny configurations and models, a CPU Runtime, shard writing, an independent byte
count of a token stream (decode each document, count UTF-8 bytes), a brute-force window scorer, and a
fixture that runs train_gpt.py as a subprocess and cleans up the log files it writes."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402  (importing it has no side effects; test_end_to_end checks that)

SCRIPT = REPO / "train_gpt.py"
FIXTURES = REPO / "tests" / "fixtures"
SAMPLE = FIXTURES / "sample"
TOKENIZER = FIXTURES / "sample_1024_bpe.model"
TEXT = FIXTURES / "text"
VAL_SHARD = SAMPLE / "fineweb_val_000000.bin"
CPU = torch.device("cpu")
# The in-process models are tiny: one thread is faster than several (thread start-up dominates, and
# on a busy machine spinning OpenMP workers slow every op by 10-50x) and keeps float sums in one order.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds (still part of the default run)")


# ----------------------------------------------------------------------------- configuration and models


def tiny_hparams(**overrides) -> tg.Hyperparameters:
    """A 2-layer, 32-dim model on the bundled sample; any field can be overridden."""
    base = dataclasses.replace(
        tg.Hyperparameters(), data_path=str(SAMPLE), tokenizer_path=str(TOKENIZER), seed=0,
        num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2,
        bigram_vocab_size=64, bigram_dim=8, train_seq_len=64, train_batch_tokens=8 * 64 * 2,
        val_batch_size=4096, eval_stride=16, iterations=4, warmup_steps=0, warmdown_iters=2,
        train_log_every=1, swa_interval=0, muon_momentum_warmup_steps=2,
    )
    h = dataclasses.replace(base, **overrides)
    tg.validate(h)
    return h


def tiny_model(h: tg.Hyperparameters | None = None, seed: int = 0, randomize: bool = True) -> tg.GPT:
    """A GPT with the given config. randomize=True adds noise to every parameter, so that the parts
    initialised at zero (output projections, bigram table) really carry information; a leak through
    them would otherwise be invisible."""
    h = h or tiny_hparams()
    torch.manual_seed(seed)
    model = tg.GPT(h)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model


def assert_causal_and_fully_trained(model: tg.GPT, vocab: int = 1024, length: int = 24) -> None:
    """Changing token k changes no logit before k and some at k; one backward pass reaches every parameter."""
    x = torch.randint(4, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    k = 11
    y = x.clone()
    y[:, k] = (x[:, k] + 17 - 4) % (vocab - 4) + 4
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=1e-6)
    assert (a[:, k] - b[:, k]).abs().max() > 1e-4
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss).item()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == [], f"parameters without gradient: {dead}"


def cpu_runtime(log=tg.no_log) -> tg.Runtime:
    return tg.Runtime(rank=0, world_size=1, device=CPU, distributed=False, log=log)


# ----------------------------------------------------------------------------- data


def write_shard(path: Path, tokens, magic: int = 20240520, version: int = 1, count: int | None = None) -> Path:
    """A shard in the challenge's format (256 little-endian int32 header, then uint16 tokens); the
    header fields can be falsified to make bad inputs."""
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    path.write_bytes(header.tobytes() + tokens.tobytes())
    return path


def read_tokens(path: Path) -> np.ndarray:
    """The tokens of a shard, read without train_gpt's loader."""
    return np.fromfile(path, dtype="<u2", offset=256 * 4).astype(np.int64)


def documents(tokens) -> list[list[int]]:
    """The documents of a token stream that starts with BOS, split at BOS (BOS itself dropped)."""
    tokens = [int(t) for t in tokens]
    assert tokens and tokens[0] == tg.BOS_ID, "a token stream must start with BOS"
    docs = []
    for t in tokens:
        if t == tg.BOS_ID:
            docs.append([])
        else:
            docs[-1].append(t)
    return docs


def decoded_utf8_bytes(sp: spm.SentencePieceProcessor, tokens) -> int:
    """The challenge's reference denominator: UTF-8 length of every decoded document."""
    return sum(len(sp.decode(doc).encode("utf-8")) for doc in documents(tokens))


@pytest.fixture(scope="session")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.fixture(scope="session")
def val_tokens() -> np.ndarray:
    return read_tokens(VAL_SHARD)


@pytest.fixture(scope="session")
def val_utf8_bytes(sp, val_tokens) -> int:
    return decoded_utf8_bytes(sp, val_tokens)


# ----------------------------------------------------------------------------- evaluation reference


@torch.no_grad()
def reference_loss_sum(model, tokens: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """Brute force, one window at a time, no padding: windows start at 0, stride, 2*stride, ...,
    are at most seq_len long, and each scores the targets no earlier window scored. Returns
    (sum of per-target losses in nats, number of targets scored)."""
    num_targets = len(tokens) - 1
    total, scored_upto, start = 0.0, 0, 0
    while scored_upto < num_targets:
        end = min(start + seq_len, num_targets)
        losses = model(tokens[None, start:end], tokens[None, start + 1:end + 1], reduction="none")[0]
        total += losses[scored_upto - start:].double().sum().item()
        scored_upto, start = end, start + stride
    return total, scored_upto


# ----------------------------------------------------------------------------- running the script


@dataclasses.dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str
    log: str  # logs/<RUN_ID>.txt, "" if the run wrote none
    artifact: Path  # ARTIFACT_PATH given to the run
    env: dict[str, str]  # the environment the script saw

    def explain(self) -> str:
        """For assertion messages: the exit status, stderr lines that look like errors, and the tail."""
        errors = [line for line in self.stderr.splitlines()
                  if re.search(r"error|what\(\)|terminate|exception", line, re.I)]
        log_tail = "\n".join(self.body.splitlines()[-8:])
        return f"exit {self.returncode}; error lines:\n" + "\n".join(errors[:20]) + \
            f"\n--- log tail (how far the run got):\n{log_tail}\n--- stdout tail:\n{self.stdout[-1000:]}" + \
            f"\n--- stderr tail:\n{self.stderr[-2000:]}"

    @property
    def body(self) -> str:
        """The log without the copy of the source it starts with (whose text would match any search)."""
        return re.sub(r"(?ms)^====== source .*?^====== end source ======\n", "", self.log, count=1)


# A time cap only catches a hang: on a shared 2-core machine under load a run took 4-10x its unloaded time
# (issue 24, item 9), so every cap is HANG_FACTOR times the unloaded time it was written for.
HANG_FACTOR = 4


def clean_env() -> dict[str, str]:
    """os.environ without our knobs or torchrun's variables, and with CUDA hidden (CPU-only suite)."""
    torchrun = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID"}
    env = {k: v for k, v in os.environ.items() if k not in torchrun and tg.resembled_setting(k) is None}
    env["CUDA_VISIBLE_DEVICES"] = ""
    # One thread per process: same results, and on a loaded machine 2 spinning OpenMP threads per
    # process made the smoke run 6x slower (122 s instead of 20 s). torchrun's workers default to 1.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def run_script(tmp_path):
    """run_script(env, nproc=1) runs train_gpt.py (or `script`, a wrapper that imports it; under
    torch.distributed.run when nproc > 1) from
    an empty working directory, with RUN_ID=pytest_... (unless env sets one) and ARTIFACT_PATH in
    tmp_path; the log (of the run id the run really took) and any artifact under <repo>/logs are
    deleted afterwards."""
    leftovers = []

    def run(env: dict[str, str] | None = None, nproc: int = 1, timeout: float = 300, script: Path = SCRIPT) -> ScriptRun:
        run_id = (env or {}).get("RUN_ID") or f"pytest_{uuid.uuid4().hex[:10]}"
        cwd = tmp_path / f"cwd_{uuid.uuid4().hex[:10]}"
        cwd.mkdir()
        full_env = {**clean_env(), "RUN_ID": run_id, "ARTIFACT_PATH": str(tmp_path / f"{run_id}.ptz"),
                    **(env or {})}
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        proc = subprocess.run(launcher + [str(script)], cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=HANG_FACTOR * timeout)
        taken = re.search(r"^run_id:(\S+)", proc.stdout, re.M)  # a taken RUN_ID becomes RUN_ID_2, ...
        log_path = REPO / "logs" / f"{taken[1] if taken else run_id}.txt"
        leftovers.extend([log_path, log_path.with_suffix(".ptz")])
        log = log_path.read_text(encoding="utf-8") if log_path.exists() else ""
        return ScriptRun(proc.returncode, proc.stdout, proc.stderr, log, Path(full_env["ARTIFACT_PATH"]), full_env)

    yield run
    for path in leftovers:
        path.unlink(missing_ok=True)


def assert_one_line_error(run: ScriptRun, *must_mention: str) -> str:
    """Exit status 1, and stderr is exactly one line 'error: ...' naming each of `must_mention`."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1, f"exit status {run.returncode}, expected 1; stderr:\n{run.stderr}"
    assert "Traceback" not in run.stderr, f"a traceback instead of a one-line error:\n{run.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one 'error:' line:\n{run.stderr}"
    for word in must_mention:
        assert word in lines[0], f"the error does not mention {word!r}: {lines[0]}"
    return lines[0]

