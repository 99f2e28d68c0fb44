"""ESTIMATED ms/step on 8xH100 of each GPU preset, before and after its loop switch, for the attention
kernel it would run, beside the records' measured step times. bench/gpu_check.py --dry-run prints it.

The model (an estimate; every factor below is a public figure or says it is an estimate):
1. Per token a training step does M matrix FLOPs and A attention FLOPs (bench/speed.py's
   matmul_params and attention_flops_per_token: 6 FLOPs per matrix parameter, causal attention 6·T·d
   per block pass; every pass of a repeated block counts, so M and A grow at the switch). Within
   documents (DOC_ATTENTION) the attention work is a fraction D of causal's: the causal pairs that fall
   within documents, counted on bench/attn_check.py's seeded FineWeb-like rows (lognormal lengths, mean
   800 tokens; D = 0.55 at 2048. The first-order L/T = 0.39 undercounts: a token sits in a long
   document more often than the mean length suggests).
2. The whole step runs at one common throughput X (FLOP/s per GPU), calibrated on the record's own
   ms/step with its kernel: ms = tokens_per_gpu x (M + A x w / s) / X, w the kernel's work relative
   to causal attention and s its speed relative to FlashAttention 3 (the records' kernel: w = D within
   documents, s = 1). The optimizer, communication and elementwise work are folded into X. A record
   given as the average over a run whose loop switched on at fraction f of the wallclock is the
   harmonic mean: ms_avg = 1 / (f / ms_before + (1 - f) / ms_after).
3. Our step: the same formula at that X with our kernel's w and s (KERNELS).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attn_check  # noqa: E402
import speed  # noqa: E402
import train_gpt as tg  # noqa: E402  (attn_check and speed put the repository on the path)

GPUS = 8


@dataclasses.dataclass(frozen=True)
class Kernel:
    work: str  # "documents": the within-document pairs (D of causal); "causal"; "square": every pair (2x causal)
    speed: float  # relative to FlashAttention 3 on the same work
    source: str


KERNELS = {
    "fa3": Kernel("documents", 1.0, "the records' kernel (FA3 varlen within documents)"),
    "flex": Kernel("documents", 0.65, "FlexAttention ~0.65x FA3: pytorch issue #137036 (public; the figure as "
                                      "issue 22 cites it, not re-read here)"),
    "cudnn": Kernel("causal", 0.9, "ESTIMATE: cuDNN SDPA up to 1.75x FA2 on H100 (PyTorch 2.5 release blog), FA3 "
                                   "1.5-2.0x FA2 (FA3 paper): ~0.9-1.2x FA3, 0.9 taken"),
    "cudnn-mask": Kernel("square", 0.9, "ESTIMATE: a dense (B,1,T,T) mask skips no block: every pair of the "
                                        "square (2x causal's, 2/D x the documents'), at cuDNN's speed; mask reads "
                                        "not counted"),
}


@dataclasses.dataclass(frozen=True)
class Record:
    ms: float  # measured ms/step on 8xH100
    when: str | float  # "after": with the loop on; "all": a run without a loop; f: the run's average, switch at f
    kernel: str
    source: str


RECORDS = {  # the record whose step calibrates each preset (frontier is PR #1204's shapes and step)
    "sp8192": Record(121.6, 0.35, "fa3", "PR #1855, the run's average (switch at 35% of the wallclock); its later "
                                         "record PR #2135 logged ~95 before the switch, ~140 after"),
    "pr1204": Record(96.1, "after", "fa3", "PR #1204's log, after the switch"),
    "frontier": Record(96.1, "after", "fa3", "PR #1204's log, after the switch (frontier = pr1204's shapes)"),
    "pr76": Record(65.0, "all", "cudnn", "SPEED.md: the record as it ran (torch SDPA; its kernel taken as cuDNN's "
                                         "speed, so the estimate is the record by construction)"),
}


def work_per_token(matmul: float, attention: float, kernel: Kernel, doc_fraction: float) -> float:
    """FLOPs per token at FA3-equivalent speed: M + A x w / s, A the causal attention FLOPs."""
    work = {"documents": doc_fraction, "causal": 1.0, "square": 2.0}[kernel.work]
    return matmul + attention * work / kernel.speed


def throughput(record: Record, tokens: float, work_off: float, work_on: float) -> float:
    """X in FLOPs per ms per GPU from the record's ms/step (work_* per token with its kernel)."""
    if record.when == "after":
        return tokens * work_on / record.ms
    if record.when == "all":
        return tokens * work_off / record.ms
    f = record.when
    return tokens / record.ms / (f / work_off + (1 - f) / work_on)


