# The device call's CPU-testable parts: python3 -m pytest -q tests/test_gpu_check.py
"""bench/gpu_check.py: the plan (presets from train_gpt's PRESETS in the issue's order, the recurrence
timed off then on, the one-GPU environment), caps from the time left with the minimum of later steps
kept, a failed or timed-out step not stopping the rest, results written to the output folder after
every step, the dry run's plan and total, the carried shards unpacked and checked, a missing
zstandard wheel, and the figures read from a train log."""
import importlib.util
import json
import sys
import tarfile
import time
import types

import numpy as np
import pytest
import zstandard

from conftest import REPO

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


def fake_train_gpt(presets: dict[str, dict]):
    """A stand-in for train_gpt: PRESETS and what hyperparameters_from_env makes of each."""
    def hyperparameters_from_env(env, cuda):
        p = presets[env["PRESET"]]
        return types.SimpleNamespace(val_batch_size=524_288, model_eval_seq_len=2048, vocab_size=p.get("vocab", 1024),
                                     recur_blocks=p.get("recur", "")), env["PRESET"]
    return types.SimpleNamespace(PRESETS=presets, SLICES_PER_STEP=8, hyperparameters_from_env=hyperparameters_from_env)


@pytest.mark.parametrize("argv", [["--budget-s", "0"], ["--speed-steps", "3"], ["--e2e-steps", "1"]])
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exit_:
        gc.parse_args(argv)
    assert exit_.value.code == 2


def test_plan_takes_presets_from_train_gpt_in_the_issues_order(tmp_path):
    tg = fake_train_gpt({"smoke": {}, "pr76": {}, "pr236": {}, "sp8192": {"vocab": 8192}, "frontier": {"recur": "4,5"},
                         "pr1204": {"recur": "3,4"}})
    steps = gc.plan_steps(gc.parse_args(["--speed-steps", "16"]), tg, tmp_path / "data", tmp_path)
    assert [s["name"] for s in steps] == ["attention", "speed:frontier", "speed:pr1204", "speed:sp8192", "speed:pr76",
                                          "e2e:frontier"]
    speed = {s["name"]: s for s in steps if s["name"].startswith("speed:")}
    assert speed["speed:frontier"]["cmd"][-2:] == ["--recur-at", "8"] and "--recur-at" not in speed["speed:pr76"]["cmd"]
    # real proxy tokens where the vocabulary is the proxy's; sp8192 times on synthetic tokens
    assert speed["speed:pr76"]["env"]["DATA_PATH"] == str(tmp_path / "data" / gc.PROXY_DATA)
    assert "--tokens real" in " ".join(speed["speed:pr76"]["cmd"]) and "DATA_PATH" not in speed["speed:sp8192"]["env"]
    e2e = steps[-1]
    assert e2e["env"]["VAL_BATCH_SIZE"] == "65536"  # 524,288 / 8: the per-rank evaluation batch of 8 GPUs
    assert e2e["env"]["MAX_WALLCLOCK_SECONDS"] == "0" and e2e["cmd"][1:] == ["train_gpt.py"]
    assert all(s["needs_cuda"] for s in steps)


def test_caps_come_from_the_time_left_keeping_later_minimums():
    step = {"max_s": 200, "min_s": 60, "reserve": True}
    later = [{"min_s": 100, "reserve": True}, {"min_s": 50, "reserve": False}]
    assert gc.step_cap(step, left=500, later=later) == 200  # its own maximum
    assert gc.step_cap(step, left=250, later=later) == 150  # 100 s kept for the later step that must run
    assert gc.step_cap(step, left=120, later=later) == 20  # below its minimum: execute() skips it


def stand_in(name: str, code: str, max_s=30, min_s=0, reserve=False) -> dict:
    return dict(name=name, cmd=[sys.executable, "-c", code], env={}, max_s=max_s, min_s=min_s, reserve=reserve,
                needs_cuda=True)


