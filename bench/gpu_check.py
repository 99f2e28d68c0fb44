"""The one device call (issue 16): every GPU question in one command of at most 10 minutes.

    python3 bench/gpu_check.py --prepare /work/shared/data    # here, once: fill .devdata/ and .whl/ (git-ignored)
    python3 bench/gpu_check.py --dry-run                      # the plan: each step with its cap, and the total
    python3 bench/gpu_check.py --out $OUT                     # on the device (run carry: .whl, .devdata)

Setup installs the carried zstandard, brotli and constriction wheels where they are missing (the device
image lacks them; brotli compresses PRESET=pr1204's artifact, constriction PRESET=sp8192's) and
unpacks the carried proxy shards (.devdata/, zstd-compressed) into a scratch folder. Then, in order,
each step a subprocess whose cap comes from the time left (--budget-s less the minimum kept for the
steps after it that must run); a step that fails or runs out of time is recorded and the next one
runs; a step with less than its minimum left is skipped and says so:

  attention      bench/attn_check.py: the candidate kernels at the presets' shapes, checked and timed
  speed:<preset> bench/speed.py on real proxy tokens (one GPU, 8 accumulation slices: the 8-GPU per-rank
                 shapes), the frontier with the recurrence off then on (--recur-at), then pr1204, sp8192
                 and pr76 where train_gpt defines them, each as far as time allows; the per-step losses
                 are a loss curve at equal tokens
  e2e:frontier   train_gpt.py for a few steps on the warm compile cache, through GPTQ, quantization,
                 the artifact, its reload and both evaluations (per-rank evaluation batch as on 8 GPUs)

After every step the results so far are written to --out: summary.md, summary.json and results.tgz
(each step's output and the files it made), so a call cut at its limit still returns what finished.
Without CUDA the GPU steps are skipped (this is what the tests run here).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVDATA, WHEELS = REPO / ".devdata", REPO / ".whl"
PROXY_DATA, PROXY_TOKENIZER = "datasets/proxy_sp1024", "tokenizers/proxy_1024_bpe.model"
PROXY_VOCAB = 1024
SHARD_MAGIC, SHARD_VERSION = 20240520, 1  # the challenge's shard header (as train_gpt reads it)
SPEED_PRESETS = ("frontier", "pr1204", "sp8192", "pr76")  # in this order, those train_gpt defines
WHEELS_NEEDED = {"zstandard": "zstandard==0.25.0", "brotli": "brotli==1.2.1", "constriction": "constriction==0.5.0"}  # module: pip requirement
DEVICE_PYTHON = "3.12"  # the device image's python3 (/work/.library/device/KINDS.md)

# Seconds per step: at most (max_s) and the least worth starting (min_s). Estimates, not measurements:
# no line of this has run on a GPU yet. A cold torch.compile of the frontier is guessed at 1-2 min on
# an H100 (the CPU smoke model took 45 s); one frontier step on one GPU (8 slices of 98,304 tokens)
# at ~0.7-1 s; zstd-22 of the artifact at 20-60 s (39-61 s on one loaded core here). `reserve`: the
# steps before it leave it its minimum.
CAPS = {"attention": dict(max_s=90, min_s=30, reserve=True),
        "speed:frontier": dict(max_s=230, min_s=120, reserve=True),
        "speed": dict(max_s=150, min_s=90, reserve=False),
        "e2e": dict(max_s=200, min_s=130, reserve=True)}
SETUP_S = 20  # the plan's allowance for installing the wheel and unpacking 26 MB of shards (not a cap)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "logs" / "bench" / "gpu_check"),
                   help="results folder (default $OUT, else logs/bench/gpu_check)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wallclock for the whole call, setup included")
    p.add_argument("--speed-steps", type=int, default=16, help="synced timed steps of each speed step")
    p.add_argument("--e2e-steps", type=int, default=24, help="ITERATIONS of the end-to-end run")
    p.add_argument("--data", type=Path, default=DEVDATA, help="the carried proxy corpus (.zst shards)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with each step's cap, run nothing")
    p.add_argument("--prepare", type=Path, metavar="SHARED_DATA", default=None,
                   help="here, before the call: copy the compressed proxy corpus from SHARED_DATA into .devdata/ "
                        "and download the zstandard, brotli and constriction wheels for the device's Python into .whl/")
    args = p.parse_args(argv)
    if args.budget_s <= 0 or args.speed_steps < 4 or args.e2e_steps < 2:
        p.error("--budget-s must be > 0, --speed-steps >= 4, --e2e-steps >= 2")
    return args


# -----------------------------------------------------------------------------
# Preparation (here) and setup (there)


def prepare(shared: Path, data: Path = DEVDATA, wheels: Path = WHEELS) -> None:
    """Copies the .zst shards and the tokenizer (as they are: they are unpacked on the device) and
    downloads the zstandard, brotli and constriction wheels for the device's CPython on x86-64 Linux."""
    (data / PROXY_DATA).mkdir(parents=True, exist_ok=True)
    (data / "tokenizers").mkdir(parents=True, exist_ok=True)
    for f in sorted((shared / PROXY_DATA).glob("*.bin.zst")):
        shutil.copy2(f, data / PROXY_DATA / f.name)
    shutil.copy2(shared / PROXY_TOKENIZER, data / PROXY_TOKENIZER)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(wheels), *WHEELS_NEEDED.values()],
                   check=True)
    size = sum(f.stat().st_size for folder in (data, wheels) for f in folder.rglob("*") if f.is_file())
    print(f"gpu_check: prepared {data} and {wheels}: {size / 2**20:.1f} MiB to carry (run carry: .whl, .devdata)")


