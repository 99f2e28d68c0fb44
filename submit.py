"""Checks a record submission from the logs train_gpt.py wrote, tests its significance, writes submission.json.

    python3 submit.py logs/seed1.txt logs/seed2.txt logs/seed3.txt --author NAME --github-id ID \
        --name "..." --blurb "..." --prev-val-loss 1.9303 --plot logs/curves.png

Reads each log (it holds the run's source, every hyperparameter and one machine-readable line per
result), checks the challenge rules per log and across seeds, tests the improvement over the
previous record (>= 0.005 nats of val_loss at p < 0.01, one-sided t-test), prints a report, writes
submission.json (beside the first log, or --out; never over a file git tracks) with every number
taken from the logs and, with --plot, draws the loss curves of all seeds into one PNG. A record
needs 3 complete seeds, a significant improvement over --prev-* and 8xH100 runs; anything else is
submitted with --non-record, which its JSON's track says. With --records DIR it also fills a
records folder: the self-extracting form of train_gpt.py that the runs counted as code_bytes
(train_gpt.shipped_form), the logs and submission.json. Exit status: 0 if no rule is violated, 1
if one is, 2 for bad arguments, unreadable logs or a tracked --out. Needs what train_gpt.py needs
(it imports train_gpt for the shipped form); matplotlib only for --plot (skipped with a message when
it is missing). Not part of the counted artifact: only train_gpt.py ships.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT_DIR = Path(__file__).resolve().parent
ARTIFACT_CAP_BYTES = 16_000_000  # decimal: code + compressed model
TRAIN_CAP_S = 600.0
EVAL_CAP_S = 600.0
MARGIN_NATS = 0.005  # a record must beat the previous one by this much val_loss ...
ALPHA = 0.01  # ... at this one-sided significance level
PER_SEED_HPARAMS = {"SEED", "RUN_ID", "ARTIFACT_PATH"}  # every other setting must match across seeds
OFFICIAL_VAL_SPLITS = ("fineweb_sp1024", "fineweb_sp8192", "fineweb_sp8192_caseops")  # train_gpt.py's val_split: names
TRACK = "10min-8xH100-16mb"
NON_RECORD_TRACK = "non-record-16mb"  # the challenge's records/track_non_record_16mb submissions say so
RECORD_SEEDS = 3  # a record is three runs that differ only in the seed

# The result lines read from a log and the keys each must carry. A new field train_gpt.py logs is
# read by adding its key here; final_sliding is required unless EVAL_STRIDE=0, final_ttt when
# TTT_ENABLED. The score of a run is final_ttt if present (score-first TTT), else final_sliding, else
# final_roundtrip; its evaluation time is eval_done's, which covers reading the artifact back and
# every evaluation (TTT's too; its compile warm-up on random tokens is not evaluation).
RESULT_LINES = {
    "train_done": ("steps", "train_time_ms"),
    "pre_quant": ("val_loss", "val_bpb"),
    "artifact_bytes": ("artifact_bytes", "code_bytes", "model_bytes"),
    "val_tokens": ("val_tokens", "val_bytes"),
    "final_roundtrip": ("val_loss", "val_bpb", "eval_time_ms"),
    "final_sliding": ("val_loss", "val_bpb", "eval_time_ms"),
    "final_ttt": ("val_loss", "val_bpb", "eval_time_ms"),
    "eval_done": ("eval_time_ms",),
}
SCORE_LINES = ("final_ttt", "final_sliding", "final_roundtrip")  # the first one logged is the score


class UsageError(Exception):
    """Bad arguments or a file that is not a readable train_gpt.py log: one line, exit 2."""


class Incomplete(Exception):
    """A log that lacks a result line (the run crashed or was killed): a violation."""


# -----------------------------------------------------------------------------
# Reading a log

SOURCE_HEADER = re.compile(r"^====== source (\S+) \((\d+) bytes\) ======\n", re.M)
SOURCE_END = "\n====== end source ======\n"  # train_gpt.py writes the source, then a newline, then this
KEY = re.compile(r"(?:^|\s)(\w+):")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclasses.dataclass
class Log:
    path: Path
    source: str | None  # the source train_gpt.py wrote into its own log
    source_bytes_declared: int | None  # the N of its "(N bytes)" header
    hparams: dict[str, str]
    lines: dict[str, dict[str, str]]  # the last line per label: "final_sliding" -> {"val_loss": "4.66", ...}
    curves: dict[str, list[tuple[float, float]]]  # "train_loss" / "val_loss" -> [(step, value)]
    warnings: list[str] = dataclasses.field(default_factory=list)  # every line starting "WARNING", in order

    @property
    def seed(self) -> str:
        return self.hparams.get("SEED", "?")


def line_fields(line: str) -> dict[str, str]:
    """`key:value` tokens by name, not position; a value runs to the next key (device names have spaces)."""
    keys = list(KEY.finditer(line))
    ends = [k.start() for k in keys[1:]] + [len(line)]
    return {k.group(1): line[k.end():end].strip() for k, end in zip(keys, ends)}


def number(text: str) -> float:
    """The leading number of a value, without its unit: '6762ms' -> 6762.0, '10/60' -> 10.0."""
    match = NUMBER.match(text)
    if not match:
        raise ValueError(text)
    return float(match.group())


def split_source(text: str) -> tuple[str | None, int | None, str]:
    """(source, declared byte count, the log without the source)."""
    header = SOURCE_HEADER.search(text)
    if header is None:
        return None, None, text
    end = text.find(SOURCE_END, header.end() - 1)
    if end < 0:
        return None, int(header.group(2)), text[:header.start()]
    rest = text[:header.start()] + text[end + len(SOURCE_END):]
    return text[header.end():end], int(header.group(2)), rest


def read_text(path: Path, what: str) -> str:
    """The file as UTF-8, byte for byte (no newline translation)."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None


