# The device call's CPU-testable parts: python3 -m pytest -q tests/test_gpu_check.py
"""bench/gpu_check.py: the plan (issue 22's order, steps whose preset train_gpt lacks left out, the
loops timed off then on, the one-GPU environment), caps that sum to the budget and come from the time
left with the minimum of later steps kept, a failed or timed-out step not stopping the rest, results
written after every step, the figures read from each step's JSON with a peak over 75 GiB flagged, the
dry run's sections (plan, ms/step estimates, evaluation plan), the estimate model's arithmetic, the
carried shards unpacked and checked, and a missing wheel."""
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
import train_gpt as tg

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)
import step_estimate as se  # noqa: E402  (gpu_check put bench/ on the path)


def fake_train_gpt(presets: dict[str, dict]):
    """A stand-in for train_gpt: PRESETS and what hyperparameters_from_env makes of each."""
    def hyperparameters_from_env(env, cuda):
        p = presets[env["PRESET"]]
        return types.SimpleNamespace(val_batch_size=524_288, model_eval_seq_len=2048, vocab_size=p.get("vocab", 1024),
                                     recur_blocks=p.get("recur", "")), env["PRESET"]
    return types.SimpleNamespace(PRESETS=presets, SLICES_PER_STEP=8, hyperparameters_from_env=hyperparameters_from_env)


GPU_PRESETS = {"smoke": {}, "pr76": {}, "sp8192": {"vocab": 8192, "recur": "3,4,5"}, "frontier": {"recur": "4,5"},
               "pr1204": {"recur": "4,5"}}


@pytest.mark.parametrize("argv", [["--budget-s", "0"], ["--speed-steps", "3"]])
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exit_:
        gc.parse_args(argv)
    assert exit_.value.code == 2


def test_plan_answers_sp8192_first_in_issue_22s_order(tmp_path):
    steps = gc.plan_steps(gc.parse_args(["--speed-steps", "16"]), fake_train_gpt(GPU_PRESETS), tmp_path / "data",
                          tmp_path)
    assert [s["name"] for s in steps] == ["attention", "speed:sp8192", "ttt:sp8192", "speed:pr1204"]
    attention, sp8192, ttt, pr1204 = (" ".join(s["cmd"][1:]) for s in steps)
    assert "bench/attn_check.py --presets sp8192 --cases documents --documents lognormal" in attention
    assert sp8192.endswith("--recur-at 8") and "--tokens synthetic" in sp8192  # 8192 pieces: not the proxy's
    assert "DATA_PATH" not in steps[1]["env"] and steps[1]["env"]["VAL_BATCH_SIZE"] == "65536"  # 524,288 / 8
    assert ttt.startswith("bench/ttt_chunk.py --preset sp8192 --out")
    assert "--tokens real" in pr1204 and steps[3]["env"]["DATA_PATH"] == str(tmp_path / "data" / gc.PROXY_DATA)
    assert all(s["needs_cuda"] for s in steps)
    without = gc.plan_steps(gc.parse_args([]), fake_train_gpt({"pr1204": {}}), tmp_path / "data", tmp_path)
    assert [s["name"] for s in without] == ["attention", "speed:pr1204"]
    assert "--presets" not in without[0]["cmd"]


def test_caps_fill_the_budget_in_the_plans_order():
    assert list(gc.CAPS) == list(gc.PLAN)
    assert gc.SETUP_S + sum(c["max_s"] for c in gc.CAPS.values()) == 540
    assert all(c["min_s"] <= c["max_s"] for c in gc.CAPS.values())
    assert not gc.CAPS[gc.PLAN[-1]]["reserve"]  # the last step runs as far as time allows


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


