# A finished run is never lost (issue 13, kind 5): python3 -m pytest -q tests/test_outputs.py
"""No run replaces an earlier run's log, artifact or checkpoint; unwritable or full output folders are
found at start, before training; files are written whole or not at all; a failed write is one line."""

import hashlib
import types
import uuid
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import REPO, SCRIPT as tg_script, assert_one_line_error, tiny_hparams

QUICK = {"ITERATIONS": "2", "EVAL_STRIDE": "0", "GPTQ_CALIB_TOKENS": "0"}  # the smoke preset, cut short


def test_two_runs_with_one_run_id_keep_both_logs_and_artifacts(run_script):
    run_id = f"pytest_{uuid.uuid4().hex[:10]}"
    first = run_script({**QUICK, "RUN_ID": run_id, "SEED": "1", "ARTIFACT_PATH": ""})
    second = run_script({**QUICK, "RUN_ID": run_id, "SEED": "2", "ARTIFACT_PATH": ""})
    assert first.returncode == 0, first.explain()
    assert second.returncode == 0, second.explain()
    note = f"outputs: logs/{run_id}.txt or .ptz exists (an earlier run's); this run is RUN_ID={run_id}_2"
    assert second.stdout.startswith(note), second.stdout[:300]
    assert f"run_id:{run_id} " in first.log and "seed:1 " in first.log
    assert second.log.startswith(note) and f"run_id:{run_id}_2 " in second.log and "seed:2 " in second.log
    for run, name in ((first, run_id), (second, f"{run_id}_2")):
        artifact = REPO / "logs" / f"{name}.ptz"
        assert f"artifact_sha256:{hashlib.sha256(artifact.read_bytes()).hexdigest()}" in run.log, name
    # An EVAL_ONLY run writes a log too: with the same RUN_ID it takes the next free name.
    third = run_script({"RUN_ID": run_id, "EVAL_ONLY": str(REPO / "logs" / f"{run_id}.ptz"), "EVAL_STRIDE": "0"})
    assert third.returncode == 0, third.explain()
    assert f"run_id:{run_id}_3 " in third.log and f"run_id:{run_id} " in first.log


@pytest.mark.parametrize("name", ["ARTIFACT_PATH", "CHECKPOINT_OUT"])
def test_an_existing_output_file_is_refused_at_start(run_script, tmp_path, name):
    existing = tmp_path / "earlier_output"
    existing.write_bytes(b"an earlier run's file")
    lab = REPO / "bench" / "lab.py"  # CHECKPOINT_OUT is the lab's output
    run = run_script({name: str(existing)}, script=lab if name == "CHECKPOINT_OUT" else tg_script)
    assert_one_line_error(run, name, str(existing), "already exists")
    assert existing.read_bytes() == b"an earlier run's file"
    assert "warmup:" not in run.body, "the run trained before refusing"


def test_dev_full_is_refused_at_start(run_script):
    run = run_script({"ARTIFACT_PATH": "/dev/full"})
    assert_one_line_error(run, "ARTIFACT_PATH=/dev/full already exists")
    assert "warmup:" not in run.body


def test_an_unwritable_folder_and_a_full_disk_are_found_at_start(run_script, tmp_path):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("")
    run = run_script({"ARTIFACT_PATH": str(a_file / "model.ptz")})
    assert_one_line_error(run, "ARTIFACT_PATH: cannot write into", str(a_file))
    assert "warmup:" not in run.body
    run = run_script({"ARTIFACT_LIMIT_BYTES": str(10 ** 18)})  # no disk has room for an artifact that large
    assert_one_line_error(run, "ARTIFACT_PATH", "bytes free, less than the 1000000000000000000")
    assert "warmup:" not in run.body


def test_claim_files_checks_every_output_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "SCRIPT_DIR", tmp_path)
    h = tiny_hparams(run_id="sweep")
    assert tg.claim_files(h)[:2] == ("sweep", tmp_path / "logs" / "sweep.txt")
    (tmp_path / "logs" / "sweep_2.ptz").write_bytes(b"")  # an artifact without its log: that name is taken too
    run_id, log_path, artifact, note = tg.claim_files(h)
    logs = tmp_path / "logs"
    assert (run_id, log_path, artifact) == ("sweep_3", logs / "sweep_3.txt", logs / "sweep_3.ptz")
    assert "RUN_ID=sweep_3" in note and log_path.exists()
    monkeypatch.setattr(tg.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=1000))
    with pytest.raises(tg.RunError, match=r"^the log folder: .* has 1000 bytes free"):
        tg.claim_files(h)


def test_a_failed_write_leaves_no_file_and_is_one_line(tmp_path):
    target = tmp_path / "model.ptz"

    def fill_the_disk(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        with open("/dev/full", "wb") as full:  # a real ENOSPC from the kernel
            full.write(b"x" * 100_000)

    with pytest.raises(tg.RunError, match=r"model\.ptz: cannot write \(No space left on device\)$"):
        tg.write_atomically(target, fill_the_disk)
    assert list(tmp_path.iterdir()) == [], "a partial or temporary file was left behind"
    tg.write_atomically(target, lambda tmp: tmp.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_a_log_that_cannot_be_written_is_one_error(tmp_path):
    log = tg.Logger(tmp_path / "gone" / "run.txt")
    with pytest.raises(tg.RunError, match=r"run\.txt: cannot write the log \(No such file or directory\)"):
        log("step:1", console=False)
    log("error: the same failure", console=False)  # the error line itself does not fail again


def test_a_run_stopped_at_start_up_sets_its_log_aside(run_script):
    """Issue 24, item 10: a run that stops before it trains (here PRESET=pr76 without FineWeb) keeps its log
    as logs/<RUN_ID>.stopped.txt, ending with the error, without the 200 KB copy of the source, and leaves
    its RUN_ID free; a run that trained keeps logs/<RUN_ID>.txt (test_end_to_end's divergence test)."""
    run_id = f"pytest_{uuid.uuid4().hex[:10]}"
    stopped = REPO / "logs" / f"{run_id}.stopped.txt"
    try:
        run = run_script({"PRESET": "pr76", "RUN_ID": run_id})
        error = assert_one_line_error(run, "TOKENIZER_PATH")
        assert run.log == "" and not (REPO / "logs" / f"{run_id}.txt").exists()
        text = stopped.read_text()
        assert text.splitlines()[-1] == error and f"run_id:{run_id} " in text
        assert "====== source" not in text and len(text) < 20_000, len(text)
    finally:
        stopped.unlink(missing_ok=True)
