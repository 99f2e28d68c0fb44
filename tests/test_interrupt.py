# Ctrl-C and SIGTERM (issue 24, item 5): python3 -m pytest -q tests/test_interrupt.py
"""A smoke run interrupted after its first step line ends with one line, on stdout and in its log,
saying at which step, after how long and what it wrote, and exits 130; under torchrun each worker does,
and only rank 0 prints."""

import os
import re
import signal
import subprocess
import sys
import uuid

import pytest

from conftest import HANG_FACTOR, REPO, SCRIPT, clean_env

LINE = re.compile(r"^interrupted at step (\d+) after \d+\.\d s; wrote nothing but this log \((.+)\)$")


def interrupted_run(tmp_path, send, nproc: int = 1):
    """Starts a smoke run (one step per log line), waits for its first step line, calls send(process)
    and returns (exit status, stdout, stderr, log text); the log is deleted."""
    run_id = f"pytest_{uuid.uuid4().hex[:10]}"
    env = {**clean_env(), "PRESET": "smoke", "TRAIN_LOG_EVERY": "1", "RUN_ID": run_id,
           "ARTIFACT_PATH": str(tmp_path / "a.ptz")}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.Popen(launcher + [str(SCRIPT)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    log_path = REPO / "logs" / f"{run_id}.txt"
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step:"):
                break
        assert lines and lines[-1].startswith("step:"), "".join(lines) + proc.stderr.read()
        send(proc)
        out, err = proc.communicate(timeout=HANG_FACTOR * 120)
        return proc.returncode, "".join(lines) + out, err, log_path.read_text(encoding="utf-8")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log_path.unlink(missing_ok=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_is_one_line_and_exit_130(tmp_path, signum):
    rc, out, err, log = interrupted_run(tmp_path, lambda proc: proc.send_signal(signum))
    last = out.strip().splitlines()[-1]
    match = LINE.match(last)
    assert rc == 130 and match, (rc, out[-500:], err[-2000:])
    assert int(match[1]) >= 1 and match[2].endswith(".txt")
    assert log.strip().splitlines()[-1] == last and err == "" and not (tmp_path / "a.ptz").exists()


@pytest.mark.slow
def test_ctrl_c_under_torchrun_is_one_line_from_rank_0(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: torchrun and its two workers. The workers
    print no traceback; torchrun's own exit status and report of the signal are torchrun's."""
    rc, out, err, log = interrupted_run(tmp_path, lambda proc: os.killpg(proc.pid, signal.SIGINT), nproc=2)
    lines = [line for line in out.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and LINE.match(lines[0]) and log.strip().splitlines()[-1] == lines[0], (out, err)
    assert rc != 0 and 'train_gpt.py", line' not in err, err[-3000:]