def test_dry_run_prints_the_plan_the_estimates_and_the_evaluation_plan(capsys):
    assert gc.main(["--dry-run", "--budget-s", "540"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("setup: cap 20 s")
    plan = lines[1:lines.index(next(line for line in lines if line.startswith("total: ")))]
    assert [line.split(": cap ")[0] for line in plan] == ["attention", "speed:sp8192", "ttt:sp8192", "speed:pr1204"]
    caps = [int(line.split("cap ")[1].split()[0]) for line in lines[:len(plan) + 1]]
    total = next(line for line in lines if line.startswith("total: "))
    assert int(total.split()[1]) == sum(caps) == 540
    assert "bench/ttt_chunk.py --preset sp8192" in plan[2] and "--recur-at 8" in plan[1]
    estimates = lines[lines.index(total) + 1:]
    assert estimates[0].startswith("estimate: ms/step on 8xH100, ESTIMATED")
    rows = {tuple(line.split()[:2]): line.split() for line in estimates if line.split()[:1] and
            line.split()[0] in gc.GPU_PRESETS}
    assert {("sp8192", "flex"), ("sp8192", "cudnn-mask"), ("pr1204", "cudnn"), ("frontier", "cudnn")} <= set(rows)
    assert rows[("sp8192", "flex")][2] == "11/17" and rows[("pr1204", "cudnn")][2] == "11/13"
    assert any(line.startswith("  flex: w=documents, s=0.65") and "137036" in line for line in estimates)
    if hasattr(tg, "eval_plan"):
        plans = [line for line in estimates if line.startswith("SP8192")]
        assert plans[0].startswith("SP8192 (40,540,160 targets, 50,000 documents): eval_plan")
        assert plans[1].startswith("SP8192 CaseOps (47,851,520 targets, 50,000 documents): eval_plan")
        assert all("total_s:" in line for line in plans)
    else:
        assert estimates[-1] == "eval_plan: not in this train_gpt.py"


def test_eval_plan_lines_call_train_gpts_eval_plan_for_both_splits():
    calls = []

    def eval_plan(h, num_targets, num_documents):
        calls.append((h.ttt_batch_docs, num_targets, num_documents))
        return f"eval_plan: targets:{num_targets} total_s:1"
    fake = types.SimpleNamespace(PRESETS=tg.PRESETS, hyperparameters_from_env=tg.hyperparameters_from_env,
                                 eval_plan=eval_plan)
    lines = gc.eval_plan_lines(fake)
    assert calls == [(64, 40_540_160, 50_000), (64, 47_851_520, 50_000)]  # sp8192 at full size
    assert lines[1] == "SP8192 CaseOps (47,851,520 targets, 50,000 documents): eval_plan: targets:47851520 total_s:1"
    assert gc.eval_plan_lines(types.SimpleNamespace(PRESETS=tg.PRESETS)) == ["eval_plan: not in this train_gpt.py"]


def test_estimate_arithmetic_on_a_known_case():
    flex = se.Kernel("documents", 0.5, "test")
    assert se.work_per_token(100, 50, flex, doc_fraction=0.5) == 150  # 100 + 50 x 0.5 / 0.5
    after = se.Record(10.0, "after", "fa3", "test")
    x = se.throughput(after, tokens=1000, work_off=90, work_on=125)
    assert x == 12_500 and 1000 * 150 / x == 12.0  # our kernel's step: 12 ms against the record's 10
    average = se.Record(12.0, 0.25, "fa3", "test")
    x = se.throughput(average, tokens=1000, work_off=100, work_on=200)
    before, later = 1000 * 100 / x, 1000 * 200 / x
    assert later == 2 * before and se.harmonic_average(before, later, 0.25) == pytest.approx(12.0)


def test_estimates_reproduce_the_records_they_are_calibrated_on():
    fa3, flex = (next(r for r in se.estimate_rows("sp8192") if r["kernel"] == k) for k in ("fa3", "flex"))
    assert se.harmonic_average(fa3["before_ms"], fa3["after_ms"], 0.35) == pytest.approx(121.6)
    assert fa3["doc_fraction"] == flex["doc_fraction"] and 0.3 < fa3["doc_fraction"] < 1
    assert flex["before_ms"] > fa3["before_ms"] and flex["after_ms"] > fa3["after_ms"]
    cudnn = se.estimate_rows("pr1204")[0]
    (m, a) = cudnn["flops"][True]  # the record ran FA3 causal: ours is its step with attention at 0.9x the speed
    assert cudnn["kernel"] == "cudnn" and cudnn["after_ms"] == pytest.approx(96.1 * (m + a / 0.9) / (m + a))
    assert se.estimate_rows("pr76")[0]["before_ms"] == pytest.approx(65.0)  # its kernel taken as ours


def test_figures_come_from_each_steps_json_and_a_peak_over_75_gib_is_flagged(tmp_path):
    mib = lambda gib: {"peak_allocated_mib": gib * 1024 - 512, "peak_reserved_mib": gib * 1024}
    phase = lambda ms, mfu, memory: {"ms_per_step_median": ms, "mfu": mfu, "memory": memory}
    speed = {"train": {"ms_per_step_median": 900.0, "pipelined_ms_per_step": 880.0, "losses": [9.0, 8.5],
                       "recurrence": {"recur_at": 8, "blocks": "3,4,5", "recur_off": phase(800.0, 0.3, mib(40)),
                                      "recur_on": phase(1100.0, 0.35, mib(76))}},
             "attention_backend": "flex", "warmup_ms": 95_000, "compile": {"timed": {"recompiles": 0}},
             "host_syncs": {"count": 0}, "memory": {"warmup": mib(30), "timed_steps": mib(76)}}
    (tmp_path / "speed_sp8192.json").write_text(json.dumps(speed))
    found = gc.figures({"name": "speed:sp8192"}, tmp_path)
    assert (found["ms_per_step_recur_off"], found["ms_per_step_recur_on"]) == (800.0, 1100.0)
    assert found["mfu_recur_on"] == 35.0
    assert found["peak_reserved_gib_recur_off"] == 40 and found["peak_reserved_gib"] == 76
    assert found["FLAG"].startswith("peak over 75 GiB")
    chunk = lambda memory: {"ms": 250.0, "warmup_s": 60.0, "memory": memory}
    ttt = {"chunk": chunk(mib(60)), "forward_only": chunk(mib(20)), "losses_finite": True,
           "forward": "one_document=True"}
    (tmp_path / "ttt_sp8192.json").write_text(json.dumps(ttt))
    found = gc.figures({"name": "ttt:sp8192"}, tmp_path)
    assert found["ms_per_chunk"] == 250.0 and found["peak_reserved_gib"] == 60 and "FLAG" not in found
    assert gc.figures({"name": "ttt:pr1204"}, tmp_path)["figures"].startswith("unreadable")


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


@pytest.mark.slow
def test_the_plans_own_commands_run_end_to_end_on_cpu(tmp_path, monkeypatch):
    """The real plan (train_gpt's presets), each command as planned but at toy size: the smoke preset on
    the bundled sample in place of the GPU presets, a toy attention shape, a toy TTT chunk compiled with
    the eager backend. Every step runs, its figures are read, and its files are in the results."""
    from conftest import SAMPLE, TOKENIZER, clean_env

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    steps = gc.plan_steps(gc.parse_args([]), tg, tmp_path / "data", work)
    steps = [s for s in steps if s["name"] in ("attention", "speed:sp8192", "ttt:sp8192")]
    for step in steps:
        if "PRESET" in step["env"]:
            step["env"].update(PRESET="smoke", DATA_PATH=str(SAMPLE), TOKENIZER_PATH=str(TOKENIZER),
                               VAL_BATCH_SIZE="2048")
        if step["name"] == "attention":
            step["cmd"] += ["--shape", "2,4,2,64,16", "--reps", "1"]
        if step["name"] == "ttt:sp8192":
            step["cmd"][step["cmd"].index("sp8192")] = "smoke"
            step["cmd"] += ["--rows", "2", "--len", "32", "--backend", "eager", "--warmup", "1", "--reps", "1"]
    header = {"device": "cpu", "torch": "x", "date": "d", "budget_s": 1000}
    monkeypatch.setattr(gc.os, "environ", clean_env())  # the children's environment: no knobs, no CUDA
    rows = gc.execute(steps, 1000, out, work, header, cuda=True, started=time.monotonic())
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"], [r.get("last_line") for r in rows]
    attention, speed, ttt = (r["figures"] for r in rows)
    assert attention["documents/sdpa-math-mask"].startswith("match") and "causal/sdpa-auto" not in attention
    assert speed["ms_per_step_recur_off"] > 0 and speed["ms_per_step_recur_on"] > 0 and speed["recompiles_timed"] == 0
    assert speed["attention"].startswith("flash-cpu")
    assert ttt["ms_per_chunk"] > 0 and ttt["losses_finite"] is True
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"attention.json", "speed_sp8192.json", "speed_sp8192.txt", "ttt_sp8192.json"} <= names