def read_log(path: Path) -> Log:
    source, declared, rest = split_source(read_text(path, "log"))
    log = Log(path, source, declared, {}, {}, {"train_loss": [], "val_loss": []})
    for line in rest.splitlines():
        if line.startswith("hparam "):
            name, _, value = line[len("hparam "):].partition("=")
            log.hparams[name] = value
        elif line.strip():
            label, fields = line.split(None, 1)[0].split(":", 1)[0], line_fields(line)
            if label == "step":
                for key, points in log.curves.items():
                    if key in fields and NUMBER.match(fields[key]) and NUMBER.match(fields.get("step", "")):
                        points.append((number(fields["step"]), number(fields[key])))
            else:
                log.lines[label] = fields
            if line.startswith("WARNING"):
                log.warnings.append(line)
    if "run_id" not in log.lines or not log.hparams:
        raise UsageError(f"{path}: not a train_gpt.py log (no run_id: or hparam lines)")
    return log


@dataclasses.dataclass
class Run:
    """The numbers of one complete log; the names are submission.json's per-seed fields."""
    score_line: str
    val_loss: float
    val_bpb: float
    pre_quant_val_loss: float
    pre_quant_val_bpb: float
    roundtrip_val_loss: float  # the reloaded artifact on the pre_quant windows: their gap is quantization's
    bytes_total: int
    bytes_code: int
    bytes_model: int
    steps: int
    wallclock_seconds: float  # training time, compile warm-up excluded
    eval_seconds: float
    val_tokens: int
    val_bytes: int
    val_split_tokens: int  # the validation split's targets: val_tokens unless VAL_TOKENS scored a prefix


def measure(log: Log) -> Run:
    optional = {"final_sliding": log.hparams.get("EVAL_STRIDE") == "0",
                "final_ttt": log.hparams.get("TTT_ENABLED", "False") in ("False", "0")}
    needed = [label for label in RESULT_LINES if not optional.get(label)]
    missing = [label for label in needed if label not in log.lines]
    if missing:
        raise Incomplete(f"no {', '.join(missing)} line (the run crashed, was killed or did not train)")
    for label in needed:
        absent = [key for key in RESULT_LINES[label] if key not in log.lines[label]]
        if absent:
            raise Incomplete(f"the {label} line has no {', '.join(absent)}")
    try:
        value = {label: {key: number(log.lines[label][key]) for key in RESULT_LINES[label]} for label in needed}
    except ValueError as exc:
        raise Incomplete(f"a result is not a number: {exc}") from None
    score_line = next(label for label in SCORE_LINES if label in value)
    return Run(
        score_line=score_line,
        val_loss=value[score_line]["val_loss"], val_bpb=value[score_line]["val_bpb"],
        pre_quant_val_loss=value["pre_quant"]["val_loss"], pre_quant_val_bpb=value["pre_quant"]["val_bpb"],
        roundtrip_val_loss=value["final_roundtrip"]["val_loss"],
        bytes_total=int(value["artifact_bytes"]["artifact_bytes"]),
        bytes_code=int(value["artifact_bytes"]["code_bytes"]),
        bytes_model=int(value["artifact_bytes"]["model_bytes"]),
        steps=int(value["train_done"]["steps"]), wallclock_seconds=value["train_done"]["train_time_ms"] / 1000,
        eval_seconds=value["eval_done"]["eval_time_ms"] / 1000,
        val_tokens=int(value["val_tokens"]["val_tokens"]), val_bytes=int(value["val_tokens"]["val_bytes"]),
        val_split_tokens=split_targets(log, int(value["val_tokens"]["val_tokens"])))