def test_a_failure_or_timeout_does_not_stop_the_rest_and_results_follow_every_step(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    # the third step reads the summary the harness published after the first two
    check = (f"import json; s = json.load(open({str(out / 'summary.json')!r})); "
             f"print('seen', [r['status'] for r in s['steps']])")
    steps = [stand_in("fails", "import sys; print('boom'); sys.exit(3)"),
             stand_in("hangs", "import time; time.sleep(60)", max_s=1.5),
             stand_in("reads", check),
             stand_in("late", "", min_s=1000)]
    rows = gc.execute(steps, 100, out, work, {"device": "cpu", "torch": "x", "date": "d", "budget_s": 100}, cuda=True,
                      started=time.monotonic())
    assert [r["status"] for r in rows] == ["exit 3", "timeout", "ok", f"skipped: {rows[3]['status'].split()[1]} s left "
                                                                      f"for it, needs 1000 s"]
    assert rows[0]["last_line"] == "boom" and rows[1]["seconds"] < 10
    assert "seen ['exit 3', 'timeout', 'reads']" not in (work / "reads.log").read_text()
    assert "seen ['exit 3', 'timeout']" in (work / "reads.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["steps"]] == ["fails", "hangs", "reads", "late"]
    assert "| fails | exit 3 |" in (out / "summary.md").read_text()
    with tarfile.open(out / "results.tgz") as tar:
        assert sorted(tar.getnames()) == ["fails.log", "hangs.log", "reads.log"]
    assert "gpu_check: fails: exit 3 after 0 s: boom" in capsys.readouterr().out


def test_gpu_steps_are_skipped_without_cuda(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    rows = gc.execute([stand_in("gpu", "")], 100, tmp_path / "out", work, {"device": "cpu", "torch": "x", "date": "d",
                                                                          "budget_s": 100}, cuda=False,
                      started=time.monotonic())
    assert rows[0]["status"] == "skipped: no CUDA"


def test_dry_run_prints_each_step_with_its_cap_and_the_total(capsys):
    assert gc.main(["--dry-run", "--budget-s", "540"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("setup: cap 20 s")
    assert lines[1].startswith("attention: cap 90 s (min 30 s):") and "bench/attn_check.py" in lines[1]
    assert lines[2].startswith("speed:frontier: cap 230 s") and "--recur-at 8" in lines[2]
    assert lines[-2].startswith("e2e:frontier: cap 200 s") and "train_gpt.py" in lines[-2]
    total = int(lines[-1].split()[1])
    caps = [int(line.split("cap ")[1].split()[0]) for line in lines[:-1] if ": cap " in line]
    assert lines[-1].startswith("total: ") and total == sum(caps) <= 540


def shard_bytes(tokens: np.ndarray) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    return header.tobytes() + tokens.astype("<u2").tobytes()


def test_carried_shards_are_unpacked_and_checked(tmp_path):
    source = tmp_path / "devdata"
    (source / gc.PROXY_DATA).mkdir(parents=True)
    (source / "tokenizers").mkdir()
    (source / gc.PROXY_TOKENIZER).write_bytes(b"model")
    raw = shard_bytes(np.arange(1000) % 1024)
    (source / gc.PROXY_DATA / "fineweb_train_000000.bin.zst").write_bytes(zstandard.compress(raw))
    assert gc.unpack_corpus(source, tmp_path / "data") == 1000
    assert (tmp_path / "data" / gc.PROXY_DATA / "fineweb_train_000000.bin").read_bytes() == raw
    (source / gc.PROXY_DATA / "fineweb_val_000000.bin.zst").write_bytes(zstandard.compress(raw[:-2]))  # one short
    with pytest.raises(RuntimeError, match="fineweb_val_000000.bin.zst: not a shard"):
        gc.unpack_corpus(source, tmp_path / "data")
    with pytest.raises(RuntimeError, match="run --prepare here first"):
        gc.unpack_corpus(tmp_path / "nothing", tmp_path / "data")


@pytest.mark.parametrize("module", ["zstandard", "brotli", "constriction"])
def test_a_missing_module_without_a_carried_wheel_is_one_clear_error(monkeypatch, tmp_path, module):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(RuntimeError, match=f"{module} is not installed and no {module} wheel was carried"):
        gc.ensure_installed(module, wheels=tmp_path)


def test_figures_are_read_from_a_train_log_outside_its_embedded_source():
    log = "\n".join([
        "run_id:x", "====== source train_gpt.py (9 bytes) ======", 'log(f"attention_backend:{name}")',
        '    log(f"WARNING: {message}")', "====== end source ======",
        "attention_backend:cudnn (aten._scaled_dot_product_cudnn_attention) for 48x8/4 heads x 2048 x 64 bfloat16",
        "warmup: 3 steps and one eval batch (training tokens) in 61234ms; weights reset",
        "step:20/20 train_loss:5.1 train_time:9000ms step_avg:450.00ms eta:0s lr_scale:0.0",
        "gptq_calibration: 66 matrices from 786432 training tokens in 812ms",
        "train_done steps:20 train_time_ms:9100", "pre_quant val_loss:3.1 val_bpb:1.9000",
        "quantize+compress: 31000ms", "artifact_bytes:17000000 code_bytes:70000 model_bytes:16930000 limit:64000000",
        "final_sliding val_loss:3.1 val_bpb:1.8800 seq_len:1024 stride:256 eval_time_ms:4000"])
    figures = gc.figures_from_log(log)
    assert figures["attention_backend"] == "cudnn" and figures["warmup_ms"] == "61234" and "warning" not in figures
    assert figures["gptq_calibration_ms"] == "812" and figures["quantize_ms"] == "31000"
    assert (figures["pre_quant_val_bpb"], figures["final_sliding_val_bpb"]) == ("1.9000", "1.8800")


@pytest.mark.slow
def test_the_plans_own_commands_run_end_to_end_on_cpu(tmp_path, monkeypatch):
    """The real plan (train_gpt's presets), each command as planned but with the smoke preset on the
    bundled sample in place of the GPU presets and a toy attention shape: every step runs, its
    figures are read, and its files are in the results."""
    import train_gpt as tg
    from conftest import SAMPLE, TOKENIZER, clean_env

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    steps = gc.plan_steps(gc.parse_args([]), tg, tmp_path / "data", work)
    steps = [s for s in steps if s["name"] in ("attention", "speed:frontier", "e2e:frontier")]
    for step in steps:
        if "PRESET" in step["env"]:
            step["env"].update(PRESET="smoke", DATA_PATH=str(SAMPLE), TOKENIZER_PATH=str(TOKENIZER),
                               VAL_BATCH_SIZE="2048")
        if step["name"] == "attention":
            step["cmd"] += ["--shape", "2,4,2,64,16", "--reps", "1"]
    header = {"device": "cpu", "torch": "x", "date": "d", "budget_s": 1000}
    monkeypatch.setattr(gc.os, "environ", clean_env())  # the children's environment: no knobs, no CUDA
    rows = gc.execute(steps, 1000, out, work, header, cuda=True, started=time.monotonic())
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"], [r.get("last_line") for r in rows]
    speed, e2e = rows[1]["figures"], rows[2]["figures"]
    assert speed["ms_per_step_recur_off"] > 0 and speed["ms_per_step_recur_on"] > 0 and speed["recompiles_timed"] == 0
    assert speed["attention"].startswith("flash-cpu")
    assert float(e2e["final_sliding_val_bpb"]) > 0 and int(e2e["gptq_calibration_ms"]) >= 0
    assert rows[0]["figures"]["causal/sdpa-auto"].startswith("match")
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"attention.json", "speed_frontier.json", "speed_frontier.txt", "e2e_frontier.txt"} <= names
