"""The one device call (issue 22: sp8192 first): every GPU question in one command of at most 10 minutes.

    python3 bench/gpu_check.py --prepare /work/shared/data    # here, once: fill .devdata/ and .whl/ (git-ignored)
    python3 bench/gpu_check.py --dry-run                      # the plan with its caps, the ms/step estimates,
                                                              # sp8192's evaluation plan
    python3 bench/gpu_check.py --out $OUT --budget-s 540      # on the device (run carry: .whl, .devdata)

Setup installs the carried zstandard, brotli and constriction wheels where they are missing (the device
image lacks them) and unpacks the carried proxy shards (.devdata/, zstd-compressed) into a scratch
folder. Then the steps of PLAN in order, each a subprocess whose cap comes from the time left
(--budget-s less the minimum kept for the later steps that must run); a step that fails or runs out of
time is recorded and the next one runs; a step with less than its minimum left is skipped and says so:

  attention      bench/attn_check.py: sp8192's per-GPU shape within FineWeb-like documents: FlexAttention,
                 torch's varlen_attn, FA3 varlen, SDPA cuDNN with the dense mask, SDPA cuDNN plain causal
  speed:sp8192   bench/speed.py (one GPU, 8 accumulation slices: the 8-GPU per-rank shapes) with the loops
                 off, then on (--recur-at), each phase's ms/step, MFU and peak memory
  ttt:sp8192     bench/ttt_chunk.py: one compiled TTT chunk at the preset's shape, its time and peak memory
  speed:pr1204   bench/speed.py on real proxy tokens, as far as time allows

After every step the results so far are written to --out: summary.md, summary.json and results.tgz
(each step's output and the files it made), so a call cut at its limit still returns what finished. A
peak over 75 GiB (bench/speed.py's H100_LIMIT_GIB) is flagged in the summary: an H100 would not hold it.
Without CUDA the GPU steps are skipped (this is what the tests run here).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
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
sys.path.insert(0, str(REPO / "bench"))  # speed (the memory limit), step_estimate
DEVDATA, WHEELS = REPO / ".devdata", REPO / ".whl"
PROXY_DATA, PROXY_TOKENIZER = "datasets/proxy_sp1024", "tokenizers/proxy_1024_bpe.model"
PROXY_VOCAB = 1024
SHARD_MAGIC, SHARD_VERSION = 20240520, 1  # the challenge's shard header (as train_gpt reads it)
GPU_PRESETS = ("sp8192", "pr1204", "frontier", "pr76")  # the dry run's estimates, those train_gpt defines
WHEELS_NEEDED = {"zstandard": "zstandard==0.25.0", "brotli": "brotli==1.2.1", "constriction": "constriction==0.5.0"}  # module: pip requirement
DEVICE_PYTHON = "3.12"  # the device image's python3 (/work/.library/device/KINDS.md)

# The call's steps, in the order of what issue 22 needs answered first; a step whose preset train_gpt
# lacks is left out. Seconds per step: at most (max_s) and the least worth starting (min_s). Estimates,
# not measurements: no line of this has run on a GPU yet. A cold torch.compile of a full model is
# guessed at 1-2 min on an H100 (the CPU smoke model took 45 s; the compile of sp8192's TTT chunk with
# aot_eager_decomp_partition took ~50 s on this CPU); the speed steps compile three graphs (loops off,
# on, the evaluation's); one sp8192 step on one GPU (8 slices of 48 x 2048) ~0.8-1.2 s (8 x the
# records' 95-140 ms), pr1204's ~0.8 s; FlexAttention's compile ~30-60 s. `reserve`: the steps before
# it leave it its minimum.
PLAN = ("attention", "speed:sp8192", "ttt:sp8192", "speed:pr1204")
CAPS = {"attention": dict(max_s=80, min_s=40, reserve=True),
        "speed:sp8192": dict(max_s=200, min_s=140, reserve=True),
        "ttt:sp8192": dict(max_s=120, min_s=80, reserve=True),
        "speed:pr1204": dict(max_s=120, min_s=90, reserve=False)}
SETUP_S = 20  # the plan's allowance for installing the wheel and unpacking 26 MB of shards (not a cap)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "logs" / "bench" / "gpu_check"),
                   help="results folder (default $OUT, else logs/bench/gpu_check)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wallclock for the whole call, setup included")
    p.add_argument("--speed-steps", type=int, default=16, help="synced timed steps of each speed step")
    p.add_argument("--data", type=Path, default=DEVDATA, help="the carried proxy corpus (.zst shards)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with each step's cap, run nothing")
    p.add_argument("--prepare", type=Path, metavar="SHARED_DATA", default=None,
                   help="here, before the call: copy the compressed proxy corpus from SHARED_DATA into .devdata/ "
                        "and download the zstandard, brotli and constriction wheels for the device's Python into .whl/")
    args = p.parse_args(argv)
    if args.budget_s <= 0 or args.speed_steps < 4:
        p.error("--budget-s must be > 0, --speed-steps >= 4")
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


def one_gpu_env(tg, preset: str, data: Path) -> dict:
    """The environment of a one-GPU run of `preset` with the 8-GPU per-rank shapes: training already
    accumulates 8 slices of one rank's size; evaluation gets 1/8 of VAL_BATCH_SIZE (its windows per
    batch per rank). Real proxy tokens where the preset's vocabulary is the proxy's (1024)."""
    h, _ = tg.hyperparameters_from_env({"PRESET": preset}, True)
    env = {"PRESET": preset, "VAL_BATCH_SIZE": str(max(h.val_batch_size // tg.SLICES_PER_STEP, h.model_eval_seq_len))}
    if h.vocab_size == PROXY_VOCAB:
        env.update(DATA_PATH=str(data / PROXY_DATA), TOKENIZER_PATH=str(data / PROXY_TOKENIZER))
    return env


def attention_step(args, tg, data: Path, work: Path, preset: str) -> dict:
    """sp8192's per-GPU shape (else every GPU preset's), within lognormal documents only."""
    presets = ["--presets", "sp8192"] if "sp8192" in tg.PRESETS else []
    return dict(cmd=[sys.executable, "bench/attn_check.py", *presets, "--cases", "documents", "--documents",
                     "lognormal", "--out", str(work / "attention.json")], env={})


def speed_step(args, tg, data: Path, work: Path, preset: str) -> dict:
    """Half the synced steps with the loops off, half on (where the preset repeats blocks)."""
    env = {**one_gpu_env(tg, preset, data), "WARMUP_STEPS": "3"}
    h, _ = tg.hyperparameters_from_env({"PRESET": preset}, True)
    cmd = [sys.executable, "bench/speed.py", "--tokens", "real" if "DATA_PATH" in env else "synthetic",
           "--steps", str(args.speed_steps), "--pipelined-steps", "6", "--profile-steps", "1",
           "--out", str(work / f"speed_{preset}.json")]
    if h.recur_blocks:
        cmd += ["--recur-at", str(args.speed_steps // 2)]
    return dict(cmd=cmd, env=env)


def ttt_step(args, tg, data: Path, work: Path, preset: str) -> dict:
    out = work / f"ttt_{preset}.json"
    return dict(cmd=[sys.executable, "bench/ttt_chunk.py", "--preset", preset, "--out", str(out)], env={})


STEP_KINDS = {"attention": attention_step, "speed": speed_step, "ttt": ttt_step}


def plan_steps(args, tg, data: Path, work: Path) -> list[dict]:
    """PLAN's steps whose preset train_gpt defines: name, command, environment, caps."""
    steps = []
    for name in PLAN:
        kind, _, preset = name.partition(":")
        if preset and preset not in tg.PRESETS:
            continue
        steps.append(dict(name=name, **STEP_KINDS[kind](args, tg, data, work, preset), **CAPS[name], needs_cuda=True))
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
        command = " ".join([*filter(None, [env]), "python3", *(str(c) for c in step["cmd"][1:])])
        print(f"{step['name']}: cap {cap:.0f} s (min {step['min_s']} s): {command}".replace(str(REPO) + "/", ""))
        left -= cap
        total += cap
    print(f"total: {total:.0f} s of the {budget_s:.0f} s budget (caps; steps that end sooner leave time to the next)")