def harmonic_average(ms_before: float, ms_after: float, f: float) -> float:
    """The mean ms/step of a run that switched at fraction f of its wallclock."""
    return 1 / (f / ms_before + (1 - f) / ms_after)


def preset_flops(h: tg.Hyperparameters, recurrence: bool) -> tuple[float, float]:
    """(M, A) per token of a training step: matrix FLOPs, causal attention FLOPs."""
    return (6.0 * sum(speed.matmul_params(h, recurrence).values()),
            speed.attention_flops_per_token(h, h.train_seq_len, recurrence=recurrence))


def document_fraction(h: tg.Hyperparameters) -> float:
    """D: the within-document share of causal attention's pairs (1 without DOC_ATTENTION)."""
    if not h.doc_attention:
        return 1.0
    rows = h.train_batch_tokens // GPUS // h.train_seq_len
    tokens = attn_check.document_tokens(rows, h.train_seq_len, "cpu", "lognormal")
    return attn_check.documents_summary(tokens, "lognormal")["work_vs_causal"]


def estimate_rows(preset: str) -> list[dict]:
    """One row per kernel worth showing for `preset`: the one it would run on CUDA (flex with
    DOC_ATTENTION, cuDNN causal otherwise), and with DOC_ATTENTION the dense-mask path and the record's FA3."""
    h, _ = tg.hyperparameters_from_env({"PRESET": preset}, True)
    record, tokens, doc = RECORDS[preset], h.train_batch_tokens / GPUS, document_fraction(h)
    flops = {on: preset_flops(h, on) for on in (False, True)}
    work = lambda kernel, on: work_per_token(*flops[on], KERNELS[kernel], doc)
    x = throughput(record, tokens, work(record.kernel, False), work(record.kernel, True))
    kernels = ["flex", "cudnn-mask", "fa3"] if h.doc_attention else ["cudnn"]
    return [{"preset": preset, "kernel": k, "before_ms": tokens * work(k, False) / x,
             "after_ms": tokens * work(k, True) / x if h.recur_blocks else None, "record": record,
             "doc_fraction": doc, "positions": (h.num_layers, tg.run_positions(h)), "flops": flops} for k in kernels]


def format_rows(rows: list[dict]) -> list[str]:
    lines = ["estimate: ms/step on 8xH100, ESTIMATED (bench/step_estimate.py: FLOPs at one throughput calibrated "
             "on the record's measured ms/step; the kernel factors below)",
             f"{'preset':<9}{'kernel':<12}{'passes':>8}{'M+A MFLOP/tok':>15}{'D':>6}{'before':>9}{'after':>9}"
             f"{'record':>16}"]
    for r in rows:
        after = f"{r['after_ms']:.1f}" if r["after_ms"] is not None else "-"
        (m0, a0), (m1, a1) = r["flops"][False], r["flops"][True]
        record = f"{r['record'].ms} {r['record'].when if isinstance(r['record'].when, str) else 'avg'}"
        lines.append(f"{r['preset']:<9}{r['kernel']:<12}{'%d/%d' % r['positions']:>8}"
                     f"{f'{(m0 + a0) / 1e6:.0f}/{(m1 + a1) / 1e6:.0f}':>15}{r['doc_fraction']:>6.2f}"
                     f"{r['before_ms']:>9.1f}{after:>9}{record:>16}")
    lines.append("records (measured, ms/step on 8xH100):")
    for preset in dict.fromkeys(r["preset"] for r in rows):
        lines.append(f"  {preset}: {RECORDS[preset].ms} ({RECORDS[preset].source})")
    lines.append("kernels (w: attention work, s: speed vs FA3):")
    lines += [f"  {name}: w={k.work}, s={k.speed}: {k.source}" for name, k in KERNELS.items()]
    return lines


def print_estimates(presets: list[str]) -> None:
    rows = [row for preset in presets if preset in RECORDS for row in estimate_rows(preset)]
    print("\n".join(format_rows(rows)))
