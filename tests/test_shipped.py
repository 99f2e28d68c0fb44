# The file that ships and counts: python3 -m pytest -q tests/test_shipped.py
"""code_bytes is the size of train_gpt.py's self-extracting form (its program without comments and
docstrings, LZMA, base85, a two-line stub), as the leaderboard counted code from 1.0856 on. That form
must be a fixed point, run the same program with identical results, and be what submit.py writes."""
import hashlib
import re
import subprocess
import sys

import submit
import train_gpt as tg
from conftest import HANG_FACTOR, REPO, SAMPLE, SCRIPT, TOKENIZER, clean_env


def test_the_shipped_form_is_a_fixed_point_and_holds_the_program():
    source = SCRIPT.read_bytes()
    shipped = tg.shipped_form(source)
    assert shipped.startswith(tg.SHIPPED_HEAD) and shipped.endswith(tg.SHIPPED_TAIL)
    assert tg.shipped_form(shipped) == shipped
    assert tg.readable_source(shipped) == tg.minified(source.decode())
    assert tg.minified(tg.minified(source.decode())) == tg.minified(source.decode())
    assert len(shipped) < len(source) / 3  # what makes it worth it: ~38 KB instead of ~165 KB
    assert "# " not in tg.readable_source(shipped).replace('"# "', "")  # no comments left (a string aside)


def test_the_shipped_file_runs_the_same_training_with_identical_results(tmp_path, run_script):
    """A smoke run from the readable file, then submit.py --records, then the shipped file it wrote,
    run from the records folder: the same final lines and the same artifact; both count the shipped size."""
    env = {"ITERATIONS": "6", "EVAL_STRIDE": "0", "DATA_PATH": str(SAMPLE), "TOKENIZER_PATH": str(TOKENIZER)}
    readable = run_script(env)
    assert readable.returncode == 0, readable.explain()
    log = tmp_path / "seed1.txt"
    log.write_text(readable.log)
    records = tmp_path / "records"
    argv = [str(log), "--author", "a", "--github-id", "g", "--name", "n", "--code", str(SCRIPT), "--records",
            str(records)]
    assert submit.main(argv) in (0, 1)  # a smoke run is no record; the folder is written either way
    shipped = records / "train_gpt.py"
    assert shipped.read_bytes() == tg.shipped_form(SCRIPT.read_bytes()) and (records / "seed1.txt").exists()
    proc = subprocess.run([sys.executable, str(shipped)], cwd=records, capture_output=True, text=True,
                          timeout=HANG_FACTOR * 300,
                          env={**clean_env(), **env, "RUN_ID": "shipped", "ARTIFACT_PATH": str(tmp_path / "s.ptz")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped_log = (records / "logs" / "shipped.txt").read_text()

    def final(text):
        return [re.sub(r" eval_time_ms:\d+", "", line) for line in text.splitlines()
                if line.startswith(("artifact_bytes:", "final_", "pre_quant", "code:"))]
    lines = final(shipped_log)
    assert lines == [line.replace(f"source_bytes:{len(SCRIPT.read_bytes())}",
                                  f"source_bytes:{len(tg.readable_source(shipped.read_bytes()).encode())}")
                     for line in final(readable.log)]
    assert f"code_bytes:{shipped.stat().st_size} " in readable.log
    assert f"shipped_sha256:{hashlib.sha256(shipped.read_bytes()).hexdigest()}" in readable.log


def test_submit_refuses_a_records_folder_that_holds_a_train_gpt(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    (records / "train_gpt.py").write_text("earlier\n")
    log = REPO / "logs" / "smoke_seed1.txt"
    try:
        submit.main([str(log), "--author", "a", "--github-id", "g", "--name", "n", "--records", str(records)])
    except SystemExit as exc:
        assert "train_gpt.py exists: --records never replaces a file" in str(exc)
    else:
        raise AssertionError("submit.py replaced a records folder's train_gpt.py")
    assert (records / "train_gpt.py").read_text() == "earlier\n"
