"""Compare configurations of train_gpt.py: named variants against a base, over seeds, paired by seed.

    OMP_NUM_THREADS=1 python3 bench/ablate.py bench/sweeps/proxy_pr76.json \
        --data /tmp/proxy/datasets/proxy_sp1024 --tokenizer /tmp/proxy/tokenizers/proxy_1024_bpe.model
    python3 bench/ablate.py SPEC.json [--seeds 1,2,3] [--jobs N] [--effect 0.003]

A spec is a JSON file: {"base": {ENV: value}, "variants": {name: {ENV: value}}, "seeds": [...]}.
Every (variant, seed) runs train_gpt.py (through bench/lab.py, for its checkpoints) as a subprocess
with the base's settings, the variant's overrides and SEED (plus the variant's SEED_OFFSET, the tool's own key: {"SEED_OFFSET":
1000} is the base on other seeds, a null variant for calibrating the test). A variant that changes only what happens after training (averaging,
quantization, evaluation: lab.training_config() is the base's) is not retrained: the base run
of the same seed writes a checkpoint (CHECKPOINT_OUT, tracking every averaging such variants need in
AVERAGE_ALSO) and the variant is scored from it (FROM_CHECKPOINT); bench/lab.py guarantees the
result is the one a separate full run would give.

Finished runs are cached under logs/ablate/runs/<key>/ (log, result, checkpoint), the key a hash of
the run's settings, its seed and the bytes of lab.py and train_gpt.py: a killed sweep resumes where it stopped, and
sweeps sharing a base share its runs. A failed run is reported with its error line; the others go on.

Results: logs/ablate/<spec name>/results.json, results.md and bpb.png (matplotlib optional): per
variant the pre-quantization, roundtrip and sliding val_bpb, artifact bytes, steps, tokens, step
time, and for the score (sliding if logged, else roundtrip) the mean delta against the base paired
by seed, its spread, a one-sided paired t-test p-value (H1: the variant is better) and the seeds the
observed spread would need to resolve --effect (docs/lab.md, "Ablations", has the formulas).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import submit  # noqa: E402  (the log reader and the t distribution)
import train_gpt as tg  # noqa: E402  (the config)
import lab  # noqa: E402  (which settings act only after training; checkpoints)

SCRIPT = REPO / "bench" / "lab.py"
OUT_ROOT = REPO / "logs" / "ablate"
ALPHA, POWER = 0.05, 0.8  # for the seeds needed: a one-sided test at 5% that finds the effect 80% of the time
# Set per run by this tool and not part of a run's identity (SEED is set by it too, and is).
PLUMBING = ("RUN_ID", "ARTIFACT_PATH", *lab.LAB_SETTINGS)


class SpecError(Exception):
    """A spec or argument this tool cannot use: one line, exit 2."""


# -----------------------------------------------------------------------------
# The sweep: a spec, and one planned run per (variant, seed)


@dataclasses.dataclass
class Spec:
    name: str
    base: dict[str, str]
    variants: dict[str, dict[str, str]]  # "base" first, with no overrides
    seeds: list[int]


def load_spec(path: Path, data: str | None, tokenizer: str | None, seeds: list[int] | None) -> Spec:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc})") from None
    if (not isinstance(raw, dict) or set(raw) - {"base", "variants", "seeds"} or "base" in raw.get("variants", {})
            or "seeds" not in raw and not seeds):
        raise SpecError(f"{path}: expected {{\"base\": {{...}}, \"variants\": {{name: {{...}}}}, \"seeds\": [...]}}")
    base = {k: str(v) for k, v in raw.get("base", {}).items()}
    base.update({k: v for k, v in (("DATA_PATH", data), ("TOKENIZER_PATH", tokenizer)) if v})
    variants = {"base": {}, **{name: {k: str(v) for k, v in over.items()} for name, over in raw.get("variants", {}).items()}}
    for name, over in {"the base": base, **variants}.items():
        if set(over) & {*PLUMBING, "SEED"}:
            raise SpecError(f"{path}: {name} sets {sorted(set(over) & {*PLUMBING, 'SEED'})}, which this tool sets")
    return Spec(path.stem, base, variants, seeds or [int(s) for s in raw["seeds"]])


@dataclasses.dataclass
class Planned:
    variant: str
    seed: int  # the sweep's seed, which pairs it with the base (SEED_OFFSET may make env's differ)
    env: dict[str, str]  # the spec's settings for this run (base + overrides + SEED)
    key: str
    base_key: str | None = None  # set for a within-run variant: scored from that run's checkpoint


def run_key(env: dict[str, str], code_hash: str, base_key: str | None) -> str:
    identity = {"env": {k: v for k, v in sorted(env.items()) if k not in PLUMBING},
                "code": code_hash, "from": base_key}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def config_of(env: dict[str, str]) -> tg.Hyperparameters | None:
    """train_gpt's config for these settings; None if train_gpt would refuse them (the run will say why)."""
    try:
        return tg.hyperparameters_from_env(env, torch.cuda.is_available())[0]
    except tg.RunError:
        return None