def split_targets(log: Log, scored: int) -> int:
    """of_val_tokens from the val_tokens line; logs written before VAL_TOKENS existed scored the whole split."""
    try:
        return int(number(log.lines["val_tokens"]["of_val_tokens"]))
    except (KeyError, ValueError):
        return scored


def measure_all(logs: list[Log]) -> tuple[list[Run | None], list[str]]:
    """The runs (None for an incomplete log) and what each incomplete log lacks."""
    runs, incomplete = [], []
    for log in logs:
        try:
            runs.append(measure(log))
        except Incomplete as exc:
            runs.append(None)
            incomplete.append(f"{log.path}: {exc}")
    return runs, incomplete


# -----------------------------------------------------------------------------
# Rule checks. A per-run check returns what is wrong with one complete log, or None.


def over_cap(log: Log, run: Run, code: str) -> str | None:
    if run.bytes_total > ARTIFACT_CAP_BYTES:
        return f"{run.bytes_total:,} bytes, {run.bytes_total - ARTIFACT_CAP_BYTES:,} over"


def over_train_time(log: Log, run: Run, code: str) -> str | None:
    if run.wallclock_seconds > TRAIN_CAP_S:
        return f"trained {run.wallclock_seconds:.3f} s"


def over_eval_time(log: Log, run: Run, code: str) -> str | None:
    if run.eval_seconds > EVAL_CAP_S:
        return f"evaluated {run.eval_seconds:.3f} s"


def bytes_inconsistent(log: Log, run: Run, code: str) -> str | None:
    problems = []
    if run.bytes_total != run.bytes_code + run.bytes_model:
        problems.append(f"artifact_bytes {run.bytes_total} != code_bytes {run.bytes_code} "
                        f"+ model_bytes {run.bytes_model}")
    source = log.source if log.source is not None else code
    source_bytes = len(source.encode())
    shipped = shipped_code(source)
    if run.bytes_code not in (source_bytes, len(shipped)):
        problems.append(f"code_bytes {run.bytes_code} is neither {len(shipped)}, the shipped form of the code it "
                        f"ran, nor {source_bytes}, its source")
    declared = log.lines.get("code", {}).get("shipped_sha256")
    if declared is not None and declared != hashlib.sha256(shipped).hexdigest():
        problems.append("the shipped form of the logged source is not the one the run counted (its code: "
                        "shipped_sha256 differs: another Python's ast or lzma?)")
    if log.source is not None and log.source_bytes_declared != source_bytes:
        problems.append(f"source header says {log.source_bytes_declared} bytes, the logged source has {source_bytes}")
    return "; ".join(problems) or None


def partial_validation(log: Log, run: Run, code: str) -> str | None:
    if run.val_tokens != run.val_split_tokens:
        return (f"scored {run.val_tokens:,} of the validation split's {run.val_split_tokens:,} targets "
                f"(VAL_TOKENS={log.hparams.get('VAL_TOKENS')}): a proxy run, not a score")


def bpb_inconsistent(log: Log, run: Run, code: str) -> str | None:
    expected = run.val_loss / math.log(2) * run.val_tokens / run.val_bytes
    if not math.isclose(run.val_bpb, expected, rel_tol=1e-6):
        return f"{run.score_line} val_bpb {run.val_bpb} but val_loss/ln2*val_tokens/val_bytes = {expected:.8f}"


