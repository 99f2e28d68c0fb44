# The golden table (issue 23): python3 tests/golden.py [--write]   (checks, or rewrites tests/golden.json)
"""Every preset at one toy size, run on CPU with a fixed seed: the figures a change of shape must not
move. `golden.json` holds, per preset, the train_loss of every step, every val_loss/val_bpb line
(pre_quant and final_*), the model bytes (artifact less code) and the full-size parameter count.

The shrink is SCALE=toy, the same for every preset (width 128, 4 heads, 2 KV heads, sequences of 128,
2 sequences per micro-batch, GPTQ on one step of tokens or 4 self-sampled sequences, TTT on 4 documents
at rank 4), run on the bundled sample and its 1,024-piece tokenizer for 8 steps on the first 8,192
validation targets; a setting the preset turns on is kept on at toy size (warmdown 3 steps, one TTT phase
after 4 documents). Depth, recurrence, lanes, quantization classes and compressors stay the preset's own.
Run from the command line it runs the presets side by side, one thread each."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402

GOLDEN = Path(__file__).with_name("golden.json")
PRESETS = ("pr76", "pr236", "pr192", "pr1204", "frontier", "sp8192", "smoke")
FIXTURES = REPO / "tests" / "fixtures"
# SCALE=toy shrinks every preset (train_gpt.py's TOY); the golden run is shorter, on the sample, and keeps the
# preset's own momentum warm-up, averaging and (without TTT) TTT sizes, where SCALE=toy scales them to its run
TOY = {"DATA_PATH": str(FIXTURES / "sample"), "TOKENIZER_PATH": str(FIXTURES / "sample_1024_bpe.model"),
       "VOCAB_SIZE": "1024", "SCALE": "toy", "ITERATIONS": "8", "TRAIN_LOG_EVERY": "1", "VAL_TOKENS": "8192",
       "SEED": "1", "COMPILE": "0"}
KEPT = ("muon_momentum_warmup_steps", "swa_interval", "ema_decay")
TTT_SIZES = ("ttt_batch_docs", "ttt_lora_rank", "ttt_phases")


def toy_env(preset: str) -> dict[str, str]:
    """PRESET=preset SCALE=toy, run as TOY says: 8 steps, warmdown 3 steps, one TTT phase after 4 documents."""
    full = tg.hyperparameters_from_env({"PRESET": preset}, cuda_available=False)[0]
    kept = KEPT + (() if full.ttt_enabled else TTT_SIZES)
    env = {"PRESET": preset, **TOY, **{name.upper(): str(getattr(full, name)) for name in kept}}
    if full.warmdown_iters:
        env["WARMDOWN_ITERS"] = "3"
    if full.ttt_enabled:
        env["TTT_PHASES"] = "4"
    return env


def full_size_params(preset: str) -> int:
    h = tg.hyperparameters_from_env({"PRESET": preset}, cuda_available=True)[0]
    with tg.torch.device("meta"):
        model = tg.GPT(h)
    return sum(p.numel() for p in model.parameters())


def figures(log: str) -> dict:
    """The golden figures of one run's log (the copy of the source at its start is skipped)."""
    body = re.sub(r"(?ms)^====== source .*?^====== end source ======\n", "", log, count=1)
    return {
        "train_loss": re.findall(r"^step:\d+/\d+ train_loss:(\S+)", body, re.M),
        "scores": [" ".join(m) for m in re.findall(r"^(pre_quant|final_\w+) (val_loss:\S+ val_bpb:\S+)", body, re.M)],
        "model_bytes": int(re.search(r"^artifact_bytes:\d+ code_bytes:\d+ model_bytes:(\d+)", body, re.M)[1]),
    }


def run_preset(preset: str, env_base: dict[str, str]) -> dict:
    """One toy run of `preset` in a scratch folder; its log is read and deleted."""
    from conftest import HANG_FACTOR  # the suite's cap factor for a loaded machine (tests/ is on the path)
    run_id = f"golden_{preset}_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**env_base, **toy_env(preset), "RUN_ID": run_id, "ARTIFACT_PATH": str(Path(tmp) / "a.ptz")}
        proc = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=HANG_FACTOR * 1200)
    log_path = REPO / "logs" / f"{run_id}.txt"
    log = log_path.read_text(encoding="utf-8") if log_path.exists() else ""
    log_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"PRESET={preset} toy run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**figures(log), "full_size_params": full_size_params(preset)}


def main(argv: list[str]) -> int:
    from conftest import clean_env  # the suite's environment: our settings unset, CUDA hidden, one thread
    with ThreadPoolExecutor(len(PRESETS)) as pool:
        table = dict(zip(PRESETS, pool.map(lambda p: run_preset(p, clean_env()), PRESETS)))
    if "--write" in argv:
        GOLDEN.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    golden = json.loads(GOLDEN.read_text())
    bad = [p for p in PRESETS if table[p] != golden[p]]
    for p in bad:
        print(f"{p}: differs\n  golden: {golden[p]}\n  now:    {table[p]}")
    print("golden: all presets equal" if not bad else f"golden: {len(bad)} preset(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main(sys.argv[1:]))