def plan(spec: Spec, code_hash: str) -> tuple[list[Planned], dict[str, set[str]]]:
    """The runs, base first per seed, and per base key the averagings its checkpoint must track."""
    runs, needs = [], {}
    for seed in spec.seeds:
        base_env = {**spec.base, "SEED": str(seed)}
        base_key, base_config = run_key(base_env, code_hash, None), config_of(base_env)
        for variant, overrides in spec.variants.items():
            env = {**base_env, **overrides}
            if "SEED_OFFSET" in env:  # a null variant: the base on other seeds, paired with the base's
                env["SEED"] = str(seed + int(env.pop("SEED_OFFSET")))
            config = config_of(env)
            within = (variant != "base" and None not in (base_config, config)
                      and lab.training_config(config) == lab.training_config(base_config))
            if within:
                needs.setdefault(base_key, set()).add(lab.own_averager(config))
            runs.append(Planned(variant, seed, env, run_key(env, code_hash, base_key if within else None),
                                base_key if within else None))
    return runs, needs


# -----------------------------------------------------------------------------
# Running one (variant, seed), or finding it done


def subprocess_env(env: dict[str, str], threads: int) -> dict[str, str]:
    """The caller's environment without any train_gpt setting (a stray one would change every run)."""
    clean = {k: v for k, v in os.environ.items() if tg.resembled_setting(k) is None and k not in lab.LAB_SETTINGS}
    return {**clean, "OMP_NUM_THREADS": str(threads), **env}


def read_cached(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None


def usable(run_dir: Path, needs: set[str]) -> dict | None:
    """The cached result of a finished run that, where within-run variants need it, has a
    checkpoint tracking their averaging; else None."""
    cached = read_cached(run_dir)
    if not cached or cached["status"] != "ok":
        return None
    tracking = cached.get("checkpoint") and (run_dir / "checkpoint.pt").exists() and needs <= set(cached["tracked"])
    return cached if not needs or tracking else None


def execute(run: Planned, script: Path, runs_root: Path, needs: set[str], threads: int) -> dict:
    """Runs train_gpt.py for one (variant, seed); writes and returns its result."""
    run_dir = runs_root / run.key
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**run.env, "RUN_ID": f"ablate_{run.key}", "ARTIFACT_PATH": str(run_dir / "model.ptz")}
    tracked = None
    if needs:  # a base run that within-run variants are scored from
        previous = read_cached(run_dir) or {}
        config = config_of(run.env)
        also = sorted((needs | set(previous.get("tracked") or ())) - {lab.own_averager(config), "none"})
        env.update(CHECKPOINT_OUT=str(run_dir / "checkpoint.pt"), AVERAGE_ALSO=",".join(also))
        tracked = sorted({lab.own_averager(config), "none", *also})
    if run.base_key:
        env["FROM_CHECKPOINT"] = str(runs_root / run.base_key / "checkpoint.pt")
    (run_dir / "result.json").unlink(missing_ok=True)  # a re-run killed half way is not done
    log_path = script.parent.parent / "logs" / f"{env['RUN_ID']}.txt"  # train_gpt.py's logs/
    # This run replaces the cache's own files on purpose; train_gpt.py never replaces an output.
    for path in (log_path, run_dir / "model.ptz", Path(env.get("CHECKPOINT_OUT", run_dir / "model.ptz"))):
        path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], env=subprocess_env(env, threads), cwd=run_dir,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if log_path.exists():
        log_path.replace(run_dir / "train.log")
    result = dict(variant=run.variant, seed=run.seed, env=run.env, seconds=seconds, key=run.key,
                  within_run=run.base_key is not None)
    if proc.returncode != 0:
        return {**result, "status": "failed", "error": error_line(proc)}
    try:
        metrics = collect_metrics(run_dir / "train.log")
    except (submit.Incomplete, submit.UsageError, OSError) as exc:
        return {**result, "status": "failed", "error": f"unreadable log: {exc}"}
    result.update(status="ok", metrics=metrics, checkpoint=tracked is not None, tracked=tracked)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))  # written last: a killed run is not done
    return result


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [f"exit status {proc.returncode}, no output"])[-1][:500]