def ensure_installed(module: str, wheels: Path = WHEELS, site: Path = Path("/tmp/gpu_check_site")) -> str:
    """Imports `module`, installing its carried wheel first where it is missing; the children find it
    through PYTHONPATH. Returns what was done."""
    try:
        importlib.import_module(module)
        return f"{module} present"
    except ImportError:
        pass
    found = sorted(f for f in wheels.glob("*.whl") if f.name.lower().startswith(f"{module}-"))
    if not found:
        raise RuntimeError(f"{module} is not installed and no {module} wheel was carried in {wheels}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), str(found[-1])], check=True)
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    importlib.import_module(module)
    return f"installed {found[-1].name}"


def unpack_shard(data: bytes, name: str) -> bytes:
    """A decompressed shard, its header checked: magic, version, and a token count that fits the bytes."""
    import zstandard
    raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 31)
    magic, version, count = struct.unpack("<3i", raw[:12]) if len(raw) >= 12 else (0, 0, -1)
    if magic != SHARD_MAGIC or version != SHARD_VERSION or len(raw) != 256 * 4 + 2 * count:
        raise RuntimeError(f"{name}: not a shard of the challenge's format after unpacking")
    return raw


def unpack_corpus(source: Path, target: Path) -> int:
    """source/{datasets,tokenizers} (.zst shards) -> target, shards unpacked; returns the tokens written."""
    shards = sorted((source / PROXY_DATA).glob("*.bin.zst"))
    if not shards or not (source / PROXY_TOKENIZER).is_file():
        raise RuntimeError(f"no proxy corpus in {source} (*.bin.zst and {PROXY_TOKENIZER}): run --prepare here first")
    (target / PROXY_DATA).mkdir(parents=True, exist_ok=True)
    (target / "tokenizers").mkdir(parents=True, exist_ok=True)
    tokens = 0
    for f in shards:
        raw = unpack_shard(f.read_bytes(), f.name)
        (target / PROXY_DATA / f.name.removesuffix(".zst")).write_bytes(raw)
        tokens += (len(raw) - 1024) // 2
    shutil.copy2(source / PROXY_TOKENIZER, target / PROXY_TOKENIZER)
    return tokens


# -----------------------------------------------------------------------------
# The plan


def speed_presets(tg) -> list[str]:
    return [name for name in SPEED_PRESETS if name in tg.PRESETS]


