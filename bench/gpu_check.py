"""The one-command GPU check (issue 9): run by bench/gpu_check.sh, which installs a carried zstandard
wheel first. In order, stopping at the first failure with one line `gpu_check: FAILED at <phase>`:

  smoke   PRESET=smoke python3 train_gpt.py, end to end on the GPU (on CPU: the CPU fallback)
  speed   bench/speed.py for every GPU preset train_gpt defines (PRESETS), pr76 first:
          ms/step, tokens/s, MFU, peak memory, attention kernel, compiles, a short profile
  train   train_gpt.py on real tokens (DATA_PATH under --data, the proxy corpus) for every GPU preset
          at equal training tokens, through GPTQ, quantization and both evaluations

Every phase runs as a subprocess under a wallclock budget (--budget-s, 540 s by default: the device
tool allows 10 minutes a command); a phase that would start with less than --min-phase-s left is
skipped and says so. Compile warm-ups take ~1-2 min per preset on an H100 (an estimate: nothing has
been measured there yet), so the whole list needs two or three calls: pick them with --phases and
--presets. Results go to --out-dir (default logs/bench), every file named
gpucheck_<device>_torch<version>_<date>_*, with a summary (.md and .json).

    bash bench/gpu_check.sh                                  # every phase, every GPU preset
    bash bench/gpu_check.sh --phases smoke,speed --presets pr76
    python3 bench/gpu_check.py --dry-run                     # the plan and its commands, runs nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("smoke", "speed", "train")
PHASE_CAP_S = {"smoke": 180, "speed": 200, "train": 240}  # one subprocess, at most
NOT_GPU_PRESETS = ("auto", "smoke")
PROXY_DATA, PROXY_TOKENIZER = "datasets/proxy_sp1024", "tokenizers/proxy_1024_bpe.model"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of smoke,speed,train")
    p.add_argument("--presets", default="", help="comma-separated GPU presets (default: all train_gpt defines)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wallclock for the whole check")
    p.add_argument("--min-phase-s", type=float, default=60.0, help="skip a phase with less than this left")
    p.add_argument("--train-tokens", type=int, default=20 * 524_288,
                   help="training tokens of each train-phase run (ITERATIONS = this / TRAIN_BATCH_TOKENS)")
    p.add_argument("--eval-stride", type=int, default=256, help="EVAL_STRIDE of the train-phase runs")
    p.add_argument("--speed-steps", type=int, default=10, help="bench/speed.py --steps")
    p.add_argument("--data", type=Path, default=REPO / ".devdata", help="the unpacked proxy corpus")
    p.add_argument("--out-dir", type=Path, default=REPO / "logs" / "bench")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown or not args.phases:
        p.error(f"--phases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}")
    args.presets = [x for x in args.presets.split(",") if x]
    if args.budget_s <= 0 or args.train_tokens <= 0 or args.eval_stride < 0 or args.speed_steps < 2:
        p.error("--budget-s and --train-tokens must be > 0, --eval-stride >= 0, --speed-steps >= 2")
    return args


def gpu_presets(tg, wanted: list[str]) -> list[str]:
    """The GPU presets train_gpt defines (its PRESETS table), pr76 first; `wanted` must be among them."""
    names = [n for n in tg.PRESETS if n not in NOT_GPU_PRESETS]
    names.sort(key=lambda n: n != "pr76")
    missing = [n for n in wanted if n not in names]
    if missing:
        raise SystemExit(f"gpu_check: FAILED at setup: unknown preset {missing[0]}; train_gpt has {', '.join(names)}")
    return [n for n in names if n in wanted] if wanted else names


def batch_tokens(tg, preset: str) -> int:
    h, _ = tg.hyperparameters_from_env({"PRESET": preset}, True)
    return h.train_batch_tokens


def file_prefix(device: str, torch_version: str, when: datetime.datetime) -> str:
    """gpucheck_<device>_torch<version>_<date>: only letters, digits, '.', '_' and '-' (what the
    device tool brings back)."""
    slug = lambda text: re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()
    device = slug(device.replace("NVIDIA ", ""))
    return f"gpucheck_{device}_torch{slug(torch_version)}_{when:%Y%m%d-%H%M}"


# -----------------------------------------------------------------------------
# The plan: one step per subprocess, each with its command, environment and output files


def plan_steps(args, tg, prefix: str, scratch: Path) -> list[dict]:
    steps = []
    if "smoke" in args.phases:
        env = {"PRESET": "smoke", "RUN_ID": f"{prefix}_smoke", "ARTIFACT_PATH": str(scratch / "smoke.ptz")}
        steps.append(dict(name="smoke", phase="smoke", env=env, cmd=[sys.executable, "train_gpt.py"],
                          log=f"{prefix}_smoke.txt"))
    presets = gpu_presets(tg, args.presets) if {"speed", "train"} & set(args.phases) else []
    for preset in presets if "speed" in args.phases else []:
        out = args.out_dir / f"{prefix}_speed_{preset}.json"
        steps.append(dict(name=f"speed:{preset}", phase="speed", env={"PRESET": preset}, json=out.name, needs_cuda=True,
                          cmd=[sys.executable, "bench/speed.py", "--steps", str(args.speed_steps),
                               "--pipelined-steps", "5", "--profile-steps", "2", "--eval", "--val-tokens",
                               "500000", "--out", str(out)]))
    data = {"DATA_PATH": str(args.data / PROXY_DATA), "TOKENIZER_PATH": str(args.data / PROXY_TOKENIZER)}
    for preset in presets if "train" in args.phases else []:
        iterations = max(1, round(args.train_tokens / batch_tokens(tg, preset)))
        env = {**data, "PRESET": preset, "RUN_ID": f"{prefix}_train_{preset}", "ITERATIONS": str(iterations),
               "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "3", "TRAIN_LOG_EVERY": "5",
               "EVAL_STRIDE": str(args.eval_stride), "ARTIFACT_PATH": str(scratch / f"{preset}.ptz"),
               # a model of a few dozen steps compresses worse than a trained one: no fitting rounds
               "ARTIFACT_LIMIT_BYTES": "64000000"}
        steps.append(dict(name=f"train:{preset}", phase="train", env=env, cmd=[sys.executable, "train_gpt.py"],
                          needs_cuda=True, needs_data=True, log=f"{prefix}_train_{preset}.txt"))
    return steps


# -----------------------------------------------------------------------------
# Running and reading the results


def as_text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_step(step: dict, timeout_s: float) -> tuple[int | None, float, str]:
    """(exit code, None on timeout; seconds; stdout and stderr)."""
    t0 = time.perf_counter()
    env = {**os.environ, **step["env"], "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(step["cmd"], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = None, as_text(exc.stdout) + as_text(exc.stderr)
    return code, time.perf_counter() - t0, output


LOG_KEYS = ("attention_backend", "step_avg", "train_time_ms", "steps", "peak_memory_allocated_mib",
            "artifact_bytes", "model_bytes", "eval_time_ms")


def figures_from_log(text: str) -> dict:
    """The log lines' key:value figures the summary shows (the last value of each key wins), read
    outside the source of train_gpt.py that the log embeds (its f-strings look like log lines)."""
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
        if line.startswith("warmup:"):
            found["warmup_ms"] = re.search(r"in (\d+)ms", line).group(1)
        if line.startswith("quantize+compress:"):
            found["quantize_ms"] = line.split(":", 1)[1].strip().removesuffix("ms")
        for key, value in re.findall(r"(\w+):(\S+)", line):
            if key in LOG_KEYS:
                found[key] = value
        if "WARNING" in line:
            found["warning"] = line
    return found


def figures_from_speed(result: dict) -> dict:
    t, comp = result["train"], result["compile"]
    mem = result["memory"]["timed_steps"]
    return {"ms_per_step": round(t["ms_per_step_median"], 2), "tokens_per_s_per_gpu": round(t["tokens_per_s_per_gpu"]),
            "mfu_pct": None if t["mfu"] is None else round(100 * t["mfu"], 1),
            "peak_mib": round(mem.get("peak_allocated_mib", mem.get("max_rss_mib", 0))),
            "attention_backend": result.get("attention_backend"), "warmup_s": round(result["warmup_ms"] / 1000, 1),
            "compiled_graphs": comp["warmup"]["graphs"], "recompiles_warmup": comp["warmup"]["recompiles"],
            "recompiles_timed": comp["timed"]["recompiles"],
            "eval_recompiles": result.get("eval", {}).get("compiles", {}).get("recompiles")}


def summary_markdown(header: dict, rows: list[dict]) -> str:
    lines = [f"# GPU check: {header['device']}, torch {header['torch']}, {header['date']}", "",
             f"budget {header['budget_s']:.0f} s, used {header['used_s']:.0f} s; outcome: **{header['outcome']}**", "",
             "| phase | status | seconds | figures |", "|---|---|---|---|"]
    for row in rows:
        figures = ", ".join(f"{k} {v}" for k, v in row.get("figures", {}).items())
        lines.append(f"| {row['name']} | {row['status']} | {row.get('seconds', 0):.0f} | {figures} |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, prefix: str, header: dict, rows: list[dict]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{prefix}_summary.json").write_text(json.dumps({**header, "phases": rows}, indent=1) + "\n")
    path = out_dir / f"{prefix}_summary.md"
    path.write_text(summary_markdown(header, rows))
    return path


def execute(args, steps: list[dict], cuda: bool, prefix: str) -> tuple[str, list[dict], float]:
    """Runs the steps in order; returns (outcome, one row per step, seconds used)."""
    t0, rows, outcome = time.perf_counter(), [], "passed"
    for step in steps:
        left = args.budget_s - (time.perf_counter() - t0)
        row = {"name": step["name"], "env": step["env"], "cmd": " ".join(step["cmd"][1:])}
        rows.append(row)
        if step.get("needs_cuda") and not cuda:
            row["status"] = "skipped: no CUDA"
            continue
        if left < args.min_phase_s:
            row["status"] = f"skipped: {left:.0f} s of the budget left"
            continue
        timeout_s = min(left, PHASE_CAP_S[step["phase"]])
        print(f"gpu_check: {step['name']} (up to {timeout_s:.0f} s)", flush=True)
        code, row["seconds"], output = run_step(step, timeout_s)
        if step.get("log"):
            produced = REPO / "logs" / f"{step['env']['RUN_ID']}.txt"
            if produced.is_file():
                shutil.move(produced, args.out_dir / step["log"])
                row["figures"] = figures_from_log((args.out_dir / step["log"]).read_text())
        if step.get("json") and (args.out_dir / step["json"]).is_file():
            row["figures"] = figures_from_speed(json.loads((args.out_dir / step["json"]).read_text()))
        if code != 0:
            last = [l for l in output.splitlines() if l.strip()][-1:] or ["(no output)"]
            row["status"] = "timeout" if code is None else f"exit {code}"
            row["output_tail"] = output[-4000:]
            print(f"gpu_check: FAILED at {step['name']} ({row['status']} after {row['seconds']:.0f} s): {last[0]}",
                  flush=True)
            outcome = f"failed at {step['name']}"
            break
        row["status"] = "ok"
    return outcome, rows, time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch
    import train_gpt as tg

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    now = datetime.datetime.now(datetime.timezone.utc)
    prefix = file_prefix(device, torch.__version__, now)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        try:
            steps = plan_steps(args, tg, prefix, Path(scratch))
        except tg.RunError as exc:  # a preset train_gpt rejects here
            print(f"gpu_check: FAILED at setup: {exc}", flush=True)
            return 1
        if args.dry_run:
            for step in steps:
                env = " ".join(f"{k}={v}" for k, v in step["env"].items())
                print(f"{step['name']}: {env} python3 {' '.join(step['cmd'][1:])}")
            return 0
        if any(s.get("needs_data") for s in steps) and cuda and not (args.data / PROXY_DATA).is_dir():
            print(f"gpu_check: FAILED at setup: no proxy data at {args.data / PROXY_DATA} (see bench/SPEED.md: "
                  f"unpack.py --train-shards 2 into .devdata, carried)", flush=True)
            return 1
        args.out_dir.mkdir(parents=True, exist_ok=True)
        if not cuda:
            print("gpu_check: no CUDA device: the smoke phase runs on CPU, the GPU phases are skipped", flush=True)
        outcome, rows, used = execute(args, steps, cuda, prefix)
    header = {"device": device, "torch": torch.__version__, "date": f"{now:%Y-%m-%d %H:%M} UTC",
              "budget_s": args.budget_s, "used_s": used, "outcome": outcome}
    path = write_summary(args.out_dir, prefix, header, rows)
    print(summary_markdown(header, rows), end="")
    print(f"gpu_check: wrote {path} and the files beside it named {prefix}_*")
    return 0 if outcome == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