def collect_metrics(log_path: Path) -> dict:
    """The numbers of one log, read with submit.py's reader."""
    log = submit.read_log(log_path)
    run = submit.measure(log)
    _, _, body = submit.split_source(log_path.read_text(encoding="utf-8"))
    step_avgs = re.findall(r"^step:\d+/\d+ .*step_avg:([\d.]+)ms", body, re.M)
    sliding = log.lines.get("final_sliding", {}).get("val_bpb")
    return dict(pre_quant_bpb=run.pre_quant_val_bpb, roundtrip_bpb=submit.number(log.lines["final_roundtrip"]["val_bpb"]),
                sliding_bpb=submit.number(sliding) if sliding else None, score_bpb=run.val_bpb,
                artifact_bytes=run.bytes_total, steps=run.steps,
                tokens=run.steps * int(log.hparams["TRAIN_BATCH_TOKENS"]),
                step_ms=float(step_avgs[-1]) if step_avgs else None, val_tokens=run.val_tokens)


# -----------------------------------------------------------------------------
# Statistics: paired differences against the base, one-sided t-test, seeds needed


def t_cdf(t: float, df: float) -> float:
    return 1.0 - submit.t_sf(t, df)


def t_quantile(q: float, df: float) -> float:
    """x with P(T <= x) = q, by bisection on submit.py's t distribution."""
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def seeds_needed(sd: float | None, effect: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The least n >= 2 with sqrt(n) * effect / sd >= t_(1-alpha, n-1) + t_(power, n-1): a one-sided
    paired t-test at level alpha detects a true mean difference `effect` with probability ~power."""
    if sd is None:
        return None
    if sd == 0:
        return 2
    z = statistics.NormalDist()
    n = max(2, math.ceil(((z.inv_cdf(1 - alpha) + z.inv_cdf(power)) * sd / effect) ** 2))  # t needs at least this
    while math.sqrt(n) * effect / sd < t_quantile(1 - alpha, n - 1) + t_quantile(power, n - 1):
        n += 1
    return n


def paired_stats(base: dict[int, float], variant: dict[int, float], effect: float) -> dict:
    """Delta = variant - base per seed (negative: the variant is better)."""
    seeds = sorted(set(base) & set(variant))
    deltas = [variant[s] - base[s] for s in seeds]
    n = len(deltas)
    mean = statistics.fmean(deltas) if n else None
    sd = statistics.stdev(deltas) if n > 1 else None
    if sd is None:
        p = None
    elif sd == 0:
        p = 0.0 if mean < 0 else 1.0
    else:
        p = t_cdf(mean / (sd / math.sqrt(n)), n - 1)  # H1: mean delta < 0
    return dict(pairs=n, mean_delta=mean, sd_delta=sd, p_better=p, seeds_needed=seeds_needed(sd, effect))


def summarize(spec: Spec, results: list[dict], effect: float) -> dict:
    table = {}
    ok = {(r["variant"], r["seed"]): r["metrics"] for r in results if r["status"] == "ok"}
    base_scores = {seed: m["score_bpb"] for (v, seed), m in ok.items() if v == "base"}
    for variant, overrides in spec.variants.items():
        mine = {seed: m for (v, seed), m in ok.items() if v == variant}
        means = {key: statistics.fmean(values) if (values := [m[key] for m in mine.values() if m[key] is not None])
                 else None for key in ("pre_quant_bpb", "roundtrip_bpb", "sliding_bpb", "score_bpb", "artifact_bytes",
                                       "steps", "tokens", "step_ms")}
        table[variant] = dict(
            overrides=overrides, within_run=any(r["within_run"] for r in results if r["variant"] == variant),
            mean=means, per_seed={seed: m["score_bpb"] for seed, m in sorted(mine.items())},
            failed={r["seed"]: r["error"] for r in results if r["variant"] == variant and r["status"] != "ok"},
            stats=None if variant == "base" else paired_stats(base_scores, {s: m["score_bpb"] for s, m in mine.items()},
                                                               effect))
    return dict(name=spec.name, base=spec.base, seeds=spec.seeds, effect=effect, alpha=ALPHA, power=POWER,
                variants=table)


# -----------------------------------------------------------------------------
# Outputs


def fmt(value, spec: str = ".5f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    out = [f"# ablation {summary['name']}: seeds {', '.join(map(str, summary['seeds']))}", "",
           "| variant | how | pre-quant bpb | roundtrip bpb | sliding bpb | delta vs base | sd of delta | p(better) "
           f"| seeds for {summary['effect']} | bytes | steps | tokens | step ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary["variants"].items():
        mean, stats = row["mean"], row["stats"] or {}
        how = "within-run" if row["within_run"] else "trained"
        out.append(f"| {name} | {how} | {fmt(mean['pre_quant_bpb'])} | {fmt(mean['roundtrip_bpb'])} | "
                   f"{fmt(mean['sliding_bpb'])} | {fmt(stats.get('mean_delta'), '+.5f')} | {fmt(stats.get('sd_delta'))} | "
                   f"{fmt(stats.get('p_better'), '.3f')} | {fmt(stats.get('seeds_needed'), 'd')} | "
                   f"{fmt(mean['artifact_bytes'], ',.0f')} | {fmt(mean['steps'], '.0f')} | {fmt(mean['tokens'], ',.0f')} | "
                   f"{fmt(mean['step_ms'], '.0f')} |")
    out += ["", "Means over the seeds that finished. delta = variant - base score (sliding if logged, else "
            "roundtrip), paired by seed; p(better): one-sided paired t-test, H1 the variant's bpb is lower; "
            f"seeds: how many a one-sided test at {summary['alpha']} with power {summary['power']} would need to "
            "resolve the effect at the observed sd. within-run: scored from the base run's checkpoint."]
    for name, row in summary["variants"].items():
        out += [f"- {name}: {'; '.join(f'{k}={v}' for k, v in row['overrides'].items()) or '(the base)'}"]
        out += [f"  - seed {seed} FAILED: {error}" for seed, error in row["failed"].items()]
    return "\n".join(out) + "\n"


def plot(summary: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot: skipped, matplotlib is not installed; {path} not written"
    names = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4.5))
    for i, seed in enumerate(summary["seeds"]):
        xs = [x for x, name in enumerate(names) if seed in summary["variants"][name]["per_seed"]]
        ys = [summary["variants"][names[x]]["per_seed"][seed] for x in xs]
        ax.plot([x + 0.06 * (i - len(summary["seeds"]) / 2) for x in xs], ys, "o", label=f"seed {seed}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(ylabel="val_bpb (score)", title=f"ablation {summary['name']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: wrote {path}"


def write_outputs(summary: dict, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(summary))
    return [f"wrote {out_dir / 'results.json'} and results.md", plot(summary, out_dir / "bpb.png")]


# -----------------------------------------------------------------------------
# Main


def run_sweep(spec: Spec, script: Path = SCRIPT, out_root: Path = OUT_ROOT, jobs: int = 1, effect: float = 0.003,
              say=print) -> dict:
    """Runs what is not cached (trainings first, then the within-run variants), writes the outputs."""
    script_files = (script, script.parent.parent / "train_gpt.py")  # the lab and the script it runs
    code_hash = hashlib.sha256(b"".join(p.read_bytes() for p in script_files if p.exists())).hexdigest()
    runs, needs = plan(spec, code_hash)
    runs_root = out_root / "runs"
    cores = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    threads = max(1, cores // jobs)
    done = {}
    for run in runs:
        cached = usable(runs_root / run.key, needs.get(run.key, set()))
        if cached:
            done[run.key] = cached
    todo = [run for run in runs if run.key not in done]
    say(f"ablate {spec.name}: {len(runs)} runs ({len(runs) - len(todo)} cached, "
        f"{sum(r.base_key is not None for r in todo)} of the rest within-run), {jobs} at a time, {threads} thread(s) each")
    timings: dict[bool, list[float]] = {False: [], True: []}
    for phase in (False, True):  # trainings, then the variants scored from their checkpoints
        batch = [run for run in todo if (run.base_key is not None) == phase]
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
        try:
            futures = []
            for run in batch:
                if phase and done.get(run.base_key, {}).get("status") != "ok":
                    done[run.key] = dict(variant=run.variant, seed=run.seed, env=run.env, key=run.key, within_run=True,
                                         status="failed", error="the base run of this seed failed")
                    continue
                futures.append(pool.submit(execute, run, script, runs_root, needs.get(run.key, set()), threads))
            for future in concurrent.futures.as_completed(futures):
                result = future.result()
                done[result["key"]] = result
                timings[phase].append(result["seconds"])
                say(progress(result, todo, done, timings, jobs))
        finally:  # on Ctrl-C, drop the queued runs instead of waiting for them
            pool.shutdown(cancel_futures=True)
    summary = summarize(spec, [done[run.key] for run in runs], effect)
    say(markdown(summary))
    for line in write_outputs(summary, out_root / spec.name):
        say(line)
    return summary


def progress(result: dict, todo: list[Planned], done: dict, timings: dict, jobs: int) -> str:
    left = [run for run in todo if run.key not in done]
    eta = sum(statistics.fmean(timings[r.base_key is not None] or timings[False] or [0]) for r in left) / jobs
    status = f"score {result['metrics']['score_bpb']:.5f}" if result["status"] == "ok" else result["error"]
    return (f"[{len(todo) - len(left)}/{len(todo)}] {result['variant']} seed {result['seed']}"
            f"{' (within-run)' if result['within_run'] else ''}: {status} in {result['seconds']:.0f}s; "
            f"ETA {eta / 60:.1f} min")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", type=Path, help="the sweep: a JSON file (see bench/sweeps/)")
    p.add_argument("--data", help="DATA_PATH for every run (overrides the spec's)")
    p.add_argument("--tokenizer", help="TOKENIZER_PATH for every run (overrides the spec's)")
    p.add_argument("--seeds", help="comma-separated seeds (overrides the spec's)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each with OMP_NUM_THREADS=cores/jobs")
    p.add_argument("--effect", type=float, default=0.003, help="the bpb difference the seeds-needed column is for")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        if args.jobs < 1 or args.effect <= 0:
            raise SpecError("--jobs must be >= 1 and --effect > 0")
        spec = load_spec(args.spec, args.data, args.tokenizer, seeds)
    except (SpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = run_sweep(spec, jobs=args.jobs, effect=args.effect)
    return 1 if any(row["failed"] for row in summary["variants"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