# sp8192's evaluation at full size on the two splits it may score (train_gpt's eval_plan: its time budget
# line), targets and documents of the split as downloaded (documents: 50,000 each).
EVAL_SPLITS = {"SP8192": (40_540_160, 50_000), "SP8192 CaseOps": (47_851_520, 50_000)}


def eval_plan_lines(tg) -> list[str]:
    """One `eval_plan` line per split from train_gpt's eval_plan(h, num_targets, num_documents), or a line
    saying this train_gpt.py has none (it is being added beside this bench)."""
    if not hasattr(tg, "eval_plan") or "sp8192" not in tg.PRESETS:
        return ["eval_plan: not in this train_gpt.py"]
    h, _ = tg.hyperparameters_from_env({"PRESET": "sp8192"}, True)
    return [f"{split} ({targets:,} targets, {documents:,} documents): {tg.eval_plan(h, targets, documents)}"
            for split, (targets, documents) in EVAL_SPLITS.items()]


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


def memory_figures(memories: list[dict | None]) -> dict:
    """The largest CUDA peak among a step's phases (GiB, allocated and reserved), flagged where it passes
    speed.H100_LIMIT_GIB (an H100 would not hold it)."""
    import speed
    peaks = [m for m in memories if m and "peak_reserved_mib" in m]
    if not peaks:
        return {}
    top = max(peaks, key=lambda m: m["peak_reserved_mib"])
    found = {"peak_allocated_gib": round(top["peak_allocated_mib"] / 1024, 1),
             "peak_reserved_gib": round(top["peak_reserved_mib"] / 1024, 1)}
    if speed.over_h100(top):
        found["FLAG"] = f"peak over {speed.H100_LIMIT_GIB:g} GiB: an H100 would not hold it"
    return found