def unofficial_split(log: Log, run: Run, code: str) -> str | None:
    split = log.lines.get("val_split")
    if split is None:
        return "no val_split line: a log that does not name its validation split cannot be a record"
    if split.get("val_split") not in OFFICIAL_VAL_SPLITS:
        return f"val_split:{split.get('val_split') or '(empty)'} is not an official validation split"


def validation_leak(log: Log, run: Run, code: str) -> str | None:
    problems = [line for line in log.warnings if line.startswith("WARNING: validation leak")]
    check = log.lines.get("leak_check")
    if check is None:
        problems.append("no leak_check line: a log that did not check for train/validation overlap cannot be a record")
    else:
        for key in ("val_docs_sampled", "hits", "identical_shards"):
            value = check.get(key, "")
            if not re.fullmatch(r"\d+", value):
                problems.append(f"leak_check has no {key} count")
            elif key == "val_docs_sampled" and int(value) == 0:
                problems.append("leak_check val_docs_sampled:0 (nothing was checked)")
            elif key != "val_docs_sampled" and int(value) > 0:
                problems.append(f"leak_check {key}:{value}")
    return "; ".join(problems) or None


RUN_CHECKS = (
    (f"artifact <= {ARTIFACT_CAP_BYTES:,} bytes (code + compressed model)", over_cap),
    (f"training <= {TRAIN_CAP_S:.0f} s (train_done train_time_ms)", over_train_time),
    (f"evaluation <= {EVAL_CAP_S:.0f} s (eval_done eval_time_ms)", over_eval_time),
    ("byte counts consistent (total = code + model, code = the shipped form of the logged source)", bytes_inconsistent),
    ("val_bpb consistent with val_loss, val_tokens and val_bytes", bpb_inconsistent),
    ("the whole validation split scored (VAL_TOKENS=0)", partial_validation),
    (f"an official validation split (val_split: {', '.join(OFFICIAL_VAL_SPLITS)})", unofficial_split),
    ("no validation leak (leak_check hits:0 identical_shards:0, no WARNING: validation leak line)", validation_leak),
)


def shipped_code(source: str) -> bytes:
    """train_gpt.py's shipped form of a source (or of a shipped file's program text); a source that
    is not Python (a stand-in) ships as itself."""
    import train_gpt  # torch and all: only what train_gpt.py needs anyway
    try:
        return train_gpt.shipped_form(source.encode())
    except SyntaxError:
        return source.encode()


def program(source: str) -> str:
    """What a source runs, comments and docstrings aside (train_gpt.minified); a non-Python stand-in as is."""
    import train_gpt
    try:
        return train_gpt.minified(train_gpt.readable_source(source.encode()))
    except SyntaxError:
        return source


def code_difference(log: Log, code: str) -> str | None:
    if log.source is None:
        return "no complete ====== source block"
    shipped_run = program(log.source) == log.source  # a run of the shipped form logs its program text
    if log.source != code and not (shipped_run and log.source == program(code)):
        log_lines, code_lines = log.source.splitlines(), code.splitlines()
        first = next((i for i, (a, b) in enumerate(zip(log_lines, code_lines)) if a != b),
                     min(len(log_lines), len(code_lines)))
        return f"differs from the submitted code at line {first + 1}"


def config_differences(logs: list[Log]) -> list[str]:
    problems = []
    for log in logs[1:]:
        names = sorted((logs[0].hparams.keys() | log.hparams.keys()) - PER_SEED_HPARAMS)
        diff = [f"{n}: {logs[0].hparams.get(n, '(absent)')!r} vs {log.hparams.get(n, '(absent)')!r}" for n in names
                if logs[0].hparams.get(n) != log.hparams.get(n)]
        if diff:
            problems.append(f"{log.path} vs {logs[0].path}: {', '.join(diff)}")
    return problems