def one_gpu_env(tg, preset: str, data: Path) -> dict:
    """The environment of a one-GPU run of `preset` with the 8-GPU per-rank shapes: training already
    accumulates 8 slices of one rank's size; evaluation gets 1/8 of VAL_BATCH_SIZE (its windows per
    batch per rank). Real proxy tokens where the preset's vocabulary is the proxy's (1024)."""
    h, _ = tg.hyperparameters_from_env({"PRESET": preset}, True)
    env = {"PRESET": preset, "VAL_BATCH_SIZE": str(max(h.val_batch_size // tg.SLICES_PER_STEP, h.model_eval_seq_len))}
    if h.vocab_size == PROXY_VOCAB:
        env.update(DATA_PATH=str(data / PROXY_DATA), TOKENIZER_PATH=str(data / PROXY_TOKENIZER))
    return env


def plan_steps(args, tg, data: Path, work: Path) -> list[dict]:
    """The steps in order: name, command, environment, caps, and the files each leaves in `work`."""
    python = sys.executable
    steps = [dict(name="attention", cmd=[python, "bench/attn_check.py", "--out", str(work / "attention.json")],
                  env={}, **CAPS["attention"])]
    for preset in speed_presets(tg):
        env = {**one_gpu_env(tg, preset, data), "WARMUP_STEPS": "3"}
        h, _ = tg.hyperparameters_from_env({"PRESET": preset}, True)
        cmd = [python, "bench/speed.py", "--tokens", "real" if "DATA_PATH" in env else "synthetic",
               "--steps", str(args.speed_steps), "--pipelined-steps", "6", "--profile-steps", "1",
               "--out", str(work / f"speed_{preset}.json")]
        if h.recur_blocks:  # half the synced steps without the repeated blocks, half with them
            cmd += ["--recur-at", str(args.speed_steps // 2)]
        steps.append(dict(name=f"speed:{preset}", cmd=cmd, env=env, **CAPS.get(f"speed:{preset}", CAPS["speed"])))
    env = {**one_gpu_env(tg, "frontier", data), "RUN_ID": "gpu_check_e2e_frontier", "ITERATIONS": str(args.e2e_steps),
           "WARMUP_STEPS": "3", "MAX_WALLCLOCK_SECONDS": "0", "TRAIN_LOG_EVERY": "4",
           "ARTIFACT_PATH": str(work / "e2e_frontier.ptz"),
           # a model of a few dozen steps compresses worse than a trained one: no fitting rounds
           "ARTIFACT_LIMIT_BYTES": "64000000",
           # one batch of 8 sampled calibration sequences: each GPU's share of the 8-GPU run's 64
           "GPTQ_CALIB_TOKENS": "0", "GPTQ_SELFGEN_SEQS": "8"}
    steps.append(dict(name="e2e:frontier", cmd=[python, "train_gpt.py"], env=env,
                      moves={REPO / "logs" / "gpu_check_e2e_frontier.txt": "e2e_frontier.txt"}, **CAPS["e2e"]))
    for step in steps:
        step["needs_cuda"] = True
    return steps


def step_cap(step: dict, left: float, later: list[dict]) -> float:
    """The step's timeout: its maximum, or the time left less the minimum of every later step that
    must run (reserve)."""
    return min(step["max_s"], left - sum(s["min_s"] for s in later if s["reserve"]))


def print_plan(steps: list[dict], budget_s: float, setup_s: float) -> None:
    """Each step with the cap it gets when every step before it uses its whole cap; the total."""
    left, total = budget_s - setup_s, setup_s
    print(f"setup: cap {setup_s:.0f} s: install the carried wheels if missing; "
          f"unpack .devdata/*.zst")
    for i, step in enumerate(steps):
        cap = step_cap(step, left, steps[i + 1:])
        env = " ".join(f"{k}={v}" for k, v in step["env"].items())
        if cap < step["min_s"]:
            print(f"{step['name']}: skipped in this plan ({max(cap, 0):.0f} s left for it, needs {step['min_s']} s)")
            continue
        print(f"{step['name']}: cap {cap:.0f} s (min {step['min_s']} s): {env} python3 "
              f"{' '.join(str(c) for c in step['cmd'][1:])}".replace(str(REPO) + "/", ""))
        left -= cap
        total += cap
    print(f"total: {total:.0f} s of the {budget_s:.0f} s budget (caps; steps that end sooner leave time to the next)")


# -----------------------------------------------------------------------------
# Running, and writing the results after every step


def run_step(step: dict, timeout_s: float, log_path: Path) -> tuple[int | None, float]:
    """Runs the step's command with its output to log_path; on timeout, ends its whole process group
    (compile workers too). Returns (exit code or None on timeout, seconds)."""
    t0 = time.monotonic()
    env = {**os.environ, **step["env"], "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(step["cmd"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, time.monotonic() - t0


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []
    return lines[-1][:300] if lines else "(no output)"


def figures(step: dict, work: Path) -> dict:
    """The step's headline figures, from the files it wrote (none when it wrote none)."""
    try:
        if step["name"] == "attention":
            rows = json.loads((work / "attention.json").read_text())["rows"]
            return {f"{r['case']}/{r['kernel']}": r["status"] + (f", fwd+bwd {r['fwd_bwd_ms']:.2f} ms"
                                                                 if "fwd_bwd_ms" in r else "") for r in rows}
        if step["name"].startswith("speed:"):
            r = json.loads((work / f"speed_{step['name'][6:]}.json").read_text())
            t = r["train"]
            found = {"ms_per_step": round(t["ms_per_step_median"], 1), "ms_per_step_1sync":
                     round(t.get("pipelined_ms_per_step") or 0, 1), "attention": r["attention_backend"],
                     "warmup_s": round(r["warmup_ms"] / 1000, 1), "recompiles_timed": r["compile"]["timed"]["recompiles"],
                     "host_syncs_per_step": r["host_syncs"]["count"], "last_loss": round(t["losses"][-1], 4)}
            for label, phase in t.get("recurrence", {}).items():
                if isinstance(phase, dict):
                    found[f"ms_per_step_{label}"] = round(phase["ms_per_step_median"], 1)
            return found
        if step["name"].startswith("e2e:"):
            return figures_from_log((work / "e2e_frontier.txt").read_text())
    except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
        return {"figures": f"unreadable: {exc!r}"}
    return {}


LOG_KEYS = ("attention_backend", "step_avg", "train_time_ms", "steps", "peak_memory_allocated_mib",
            "artifact_bytes", "model_bytes", "eval_time_ms")


def figures_from_log(text: str) -> dict:
    """The log lines' key:value figures (the last value of each key wins), read outside the source of
    train_gpt.py that the log embeds (its f-strings look like log lines)."""
    found, in_source = {}, False
    for line in text.splitlines():
        if line.startswith("====== source ") or line == "====== end source ======":
            in_source = line.startswith("====== source ")
            continue
        if in_source:
            continue
        for label in ("pre_quant", "final_roundtrip", "final_sliding"):
            if line.startswith(label + " "):
                found[f"{label}_val_bpb"] = re.search(r"val_bpb:(\S+)", line).group(1)
        for label, pattern in (("warmup_ms", r"^warmup:.* in (\d+)ms"), ("quantize_ms", r"^quantize\+compress: (\d+)ms"),
                               ("gptq_calibration_ms", r"^gptq_calibration:.* in (\d+)ms")):
            match = re.search(pattern, line)
            if match:
                found[label] = match.group(1)
        for key, value in re.findall(r"(\w+):(\S+)", line):
            if key in LOG_KEYS:
                found[key] = value
        if "WARNING" in line or line.startswith("error:"):
            found["warning"] = line
    return found


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def summary_markdown(header: dict, rows: list[dict]) -> str:
    lines = [f"# GPU check: {header['device']}, torch {header['torch']}, {header['date']}", "",
             f"budget {header['budget_s']:.0f} s, used {header['used_s']:.0f} s; {header['outcome']}", "",
             "| step | status | cap s | seconds | figures |", "|---|---|---|---|---|"]
    for row in rows:
        shown = ", ".join(f"{k} {v}" for k, v in row.get("figures", {}).items())
        lines.append(f"| {row['name']} | {row['status']} | {row.get('cap_s', '')} | {row.get('seconds', '')} | {shown} |")
    return "\n".join(lines) + "\n"


def publish(out: Path, work: Path, header: dict, rows: list[dict]) -> None:
    """summary.md, summary.json and results.tgz (everything in `work` but artifacts) into `out`, each
    replaced whole, so that what comes back is never half written."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "summary.json", (json.dumps({**header, "steps": rows}, indent=1) + "\n").encode())
    write_atomically(out / "summary.md", summary_markdown(header, rows).encode())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for f in sorted(work.iterdir()):
            if f.is_file() and f.suffix not in (".ptz", ".tmp"):
                tar.add(f, arcname=f.name)
    write_atomically(out / "results.tgz", buffer.getvalue())


def execute(steps: list[dict], budget_s: float, out: Path, work: Path, header: dict, cuda: bool,
            started: float) -> list[dict]:
    """Runs the steps in order under the budget (counted from `started`, time.monotonic()); every
    outcome is recorded and the next step runs; the results are published after each step."""
    rows = []
    for i, step in enumerate(steps):
        row = {"name": step["name"], "env": step["env"], "cmd": " ".join(str(c) for c in step["cmd"][1:])}
        rows.append(row)
        left = budget_s - (time.monotonic() - started)
        cap = step_cap(step, left, steps[i + 1:])
        if step.get("needs_cuda") and not cuda:
            row["status"] = "skipped: no CUDA"
        elif cap < step["min_s"]:
            row["status"] = f"skipped: {max(cap, 0):.0f} s left for it, needs {step['min_s']} s"
        else:
            row["cap_s"] = round(cap)
            print(f"gpu_check: {step['name']} (cap {cap:.0f} s, {left:.0f} s left)", flush=True)
            log_path = work / f"{step['name'].replace(':', '_')}.log"
            code, seconds = run_step(step, cap, log_path)
            row["seconds"] = round(seconds, 1)
            row["status"] = "ok" if code == 0 else ("timeout" if code is None else f"exit {code}")
            for produced, name in step.get("moves", {}).items():
                if Path(produced).is_file():
                    shutil.move(produced, work / name)
            row["figures"] = figures(step, work)
            if code != 0:
                row["last_line"] = last_line(log_path)
            print(f"gpu_check: {step['name']}: {row['status']} after {seconds:.0f} s" +
                  (f": {row['last_line']}" if code != 0 else ""), flush=True)
        header = {**header, "used_s": time.monotonic() - started,
                  "outcome": f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} steps so far ok"}
        publish(out, work, header, rows)
    return rows


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return 0
    setup_notes = []
    if not args.dry_run:
        try:
            setup_notes += [ensure_installed(module) for module in WHEELS_NEEDED]
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"gpu_check: FAILED at setup: {exc}", flush=True)
            return 1
    sys.path.insert(0, str(REPO))
    import torch
    import train_gpt as tg

    work = Path(tempfile.gettempdir()) / "gpu_check"  # scratch: unpacked data, each step's files
    data = work / "data"
    steps = plan_steps(args, tg, data, work)
    if args.dry_run:
        print_plan(steps, args.budget_s, setup_s=SETUP_S)
        return 0
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    header = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "budget_s": args.budget_s}
    try:
        tokens = unpack_corpus(args.data, data)
        setup_notes.append(f"unpacked {tokens:,} proxy tokens")
    except (RuntimeError, OSError) as exc:  # the speed steps fall back to nothing: say so, run the rest
        setup_notes.append(f"no proxy data: {exc}")
    print(f"gpu_check: {device}, torch {torch.__version__}; setup: {'; '.join(setup_notes)} "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    header["setup"] = "; ".join(setup_notes)
    rows = execute(steps, args.budget_s, args.out, work, header, cuda, started)
    print(summary_markdown({**header, "used_s": time.monotonic() - started,
                            "outcome": f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} steps ok"}, rows),
          end="")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["status"] in ("ok", "skipped: no CUDA") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