def attention_figures(work: Path, preset: str) -> dict:
    rows = json.loads((work / "attention.json").read_text())["rows"]
    return {f"{r['case']}/{r['kernel']}": r["status"] + (f", fwd {r['fwd_ms']:.2f} ms, fwd+bwd {r['fwd_bwd_ms']:.2f} ms"
                                                         if "fwd_bwd_ms" in r else "") for r in rows}


def speed_figures(work: Path, preset: str) -> dict:
    r = json.loads((work / f"speed_{preset}.json").read_text())
    t = r["train"]
    found = {"ms_per_step": round(t["ms_per_step_median"], 1), "ms_per_step_1sync":
             round(t.get("pipelined_ms_per_step") or 0, 1), "attention": r["attention_backend"],
             "warmup_s": round(r["warmup_ms"] / 1000, 1), "recompiles_timed": r["compile"]["timed"]["recompiles"],
             "host_syncs_per_step": r["host_syncs"]["count"], "last_loss": round(t["losses"][-1], 4)}
    phases = {label: phase for label, phase in t.get("recurrence", {}).items() if isinstance(phase, dict)}
    for label, phase in phases.items():
        found[f"ms_per_step_{label}"] = round(phase["ms_per_step_median"], 1)
        found[f"mfu_{label}"] = phase["mfu"] and round(100 * phase["mfu"], 1)
        found.update({f"{k}_{label}": v for k, v in memory_figures([phase["memory"]]).items() if k != "FLAG"})
    memories = [*r["memory"].values(), *(phase["memory"] for phase in phases.values())]
    return {**found, **memory_figures(memories)}


def ttt_figures(work: Path, preset: str) -> dict:
    r = json.loads((work / f"ttt_{preset}.json").read_text())
    return {"ms_per_chunk": round(r["chunk"]["ms"], 1), "forward_only_ms": round(r["forward_only"]["ms"], 1),
            "warmup_s": round(r["chunk"]["warmup_s"] + r["forward_only"]["warmup_s"], 1),
            "losses_finite": r["losses_finite"], "forward": r["forward"],
            **memory_figures([r["chunk"]["memory"], r["forward_only"]["memory"]])}


FIGURES = {"attention": attention_figures, "speed": speed_figures, "ttt": ttt_figures}


def figures(step: dict, work: Path) -> dict:
    """The step's headline figures, from the files it wrote (none when it wrote none)."""
    kind, _, preset = step["name"].partition(":")
    try:
        return FIGURES[kind](work, preset) if kind in FIGURES else {}
    except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
        return {"figures": f"unreadable: {exc!r}"}


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
        import step_estimate
        step_estimate.print_estimates([name for name in GPU_PRESETS if name in tg.PRESETS])
        print("\n".join(eval_plan_lines(tg)))
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