def rule_results(logs: list[Log], runs: list[Run | None], incomplete: list[str], code: str):
    """[(rule, [violations])] for every rule, in report order."""
    complete = [(log, run) for log, run in zip(logs, runs) if run is not None]
    val_sets = {(run.val_tokens, run.val_bytes) for _, run in complete}
    hashes = {log.lines["val_split"]["val_split_sha256"] for log in logs  # a log without one fails its own rule
              if "val_split_sha256" in log.lines.get("val_split", {})}
    seeds = [log.seed for log in logs]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    results = [("log complete (every result line present)", incomplete),
               ("code in the log identical to the submitted train_gpt.py",
                [f"{log.path}: {d}" for log in logs if (d := code_difference(log, code))])]
    for title, check in RUN_CHECKS:
        results.append((title, [f"{log.path}: {p}" for log, run in complete if (p := check(log, run, code))]))
    results += [
        (f"configuration identical across seeds except {', '.join(sorted(PER_SEED_HPARAMS))}",
         config_differences(logs)),
        ("same validation set (val_tokens, val_bytes, val_split_sha256)",
         [f"different validation sets across seeds: {sorted(val_sets)}"] * (len(val_sets) > 1) +
         [f"different validation split hashes across seeds: {sorted(hashes)}"] * (len(hashes) > 1)),
        ("seeds distinct", [f"seed {s} appears {seeds.count(s)} times" for s in repeated]),
    ]
    return results


def record_claim_results(runs: list[Run | None], sig: Significance | None, sig_wanted: bool,
                         not_record: list[str]) -> list[tuple[str, list[str]]]:
    """The rules of a record claim (every submission without --non-record), as rule_results gives them."""
    complete = sum(run is not None for run in runs)
    if sig is None:
        untested = [f"not tested: {complete} complete log(s)" if sig_wanted else
                    "no previous record to beat: give --prev-val-loss, --prev-bpb or --prev-logs"]
    else:
        untested = [] if sig.significant else [f"improvement {sig.improvement:+.6f} nats at p = {sig.p:.6f}"]
    return [
        (f"a record: at least {RECORD_SEEDS} complete seeds (else --non-record)",
         [f"{complete} complete log(s)"] * (complete < RECORD_SEEDS)),
        (f"a record: > {MARGIN_NATS} nats better than the previous record at p < {ALPHA} (else --non-record)",
         untested),
        ("a record: 8xH100 record runs (else --non-record)", not_record),
    ]


