# OMP_NUM_THREADS=1 python3 -m pytest -q tests/test_compressors_bench.py
"""bench/compressors.py: both layouts hold exactly the artifact's arrays (byte planes as written, and
each array's native bytes), and a run on an artifact prints one row per method and layout, then the
whole artifacts' sizes as train_gpt.py writes them."""

import importlib.util
import json
import subprocess
import sys

import numpy as np

from conftest import HANG_FACTOR, REPO, clean_env, tiny_hparams, tiny_model
import train_gpt as tg

_spec = importlib.util.spec_from_file_location("bench_compressors", REPO / "bench" / "compressors.py")
compressors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compressors)


def tiny_artifact() -> tuple[dict, dict]:
    h = tiny_hparams(quant_bits_embed=8)
    state = tiny_model(h).state_dict()
    return tg.model_config(h), tg.quantize_state(state, tg.quant_recipes(state, h))


def test_native_layout_holds_each_array_in_its_own_byte_order():
    config, quantized = tiny_artifact()
    planes, native = compressors.artifact_parts(config, quantized)
    assert planes[0] == native[0] and [len(p) for p in planes] == [len(p) for p in native]
    blobs = json.loads(planes[0])["blobs"]
    expected = b"".join(np.ascontiguousarray(quantized[b["name"]]["arrays"][b["part"]]).tobytes() for b in blobs)
    assert b"".join(native[1:]) == expected
    assert b"".join(planes[1:]) != expected  # the fp16 arrays are stored as planes


def test_a_run_on_an_artifact_prints_a_row_per_method_and_layout(tmp_path):
    config, quantized = tiny_artifact()
    path = tmp_path / "tiny.ptz"
    path.write_bytes(tg.serialize_artifact(quantized, config))
    run = subprocess.run([sys.executable, "bench/compressors.py", str(path)], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, timeout=HANG_FACTOR * 300)
    assert run.returncode == 0, run.stderr
    per_part, whole = run.stdout.split("whole artifacts")
    rows = [(line[:20].strip(), line[21:34].strip()) for line in per_part.splitlines()
            if line.startswith(("zstd", "brotli", "lzma"))]
    # the whole artifacts: brotli, ans (and per-group lrzip where it is installed), sizes as written
    sizes = {line[:34].strip(): int(line[34:45]) for line in whole.splitlines()[1:] if line[:1].isalpha() and "vs brotli" in line}
    assert sizes["brotli"] == len(tg.serialize_artifact(quantized, config, "brotli"))
    assert sizes["ans"] == len(tg.serialize_artifact(quantized, config, "ans"))
    assert ("per-group lrzip" in sizes) == bool(compressors.shutil.which("lrzip"))
    names = {"zstd-22", "brotli-11", "brotli-11 lgwin 24", "lzma-9e (xz -9e)"}
    assert sorted(rows) == sorted((n, layout) for n in names for layout in ("byte planes", "native order"))
    base = next(line for line in run.stdout.splitlines() if line.startswith("zstd-22") and "byte planes" in line)
    assert base.split()[4] == "+0"
