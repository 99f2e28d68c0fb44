# The GPU check's CPU-testable parts: python3 -m pytest -q tests/test_gpu_check.py
"""Arguments, preset discovery, the equal-token plan, file names the device tool brings back, the
runner's stop-at-first-failure / skip rules (with stand-in commands), and the report writer."""
import importlib.util
import json
import re
import sys
import types
from datetime import datetime
from pathlib import Path

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


def fake_train_gpt(presets: dict[str, int]):
    """A stand-in for train_gpt: PRESETS (name -> TRAIN_BATCH_TOKENS)."""
    module = types.SimpleNamespace(PRESETS={name: {} for name in presets})
    batch = presets
    module.hyperparameters_from_env = lambda env, cuda: (
        types.SimpleNamespace(train_batch_tokens=batch[env["PRESET"]]), env["PRESET"])
    return module


@pytest.mark.parametrize("argv", [["--phases", "smoke,bogus"], ["--phases", ","], ["--speed-steps", "1"],
                                  ["--budget-s", "0"]])
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exit_:
        gc.parse_args(argv)
    assert exit_.value.code == 2


def test_presets_come_from_train_gpt_pr76_first_smoke_skipped():
    tg = fake_train_gpt({"smoke": 4096, "pr236": 524_288, "frontier": 786_432, "pr76": 524_288})
    assert gc.gpu_presets(tg, []) == ["pr76", "pr236", "frontier"]
    assert gc.gpu_presets(tg, ["frontier"]) == ["frontier"]
    with pytest.raises(SystemExit, match="unknown preset pr999"):
        gc.gpu_presets(tg, ["pr999"])


def test_train_runs_see_equal_tokens_and_every_phase_is_planned(tmp_path):
    tg = fake_train_gpt({"pr76": 524_288, "frontier": 786_432, "smoke": 4096})
    args = gc.parse_args(["--out-dir", str(tmp_path), "--train-tokens", str(30 * 524_288)])
    steps = gc.plan_steps(args, tg, "p", tmp_path)
    assert [s["name"] for s in steps] == ["smoke", "speed:pr76", "speed:frontier", "train:pr76", "train:frontier"]
    batch = {"pr76": 524_288, "frontier": 786_432}
    train = [s for s in steps if s["phase"] == "train"]
    trained = {s["env"]["PRESET"]: int(s["env"]["ITERATIONS"]) * batch[s["env"]["PRESET"]] for s in train}
    assert trained == {"pr76": 30 * 524_288, "frontier": 20 * 786_432}
    assert all(s["env"]["MAX_WALLCLOCK_SECONDS"] == "0" and "DATA_PATH" in s["env"] for s in train)
    assert all(Path(s["env"]["ARTIFACT_PATH"]).parent == tmp_path for s in steps if "ARTIFACT_PATH" in s["env"])


def test_file_names_hold_device_torch_and_date_in_safe_characters():
    prefix = gc.file_prefix("NVIDIA H100 80GB HBM3", "2.11.0+cu130", datetime(2026, 11, 24, 19, 5))
    assert prefix == "gpucheck_h100-80gb-hbm3_torch2.11.0-cu130_20261124-1905"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", prefix)


def step(name: str, code: str, **extra) -> dict:
    return dict(name=name, phase="smoke", env={}, cmd=[sys.executable, "-c", code], **extra)


def test_runner_stops_at_the_first_failure_with_one_line(tmp_path, capsys):
    args = gc.parse_args(["--out-dir", str(tmp_path)])
    steps = [step("one", "print('fine')"), step("two", "import sys; print('boom'); sys.exit(3)"), step("three", "")]
    outcome, rows, _ = gc.execute(args, steps, cuda=True, prefix="p")
    assert outcome == "failed at two"
    assert [r["status"] for r in rows] == ["ok", "exit 3"]
    assert "gpu_check: FAILED at two (exit 3 after 0 s): boom" in capsys.readouterr().out


def test_runner_skips_gpu_steps_without_cuda_and_steps_past_the_budget(tmp_path):
    args = gc.parse_args(["--out-dir", str(tmp_path), "--budget-s", "30", "--min-phase-s", "60"])
    outcome, rows, _ = gc.execute(args, [step("gpu", "", needs_cuda=True), step("late", "")], cuda=False, prefix="p")
    assert outcome == "passed"
    assert [r["status"] for r in rows] == ["skipped: no CUDA", "skipped: 30 s of the budget left"]


def test_a_step_past_its_time_is_a_timeout(tmp_path):
    args = gc.parse_args(["--out-dir", str(tmp_path), "--budget-s", "1.5", "--min-phase-s", "0"])
    outcome, rows, _ = gc.execute(args, [step("slow", "import time; time.sleep(30)")], cuda=True, prefix="p")
    assert outcome == "failed at slow" and rows[0]["status"] == "timeout"


def test_figures_are_read_from_a_train_log_and_written_to_the_summary(tmp_path):
    log = "\n".join([
        "run_id:x", "====== source train_gpt.py (9 bytes) ======", 'log(f"attention_backend:{name}")',
        '    log("====== end source ======")', '    log(f"WARNING: {message}")',
        "====== end source ======",
        "attention_backend:flash", "warmup: 3 steps and one eval batch (training tokens) in 61234ms; weights reset",
        "step:20/20 train_loss:5.1 train_time:9000ms step_avg:450.00ms eta:0s lr_scale:0.0",
        "train_done steps:20 train_time_ms:9100", "pre_quant val_loss:3.1 val_bpb:1.9000",
        "quantize+compress: 31000ms", "artifact_bytes:17000000 code_bytes:70000 model_bytes:16930000 limit:64000000",
        "final_roundtrip val_loss:3.2 val_bpb:1.9100 seq_len:1024 stride:1024 eval_time_ms:900",
        "final_sliding val_loss:3.1 val_bpb:1.8800 seq_len:1024 stride:256 eval_time_ms:4000"])
    figures = gc.figures_from_log(log)
    assert figures["attention_backend"] == "flash" and figures["warmup_ms"] == "61234" and "warning" not in figures
    assert figures["steps"] == "20" and figures["quantize_ms"] == "31000" and figures["artifact_bytes"] == "17000000"
    assert (figures["pre_quant_val_bpb"], figures["final_roundtrip_val_bpb"], figures["final_sliding_val_bpb"]) == \
        ("1.9000", "1.9100", "1.8800")
    header = {"device": "H100", "torch": "2.11", "date": "today", "budget_s": 540, "used_s": 100, "outcome": "passed"}
    path = gc.write_summary(tmp_path, "p", header, [{"name": "train:pr76", "status": "ok", "seconds": 99,
                                                      "figures": figures}])
    assert "| train:pr76 | ok | 99 | " in path.read_text() and "final_sliding_val_bpb 1.8800" in path.read_text()
    assert json.loads((tmp_path / "p_summary.json").read_text())["phases"][0]["figures"] == figures


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    assert gc.main(["--dry-run", "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("smoke: PRESET=smoke") and "bench/speed.py" in out and "ITERATIONS=" in out
    assert not (tmp_path / "out").exists()