def tracked_by_git(path: Path) -> bool:
    """Whether git tracks this file (in the repository holding its folder); False outside one or without git."""
    if not path.parent.is_dir():
        return False
    try:
        return subprocess.run(["git", "-C", str(path.parent), "ls-files", "--error-unmatch", "--", path.name],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def not_record_reasons(logs: list[Log]) -> list[str]:
    """Why these logs are not 8xH100 record runs (empty if they are)."""
    reasons = []
    for log in logs:
        device = log.lines.get("device", {})
        # every preset but smoke at its full size is a record configuration (pr76, ...; "record" in older logs)
        for ok, why in ((device.get("preset", "smoke") != "smoke", f"preset:{device.get('preset')}"),
                        (device.get("scale", "full") == "full", f"scale:{device.get('scale')} (a shrunk preset)"),
                        ("H100" in device.get("device", ""), f"device:{device.get('device')} (not an H100)"),
                        (device.get("world_size") == "8", f"world_size:{device.get('world_size')} (not 8)")):
            if not ok and why not in reasons:
                reasons.append(why)
    return reasons


# -----------------------------------------------------------------------------
# Significance: H0 "the new record improves val_loss by at most MARGIN_NATS", one-sided.


def beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), by Lentz's method (Numerical Recipes, section 6.4)."""
    tiny = 1e-300

    def nonzero(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / nonzero(1 + numerator * d)
            c = nonzero(1 + numerator / c)
            h *= c * d
        if abs(c * d - 1) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta({a}, {b}, {x}) did not converge")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * beta_continued_fraction(a, b, x) / a
    return 1 - front * beta_continued_fraction(b, a, 1 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df may be fractional, as in Welch's test)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail


@dataclasses.dataclass
class Significance:
    test: str
    prev_val_loss: float  # the previous record's (mean) val_loss
    improvement: float  # mean(prev) - mean(new), nats
    t: float
    df: float
    p: float

    @property
    def significant(self) -> bool:
        return self.improvement > MARGIN_NATS and self.p < ALPHA


def t_test(test: str, prev: float, improvement: float, se: float, df: float) -> Significance:
    """One-sided: H0 is improvement <= MARGIN_NATS, rejected for large t."""
    excess = improvement - MARGIN_NATS
    t = excess / se if se > 0 else math.copysign(math.inf, excess)
    return Significance(test, prev, improvement, t, df, t_sf(t, df))


def one_sample_test(prev: float, new: list[float]) -> Significance:
    """The previous record as a fixed number: one-sample t-test of d_i = prev - new_i."""
    d = prev - np.asarray(new)
    return t_test(f"one-sample t-test, H0: mean(prev - new) <= {MARGIN_NATS}", prev, float(d.mean()),
                  float(d.std(ddof=1)) / math.sqrt(len(d)), len(d) - 1)


def welch_test(prev: list[float], new: list[float]) -> Significance:
    """The previous record as its own seeds: Welch's two-sample t-test (unequal variances)."""
    v_prev, v_new = np.var(prev, ddof=1) / len(prev), np.var(new, ddof=1) / len(new)
    # Welch-Satterthwaite; with no variance at all t is infinite and df does not matter
    df = ((v_prev + v_new) ** 2 / (v_prev ** 2 / (len(prev) - 1) + v_new ** 2 / (len(new) - 1))
          if v_prev + v_new else 1.0)
    return t_test(f"Welch two-sample t-test, H0: mean(prev) - mean(new) <= {MARGIN_NATS}", float(np.mean(prev)),
                  float(np.mean(prev) - np.mean(new)), math.sqrt(v_prev + v_new), float(df))


def significance(args, runs: list[Run]) -> Significance | None:
    """The test against --prev-*; None if none was given or fewer than 2 logs are complete."""
    new = [run.val_loss for run in runs]
    if args.prev_logs:
        prev_runs, incomplete = measure_all([read_log(Path(p)) for p in args.prev_logs])
        if incomplete:
            raise UsageError(f"--prev-logs: {incomplete[0]}")
        if len(prev_runs) < 2:
            raise UsageError("--prev-logs needs at least 2 logs")
        return welch_test([run.val_loss for run in prev_runs], new) if len(new) > 1 else None
    if len(new) < 2 or (args.prev_val_loss is None and args.prev_bpb is None):
        return None
    prev = args.prev_val_loss
    if prev is None:  # bpb -> nats on the same validation set: val_loss = val_bpb * ln2 * bytes / tokens
        prev = args.prev_bpb * math.log(2) * runs[0].val_bytes / runs[0].val_tokens
    return one_sample_test(prev, new)


# -----------------------------------------------------------------------------
# Outputs: the report, submission.json, the curves


def verdict(sig: Significance, violations: int, not_record: list[str], non_record: bool) -> str:
    reasons = [why for ok, why in ((sig.significant, f"not > {MARGIN_NATS} nats better at p < {ALPHA}"),
                                   (not violations, "rule violations"), (not not_record, "not record runs"),
                                   (not non_record, "submitted as a non-record")) if not ok]
    return "no: " + ", ".join(reasons) if reasons else "yes"


def report(logs, runs, results, not_record, sig, sig_wanted, code_path, non_record: bool) -> str:
    out = [f"submission check: {len(logs)} logs, code {code_path}, "
           f"{'a non-record submission (--non-record)' if non_record else 'a record claim'}", ""]
    if not_record:
        out += [f"NOT A RECORD: these are not 8xH100 record runs ({'; '.join(not_record)}).",
                "The numbers below are a pre-flight check, not a score; submission.json gets null numeric fields.", ""]
    out.append(f"{'seed':>6} {'val_loss':>11} {'val_bpb':>11} {'pre_q_bpb':>10} {'steps':>6} {'train_s':>8} "
               f"{'eval_s':>7} {'bytes_total':>11}  log")
    for log, run in zip(logs, runs):
        out.append(f"{log.seed:>6} incomplete (see the rule checks)  {log.path}" if run is None else
                   f"{log.seed:>6} {run.val_loss:11.8f} {run.val_bpb:11.8f} {run.pre_quant_val_bpb:10.6f} "
                   f"{run.steps:6d} {run.wallclock_seconds:8.3f} {run.eval_seconds:7.3f} {run.bytes_total:11,}"
                   f"  {log.path}")
    done = [run for run in runs if run is not None]
    if len(done) > 1:
        losses, bpbs = [r.val_loss for r in done], [r.val_bpb for r in done]
        out += [f"{'mean':>6} {np.mean(losses):11.8f} {np.mean(bpbs):11.8f}",
                f"{'std':>6} {np.std(losses, ddof=1):11.8f} {np.std(bpbs, ddof=1):11.8f}"]
    if done:
        out.append(f"score: the {done[0].score_line} line (score-first TTT if logged, else the sliding window, "
                   f"else roundtrip)")
    out += ["", "rule checks"]
    for title, problems in results:
        out.append(f"  {'FAIL' if problems else 'PASS'}  {title}")
        out += [f"          {p}" for p in problems]
    if sig_wanted and not sig:
        out += ["", "significance: not tested, it needs at least 2 complete logs"]
    other_violations = sum(len(problems) for title, problems in results if not title.startswith("a record"))
    if sig:
        out += ["", f"significance vs the previous record's val_loss {sig.prev_val_loss:.8f}",
                f"  improvement  {sig.improvement:+.6f} nats (mean prev - mean new; required > {MARGIN_NATS})",
                f"  test         {sig.test}, one-sided",
                f"  t = {sig.t:.4f}, df = {sig.df:.2f}, p = {sig.p:.6f} (required < {ALPHA})",
                f"  qualifies    {verdict(sig, other_violations, not_record, non_record)}"]
    return "\n".join(out)


def summary_fields(runs: list[Run], sig: Significance | None) -> dict:
    """The records' top-level numbers: means of the scores, the worst case of each limit."""
    def column(key):
        return [getattr(run, key) for run in runs]

    return {
        **{key: float(np.mean(column(key)))
           for key in ("val_loss", "val_bpb", "pre_quant_val_loss", "pre_quant_val_bpb")},
        "val_loss_std": float(np.std(column("val_loss"), ddof=1)) if len(runs) > 1 else None,
        "step_stop": round(float(np.mean(column("steps")))),
        **{key: max(column(key)) for key in ("wallclock_seconds", "eval_seconds", "bytes_total")},
        "bytes_code": runs[0].bytes_code,
        "significance": sig and {"test": sig.test, "prev_val_loss": sig.prev_val_loss,
                                 "improvement_nats": sig.improvement, "t": sig.t, "df": sig.df, "p_value": sig.p,
                                 "significant": sig.significant},
    }


def null_numbers(value):
    """The same structure with every number replaced by null (a run that must not claim a score)."""
    if isinstance(value, dict):
        return {k: null_numbers(v) for k, v in value.items()}
    return None if isinstance(value, (int, float)) else value  # bools too: "significant" is a claim


def submission(args, logs, runs, not_record, sig) -> dict:
    """submission.json in the records folders' convention; every number null unless these are record runs."""
    done = [(log, run) for log, run in zip(logs, runs) if run is not None]
    numbers = summary_fields([run for _, run in done], sig) if done else {}
    numbers["seeds"] = {log.seed: {"log": str(log.path), **dataclasses.asdict(run)} for log, run in done}
    blurb = args.blurb
    if not_record or not done:
        numbers = null_numbers(numbers)
        blurb = (f"NOT A RECORD: these logs are not 8xH100 record runs ({'; '.join(not_record) or 'no complete log'}),"
                 f" so every numeric field is null until real 8xH100 logs exist. {blurb}").strip()
    return {"author": args.author, "github_id": args.github_id, "name": args.name, "blurb": blurb,
            "date": args.date, "track": NON_RECORD_TRACK if args.non_record else TRACK, **numbers}


def plot_curves(logs: list[Log], runs: list[Run | None], path: Path) -> str:
    """Training loss of every seed (left) and its validation losses (right), one colour per seed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot: skipped, matplotlib is not installed (pip install matplotlib); {path} not written"
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for log, run in zip(logs, runs):
        train = log.curves["train_loss"] or [(0, math.nan)]
        color = ax_train.plot(*zip(*train), label=f"seed {log.seed}")[0].get_color()
        if log.curves["val_loss"]:
            ax_val.plot(*zip(*log.curves["val_loss"]), "o-", color=color, ms=4)
        if run is not None:
            ax_val.plot([run.steps], [run.pre_quant_val_loss], "s", color=color)
            ax_val.plot([run.steps], [run.roundtrip_val_loss], "^", color=color)
            ax_val.plot([run.steps], [run.val_loss], "*", ms=13, color=color)
    markers = [("o-", "during training")] * any(log.curves["val_loss"] for log in logs) + [
        ("s", "pre-quant (in memory, disjoint windows)"), ("^", "reloaded artifact, same windows"),
        ("*", "score (reloaded artifact, the score's windows)")]
    ax_val.legend([plt.Line2D([], [], color="gray", marker=m[0], ls="-" if "-" in m else "") for m, _ in markers],
                  [label for _, label in markers], fontsize=8)
    ax_train.legend(fontsize=8)
    ax_train.set(title="training loss", xlabel="step", ylabel="nats/token")
    ax_val.set(title="validation loss", xlabel="step", ylabel="nats/token")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: wrote {path}"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="the logs train_gpt.py wrote, one per seed")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--name", required=True, help="the submission's title")
    p.add_argument("--blurb", default="", help="what the submission does")
    p.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    prev = p.add_mutually_exclusive_group()
    prev.add_argument("--prev-val-loss", type=float, help="the previous record's val_loss (nats)")
    prev.add_argument("--prev-bpb", type=float, help="the previous record's val_bpb, converted with these logs' "
                                                     "val_tokens/val_bytes")
    prev.add_argument("--prev-logs", nargs="+", help="the previous record's logs (Welch's test)")
    p.add_argument("--code", type=Path, default=SCRIPT_DIR / "train_gpt.py", help="the submitted train_gpt.py")
    p.add_argument("--non-record", action="store_true", help="submit as a non-record (track non-record-16mb): "
                   f"without it, fewer than {RECORD_SEEDS} complete seeds, no significant improvement over --prev-* "
                   "or runs that are not 8xH100 record runs are violations")
    p.add_argument("--out", type=Path, help="where submission.json goes (default: beside the first log, or in "
                   "--records); never a file git tracks")
    p.add_argument("--records", type=Path, help="fill this new folder: train_gpt.py (the shipped form), the logs, "
                   "submission.json")
    p.add_argument("--plot", type=Path, help="write the loss curves of all seeds to this PNG")
    return p.parse_args(argv)


def fill_records(folder: Path, code: str, logs: list[str]) -> str:
    """Writes the records folder: train_gpt.py in the shipped form (what the logs' code_bytes counted;
    it runs the same program), and copies of the logs. Refuses a folder that holds any of them."""
    targets = [folder / "train_gpt.py"] + [folder / Path(p).name for p in logs]
    taken = [str(t) for t in targets if t.exists()]
    if taken:
        raise SystemExit(f"error: {taken[0]} exists: --records never replaces a file")
    folder.mkdir(parents=True, exist_ok=True)
    shipped = shipped_code(code)
    targets[0].write_bytes(shipped)
    for path, target in zip(logs, targets[1:]):
        shutil.copyfile(path, target)
    return f"records: wrote {targets[0]} ({len(shipped):,} bytes, the shipped form) and {len(logs)} log(s) to {folder}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out or (args.records or Path(args.logs[0]).parent) / "submission.json"
    try:
        if tracked_by_git(args.out):
            raise UsageError(f"{args.out} is tracked by git: submit.py never writes over a tracked file "
                             f"(give --out another path)")
        code = read_text(args.code, "submitted code")
        logs = [read_log(Path(p)) for p in args.logs]
        runs, incomplete = measure_all(logs)
        sig = significance(args, [run for run in runs if run is not None])
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = rule_results(logs, runs, incomplete, code)
    not_record = not_record_reasons(logs)
    sig_wanted = any(x is not None for x in (args.prev_val_loss, args.prev_bpb, args.prev_logs))
    if not args.non_record:
        results += record_claim_results(runs, sig, sig_wanted, not_record)
    print(report(logs, runs, results, not_record, sig, sig_wanted, args.code, args.non_record))
    if args.records:
        print(fill_records(args.records, code, args.logs))
    args.out.write_text(json.dumps(submission(args, logs, runs, not_record, sig), indent=2) + "\n")
    violations = sum(len(problems) for _, problems in results)
    print(f"\n{violations} violation(s); wrote {args.out}")
    if args.plot:
        print(plot_curves(logs, runs, args.plot))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
