# python3 -m pytest -q tests/test_submit.py
"""submit.py on synthetic logs in train_gpt.py's format: each rule violation on its own, a clean
3-seed record set, the t-test against hand-computed p-values, submission.json against the log
values, the PNG. The contract test at the end checks that train_gpt.py still logs what submit.py reads."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import submit  # noqa: E402

CODE = 'print("a tiny stand-in for train_gpt.py")\n# ====== end source ====== inside the code\n'
HPARAMS = {"RUN_ID": "run", "SEED": "1", "PRESET": "record", "ITERATIONS": "20000", "EVAL_STRIDE": "64",
           "MAX_WALLCLOCK_SECONDS": "600.0", "ARTIFACT_PATH": "", "MATRIX_LR": "0.025"}
VAL_TOKENS, VAL_BYTES = 62_021_632, 151_080_362
H100 = "NVIDIA H100 80GB HBM3"


def bpb(loss):
    return loss / math.log(2) * VAL_TOKENS / VAL_BYTES


def log_text(seed, val_loss=1.93, model_bytes=15_500_000, train_ms=599_000, eval_ms=(20_000, 70_000),
             code=CODE, hparams=None, device=H100, world_size=8, preset="record", crash=False,
             val_tokens=VAL_TOKENS, extra="", val_split="fineweb_sp1024", leak="hits:0 identical_shards:0",
             leak_warning=False, val_split_sha256="ab" * 32):
    """A log as train_gpt.py writes it; `extra` is appended to the key:value lines (fields added later).
    val_split / leak: the split's name and the leak check's counts (None: the line is absent, as in logs
    written before train_gpt.py named its split and checked for leaks)."""
    h = {**HPARAMS, "SEED": str(seed), "RUN_ID": f"seed{seed}", **(hparams or {})}
    lines = [f"run_id:seed{seed}", f"====== source train_gpt.py ({len(code.encode())} bytes) ======", code,
             "====== end source ======", *(f"hparam {k}={v}" for k, v in h.items()),
             "versions python:3.11.7 torch:2.13.0 numpy:2.4.6",
             f"device:{device} world_size:{world_size} grad_accum_steps:{8 // world_size} seed:{seed} preset:{preset}",
             f"data: 80 train shards, val_tokens:{val_tokens} val_bytes:{VAL_BYTES}"]
    if val_split is not None:
        lines.append(f"val_split:{val_split} val_split_targets:{VAL_TOKENS} val_split_sha256:{val_split_sha256}")
    if leak is not None:
        lines.append(f"leak_check: val_docs_sampled:1000 train_tokens_scanned:8000000000 {leak}")
    if leak_warning:
        lines.append("WARNING: validation leak: 3 sampled validation documents occur in the training shards")
    for step in range(200, 1001, 200):
        lines.append(f"step:{step}/20000 train_loss:{4 - step / 500 + seed / 100:.4f} train_time:{step * 60}ms "
                     f"step_avg:60.00ms eta:500s lr_scale:1.0000{extra}")
    lines.append(f"step:1000/20000 val_loss:{val_loss + 0.1:.4f} val_bpb:{bpb(val_loss + 0.1):.4f}")
    if crash:
        return "\n".join(lines) + "\n"
    code_bytes = len(code.encode())
    lines += [f"train_done steps:9000 train_time_ms:{train_ms}{extra}",
              f"pre_quant val_loss:{val_loss - 0.02:.6f} val_bpb:{bpb(val_loss - 0.02):.6f}",
              f"artifact_bytes:{code_bytes + model_bytes} code_bytes:{code_bytes} model_bytes:{model_bytes} "
              f"limit:16000000 margin:{16_000_000 - code_bytes - model_bytes}",
              f"val_tokens:{val_tokens} val_bytes:{VAL_BYTES}"]
    for (label, stride, loss), ms in zip((("final_roundtrip", 1024, val_loss + 0.03), ("final_sliding", 64, val_loss)),
                                         eval_ms):
        lines.append(f"{label}{extra} val_loss:{loss:.8f} val_bpb:{loss / math.log(2) * val_tokens / VAL_BYTES:.8f} "
                     f"seq_len:1024 stride:{stride} eval_time_ms:{ms}")
    lines.append(f"eval_done eval_time_ms:{sum(eval_ms) + 1000}")  # + reading the artifact back
    lines.append("artifact_path:/pod/logs/run.ptz")
    return "\n".join(lines) + "\n"


LOSSES = (1.9300, 1.9280, 1.9290)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_gpt.py").write_text(CODE)
    return tmp_path


def write_logs(workdir, overrides=None, losses=LOSSES, **common):
    """Three seeds; overrides[i] changes log i."""
    paths = []
    for i, loss in enumerate(losses):
        path = workdir / f"seed{i + 1}.txt"
        path.write_text(log_text(i + 1, val_loss=loss, **{**common, **(overrides or {}).get(i, {})}))
        paths.append(str(path))
    return paths


PREV_VAL_LOSS = "2.5"  # a previous record these logs beat by far (so that a record claim's test passes)


def run_submit(workdir, paths, *extra):
    """submit.main on the logs; against PREV_VAL_LOSS unless `extra` names the previous record or says
    --non-record."""
    prev = [] if any(a.startswith(("--prev", "--non-record")) for a in extra) else ["--prev-val-loss", PREV_VAL_LOSS]
    argv = [*paths, "--author", "A. Golfer", "--github-id", "golfer", "--name", "Test run", "--blurb", "b",
            "--date", "2026-01-01T00:00:00Z", "--code", str(workdir / "train_gpt.py"),
            "--out", str(workdir / "submission.json"), *prev, *extra]
    return submit.main(argv)


def failed_rules(out):
    return [line.split("FAIL", 1)[1].strip() for line in out.splitlines() if line.startswith("  FAIL")]


def test_clean_record_set_passes_and_submission_json_equals_the_logs(workdir, capsys):
    paths = write_logs(workdir)
    assert run_submit(workdir, paths) == 0
    out = capsys.readouterr().out
    assert failed_rules(out) == [] and "NOT A RECORD" not in out
    sub = json.loads((workdir / "submission.json").read_text())
    assert (sub["author"], sub["github_id"], sub["name"], sub["blurb"]) == ("A. Golfer", "golfer", "Test run", "b")
    assert list(sub["seeds"]) == ["1", "2", "3"]
    for seed, loss in zip(("1", "2", "3"), LOSSES):
        entry = sub["seeds"][seed]
        assert entry["val_loss"] == float(f"{loss:.8f}")
        assert entry["val_bpb"] == float(f"{bpb(loss):.8f}")
        assert entry["pre_quant_val_loss"] == float(f"{loss - 0.02:.6f}")
        assert (entry["steps"], entry["wallclock_seconds"], entry["eval_seconds"]) == (9000, 599.0, 91.0)
        assert (entry["val_tokens"], entry["val_bytes"]) == (VAL_TOKENS, VAL_BYTES)
        assert entry["score_line"] == "final_sliding"
        assert (entry["bytes_total"], entry["bytes_model"]) == (15_500_000 + len(CODE), 15_500_000)
    assert sub["val_loss"] == pytest.approx(sum(LOSSES) / 3, abs=1e-12)
    assert sub["val_bpb"] == pytest.approx(sum(float(f"{bpb(x):.8f}") for x in LOSSES) / 3, abs=1e-12)
    assert (sub["bytes_total"], sub["bytes_code"]) == (15_500_000 + len(CODE), len(CODE))
    assert (sub["step_stop"], sub["wallclock_seconds"], sub["track"]) == (9000, 599.0, submit.TRACK)
    assert sub["significance"]["prev_val_loss"] == float(PREV_VAL_LOSS) and sub["significance"]["significant"]


@pytest.mark.parametrize("index, change, rule", [
    (1, dict(model_bytes=16_000_000), "artifact <= 16,000,000 bytes"),
    (2, dict(train_ms=600_001), "training <= 600 s"),
    (0, dict(eval_ms=(300_000, 300_500)), "evaluation <= 600 s"),
    (1, dict(code=CODE + "# tuned\n"), "code in the log identical"),
    (2, dict(hparams={"MATRIX_LR": "0.03"}), "configuration identical across seeds"),
    (0, dict(crash=True), ("log complete", "a record: at least 3 complete seeds")),
    (1, dict(val_tokens=VAL_TOKENS - 1), "same validation set"),
    (2, dict(hparams={"SEED": "1"}), "seeds distinct"),
    (0, dict(val_split="custom"), "an official validation split"),
    (1, dict(val_split=None), "an official validation split"),
    (2, dict(leak="hits:3 identical_shards:0"), "no validation leak"),
    (0, dict(leak="hits:0 identical_shards:1"), "no validation leak"),
    (1, dict(leak=None), "no validation leak"),
    (2, dict(leak_warning=True), "no validation leak"),
    (0, dict(leak="hits:x identical_shards:0"), "no validation leak"),
    (1, dict(val_split_sha256="cd" * 32), "same validation set"),
])
def test_each_violation_is_reported_alone(workdir, capsys, index, change, rule):
    paths = write_logs(workdir, {index: change})
    assert run_submit(workdir, paths) == 1
    failed = failed_rules(capsys.readouterr().out)
    rules = rule if isinstance(rule, tuple) else (rule,)
    assert len(failed) == len(rules) and all(f.startswith(r) for f, r in zip(failed, rules)), failed


def test_inconsistent_byte_counts_and_bpb_are_violations(workdir, capsys):
    paths = write_logs(workdir)
    text = Path(paths[0]).read_text()
    Path(paths[0]).write_text(re.sub(r"model_bytes:\d+", "model_bytes:123", text))
    text = Path(paths[1]).read_text()
    Path(paths[1]).write_text(re.sub(r"(final_sliding val_loss:\S+ val_bpb:)\S+", r"\g<1>1.0", text))
    assert run_submit(workdir, paths) == 1
    failed = failed_rules(capsys.readouterr().out)
    assert [f.split(" (")[0] for f in failed] == ["byte counts consistent",
                                                  "val_bpb consistent with val_loss, val_tokens and val_bytes"]


def test_extra_fields_and_spaces_in_device_names_parse(workdir, capsys):
    paths = write_logs(workdir, extra=" new_field:1.5 other:x")
    assert run_submit(workdir, paths) == 0
    assert failed_rules(capsys.readouterr().out) == []
    log = submit.read_log(Path(paths[0]))
    assert log.lines["device"]["device"] == H100 and log.lines["device"]["world_size"] == "8"
    assert len(log.curves["train_loss"]) == 5 and log.curves["val_loss"] == [(1000.0, 2.03)]


def test_smoke_logs_get_null_numbers_and_a_blurb_saying_why(workdir, capsys):
    paths = write_logs(workdir, device="cpu", world_size=1, preset="smoke", hparams={"PRESET": "smoke"})
    assert run_submit(workdir, paths, "--prev-val-loss", "2.0") == 1  # claimed as a record
    assert failed_rules(capsys.readouterr().out) == ["a record: 8xH100 record runs (else --non-record)"]
    assert run_submit(workdir, paths, "--prev-val-loss", "2.0", "--non-record") == 0
    out = capsys.readouterr().out
    assert "NOT A RECORD" in out and "qualifies    no: not record runs, submitted as a non-record" in out
    sub = json.loads((workdir / "submission.json").read_text())
    assert sub["track"] == submit.NON_RECORD_TRACK
    assert sub["blurb"].startswith("NOT A RECORD") and "preset:smoke" in sub["blurb"] and "world_size:1" in sub["blurb"]
    assert sub["val_loss"] is None and sub["val_bpb"] is None and sub["bytes_total"] is None
    assert all(v is None for k, v in sub["seeds"]["2"].items() if k not in ("log", "score_line"))
    assert sub["significance"]["p_value"] is None and sub["significance"]["significant"] is None


# -----------------------------------------------------------------------------
# Significance


@pytest.mark.parametrize("t, df, p", [
    (2.0, 2, 0.5 - 2.0 / (2 * math.sqrt(6.0))),  # df=2: P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)) = 0.0917
    (6.965, 2, 0.01), (1.0, 1, 0.25),  # df=1 is Cauchy: 1/2 - atan(t)/pi
    (-1.0, 1, 0.75), (0.0, 5, 0.5), (1.959964, 1e7, 0.025), (3.747, 4, 0.01),
])
def test_t_distribution_tail(t, df, p):
    assert submit.t_sf(t, df) == pytest.approx(p, abs=2e-5)


def test_t_distribution_tail_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for t in (-3.0, -0.4, 0.1, 1.7, 4.2, 12.0):
        for df in (1, 2, 2.7, 4, 9.3, 30, 200):
            assert submit.t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-14)


def test_one_sample_test_hand_computed(workdir, capsys):
    # d = prev - new = (0.010, 0.012, 0.014): mean 0.012, sd 0.002, se 0.002/sqrt(3),
    # t = (0.012 - 0.005) / se = 3.5 sqrt(3) = 6.0622, df = 2, p = 1/2 - t / (2 sqrt(2 + t^2)) = 0.013075
    t = 3.5 * math.sqrt(3)
    p = 0.5 - t / (2 * math.sqrt(2 + t * t))
    sig = submit.one_sample_test(2.0, [1.990, 1.988, 1.986])
    assert (sig.improvement, sig.t, sig.df, sig.p) == pytest.approx((0.012, t, 2, p), rel=1e-9)
    assert p == pytest.approx(0.013075, abs=1e-6) and not sig.significant  # 2.4x the margin, yet p > 0.01
    paths = write_logs(workdir, losses=(1.990, 1.988, 1.986))
    assert run_submit(workdir, paths, "--prev-val-loss", "2.0") == 1  # not significant: no record
    out = capsys.readouterr().out
    assert f"p = {p:.6f}" in out and failed_rules(out) == [
        "a record: > 0.005 nats better than the previous record at p < 0.01 (else --non-record)"]
    assert f"improvement +0.012000 nats at p = {p:.6f}" in out
    assert json.loads((workdir / "submission.json").read_text())["significance"]["p_value"] == pytest.approx(p)


def test_prev_bpb_is_converted_with_the_logs_own_token_and_byte_counts(workdir, capsys):
    paths = write_logs(workdir, losses=(1.900, 1.901, 1.899))
    assert run_submit(workdir, paths, "--prev-bpb", str(bpb(2.0))) == 0
    sub = json.loads((workdir / "submission.json").read_text())
    assert sub["significance"]["prev_val_loss"] == pytest.approx(2.0, rel=1e-12)
    assert sub["significance"]["significant"] is True and "qualifies    yes" in capsys.readouterr().out


def test_welch_test_hand_computed(workdir, capsys):
    # prev (2.010, 2.012, 2.014), new (1.990, 1.992, 1.994): equal variances s^2 = 4e-6, so
    # se = sqrt(2 * 4e-6 / 3), df = 4, t = (0.020 - 0.005) / se = 9.1856;
    # df=4: P(T > t) = 1/2 - (3/4) u (1 - u^2 / 3) with u = t / sqrt(4 + t^2)
    t = 0.015 / math.sqrt(8e-6 / 3)
    u = t / math.sqrt(4 + t * t)
    p = 0.5 - 0.75 * u * (1 - u * u / 3)
    sig = submit.welch_test([2.010, 2.012, 2.014], [1.990, 1.992, 1.994])
    assert (sig.improvement, sig.t, sig.df, sig.p) == pytest.approx((0.020, t, 4, p), rel=1e-6)
    prev_dir = workdir / "prev"
    prev_dir.mkdir()
    prev = write_logs(prev_dir, losses=(2.010, 2.012, 2.014))
    paths = write_logs(workdir, losses=(1.990, 1.992, 1.994))
    assert run_submit(workdir, paths, "--prev-logs", *prev) == 0
    out = capsys.readouterr().out
    assert "Welch" in out and f"p = {p:.6f}" in out


def test_welch_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    prev, new = [2.01, 2.017, 2.012, 2.02], [1.99, 1.991, 2.004]
    shifted = [x - submit.MARGIN_NATS for x in prev]
    expected = stats.ttest_ind(shifted, new, equal_var=False, alternative="greater")
    assert submit.welch_test(prev, new).p == pytest.approx(expected.pvalue, rel=1e-9)


# -----------------------------------------------------------------------------
# Plot, errors, the contract with train_gpt.py

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_png_is_written(workdir, capsys):
    pytest.importorskip("matplotlib")
    paths = write_logs(workdir, {1: dict(crash=True)})
    run_submit(workdir, paths, "--plot", str(workdir / "plots" / "curves.png"))
    assert (workdir / "plots" / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_missing_matplotlib_degrades_with_a_message(workdir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert run_submit(workdir, write_logs(workdir), "--plot", "curves.png") == 0
    assert "plot: skipped, matplotlib is not installed" in capsys.readouterr().out
    assert not (workdir / "curves.png").exists()


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the log"), (b"\xff\xfe not utf-8", "cannot read the log"),
    (b"hello\n", "not a train_gpt.py log"),
])
def test_unreadable_logs_are_one_line_errors(workdir, capsys, content, message):
    bad = workdir / "bad.txt"
    if content is not None:
        bad.write_bytes(content)
    assert run_submit(workdir, [str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_one_seed_is_reported_but_not_t_tested(workdir, capsys):
    assert run_submit(workdir, write_logs(workdir)[:1], "--prev-val-loss", "2.0", "--non-record") == 0
    assert "significance: not tested, it needs at least 2 complete logs" in capsys.readouterr().out
    sub = json.loads((workdir / "submission.json").read_text())
    assert sub["significance"] is None and sub["track"] == submit.NON_RECORD_TRACK


# -----------------------------------------------------------------------------
# A record claim and where the JSON goes (issue 24, item 2)


@pytest.mark.parametrize("prev", [["--prev-val-loss", "2.0"], []])
def test_a_one_seed_record_is_refused(workdir, capsys, prev):
    """One clean 8xH100 log, claimed as a record (no --non-record): once exit 0 with significance null."""
    assert submit.main([write_logs(workdir)[0], "--author", "a", "--github-id", "g", "--name", "n",
                        "--code", str(workdir / "train_gpt.py"), *prev]) == 1
    out = capsys.readouterr().out
    assert failed_rules(out) == ["a record: at least 3 complete seeds (else --non-record)",
                                 "a record: > 0.005 nats better than the previous record at p < 0.01 (else --non-record)"]
    assert "          1 complete log(s)" in out and "\n2 violation(s)" in out
    assert ("not tested: 1 complete log(s)" if prev else "no previous record to beat: give --prev-val-loss") in out


def test_three_seeds_without_a_previous_record_are_no_record(workdir, capsys):
    assert submit.main([*write_logs(workdir), "--author", "a", "--github-id", "g", "--name", "n",
                        "--code", str(workdir / "train_gpt.py")]) == 1
    assert failed_rules(capsys.readouterr().out) == [
        "a record: > 0.005 nats better than the previous record at p < 0.01 (else --non-record)"]


def test_the_json_goes_beside_the_logs_by_default(workdir, capsys):
    logs = workdir / "runs"
    logs.mkdir()
    paths = write_logs(logs)
    assert submit.main([*paths, "--author", "a", "--github-id", "g", "--name", "n", "--code",
                        str(workdir / "train_gpt.py"), "--non-record"]) == 0
    assert f"wrote {logs / 'submission.json'}" in capsys.readouterr().out
    assert json.loads((logs / "submission.json").read_text())["track"] == submit.NON_RECORD_TRACK
    assert not (workdir / "submission.json").exists()


def test_a_file_git_tracks_is_never_written_over(workdir, capsys):
    tracked = workdir / "submission.json"
    tracked.write_text("{}\n")
    git = ["git", "-C", str(workdir), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "submission.json"], ["commit", "-qm", "x"]):
        subprocess.run(git + args, check=True, capture_output=True)
    assert run_submit(workdir, write_logs(workdir)) == 2  # --out submission.json in a repository that tracks it
    err = capsys.readouterr().err
    assert err == f"error: {tracked} is tracked by git: submit.py never writes over a tracked file (give --out " \
                  f"another path)\n"
    assert tracked.read_text() == "{}\n"


def test_train_gpt_still_logs_what_submit_reads():
    source = (ROOT / "train_gpt.py").read_text()
    for label, keys in submit.RESULT_LINES.items():
        assert re.search(rf'log\(f"{label}[ :]|"{label}"', source), f"train_gpt.py no longer logs a {label} line"
        for key in keys:
            assert f"{key}:" in source, f"train_gpt.py no longer logs {key}: on its {label} line"
    for fragment in ("====== source ", "====== end source ======", "hparam ", "device:", "world_size:",
                     "preset:", "scale:", "train_loss:", "val_loss:"):
        assert fragment in source


# -----------------------------------------------------------------------------
# Proxy runs (VAL_TOKENS) and preset names


def test_a_log_that_scored_a_validation_prefix_fails_as_a_record(workdir, capsys):
    paths = write_logs(workdir, hparams={"VAL_TOKENS": "131072"})
    for path in paths:  # as train_gpt.py logs a VAL_TOKENS prefix: the scored count, then the split's
        text = Path(path).read_text().replace(f"val_tokens:{VAL_TOKENS} val_bytes:{VAL_BYTES}\n",
                                              f"val_tokens:{VAL_TOKENS} val_bytes:{VAL_BYTES} of_val_tokens:99999999\n")
        Path(path).write_text(text)
    assert run_submit(workdir, paths) == 1
    fails = failed_rules(capsys.readouterr().out)
    assert fails == ["the whole validation split scored (VAL_TOKENS=0)"]


@pytest.mark.parametrize("preset, record", [("pr76", True), ("frontier", True), ("record", True), ("smoke", False)])
def test_every_preset_but_smoke_counts_as_a_record_configuration(workdir, preset, record):
    paths = write_logs(workdir, preset=preset, hparams={"PRESET": preset})
    reasons = submit.not_record_reasons([submit.read_log(Path(p)) for p in paths])
    assert reasons == ([] if record else [f"preset:{preset}"])


def test_a_toy_scale_run_is_never_a_record(workdir, capsys):
    """SCALE=toy on the record's own device: the device line's scale:toy fails the record rule, with that reason."""
    paths = write_logs(workdir, preset="sp8192 scale:toy", hparams={"PRESET": "sp8192", "SCALE": "toy"})
    assert submit.not_record_reasons([submit.read_log(Path(p)) for p in paths]) == ["scale:toy (a shrunk preset)"]
    assert run_submit(workdir, paths) == 1
    out = capsys.readouterr().out
    assert failed_rules(out) == ["a record: 8xH100 record runs (else --non-record)"] and "scale:toy" in out


# -----------------------------------------------------------------------------
# The validation split and the leak check (issue 13, kinds 1 and 4)


@pytest.mark.parametrize("split", submit.OFFICIAL_VAL_SPLITS)
def test_every_official_split_with_a_clean_leak_check_passes(workdir, capsys, split):
    paths = write_logs(workdir, val_split=split)
    for path in paths:  # another warning is not a leak
        Path(path).write_text(Path(path).read_text().replace(
            "train_done", "WARNING: the training stream wrapped: all 80 train shards are used up\ntrain_done", 1))
    assert run_submit(workdir, paths) == 0
    assert failed_rules(capsys.readouterr().out) == []


def test_an_old_log_without_split_or_leak_check_cannot_be_a_record(workdir, capsys):
    assert run_submit(workdir, write_logs(workdir, val_split=None, leak=None)) == 1
    out = capsys.readouterr().out
    rules = [rule.split(" (")[0] for rule in failed_rules(out)]
    assert rules == ["an official validation split", "no validation leak"]
    assert "seed1.txt: no val_split line: a log that does not name its validation split cannot be a record" in out
    assert ("seed1.txt: no leak_check line: a log that did not check for train/validation overlap cannot be a "
            "record") in out


def test_a_leak_is_reported_with_the_log_s_own_words(workdir, capsys):
    assert run_submit(workdir, write_logs(workdir, {1: dict(leak="hits:2 identical_shards:1", leak_warning=True)})) == 1
    out = capsys.readouterr().out
    assert ("seed2.txt: WARNING: validation leak: 3 sampled validation documents occur in the training shards; "
            "leak_check hits:2; leak_check identical_shards:1") in out


# -----------------------------------------------------------------------------
# Score-first TTT (issue 17)


def with_ttt(path: str, loss: float, ttt_ms: int = 300_000) -> None:
    """Adds what a TTT_ENABLED run logs after the standard lines: the final_ttt line and its accounting."""
    text = Path(path).read_text().replace("hparam MATRIX_LR=0.025", "hparam MATRIX_LR=0.025\nhparam TTT_ENABLED=True")
    ttt = "".join(f"{label} val_loss:{value:.8f} val_bpb:{bpb(value):.8f} chunk:48 eval_time_ms:{ms}\n"
                  f"val_tokens:{VAL_TOKENS} val_bytes:{VAL_BYTES}\n"
                  for label, value, ms in (("final_ttt", loss, ttt_ms),))
    Path(path).write_text(text.replace("eval_done", ttt + "eval_done"))


def test_a_ttt_run_is_scored_by_its_final_ttt_line(workdir, capsys):
    paths = write_logs(workdir)
    for path, loss in zip(paths, LOSSES):
        with_ttt(path, loss - 0.02)
    runs = [submit.measure(submit.read_log(Path(p))) for p in paths]
    assert [r.score_line for r in runs] == ["final_ttt"] * 3
    assert [r.val_loss for r in runs] == pytest.approx([loss - 0.02 for loss in LOSSES])


def test_a_ttt_run_without_its_final_ttt_line_is_incomplete(workdir, capsys):
    paths = write_logs(workdir)
    text = Path(paths[0]).read_text().replace("hparam MATRIX_LR=0.025", "hparam MATRIX_LR=0.025\nhparam TTT_ENABLED=True")
    Path(paths[0]).write_text(text)
    with pytest.raises(submit.Incomplete, match="final_ttt"):
        submit.measure(submit.read_log(Path(paths[0])))
