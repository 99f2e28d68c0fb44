"""One compiled score-first TTT chunk at a preset's shape: its time and peak memory on the GPU, or on a
CPU an estimate of that peak.

    python3 bench/ttt_chunk.py --preset sp8192 --out $OUT/ttt_sp8192.json     # CUDA: time and memory
    OMP_NUM_THREADS=1 python3 bench/ttt_chunk.py --estimate --preset sp8192   # CPU: the estimated peak (minutes)
    python3 bench/ttt_chunk.py --estimate --preset smoke --len 64             # CPU: a toy (seconds)

A chunk as train_gpt's score_batch runs one: TTT_BATCH_DOCS rows of EVAL_SEQ_LEN tokens (64 x 2048 for
sp8192), one document per row (a BOS first), the model with its recurrence on (as it scores) and its
weights frozen, tg.DocumentAdapters(model, rows, TTT_LORA_RANK) attached; the forward
model(inputs, targets, reduction="none", one_document=True) with gradients under bf16 autocast; the
backward of each row's masked mean loss (its last TTT_CHUNK_TOKENS positions scored, as the sliding rule
scores a chunk deep in a document); adapters.step(TTT_LR).

On CUDA: torch.compile(model, dynamic=False) (inductor); --warmup chunks (the compilation) then --reps
timed chunks (synced each, median ms: forward + backward + step); then the forward alone without
adapters under no_grad (adapters.attach(False): the plain per-document scoring), warmed up and timed
the same way. Peak memory allocated and reserved (MiB) of each; a peak over 75 GiB is flagged: an H100
(80 GB) would not hold it.

--estimate (CPU): the same chunk compiled with the backend aot_eager_decomp_partition (AOTAutograd
decomposes and partitions forward and backward as inductor does, without generating code), under CPU
bf16 autocast; the bytes of the distinct storages the forward saves for the backward, read through
torch.autograd.graph.saved_tensors_hooks (they work through compiled graphs), at --rows and 2 x --rows
rows of --len tokens (default 1 and 2 rows of EVAL_SEQ_LEN: the full length and width). Their
difference is the per-row part; the rest is fixed (the bf16 copies of the weights). The peak per GPU is
then estimated as parameters + adapters (A and B, A's reset draw, their gradients, Adam's square
averages: all linear in the slots) + the fixed saved bytes + the per-row saved bytes x TTT_BATCH_DOCS
(x EVAL_SEQ_LEN / --len where --len is shorter: linear in the length, as the flash kernels save the
output and the log-sum-exp, no (T, T) scores) + the fp32 logits of one chunk (the loss's backward holds
them, or their gradient, beside the saved tensors). Not counted: the other transient gradients, the
allocator's fragmentation, kernel workspaces. Inductor on CUDA may save a different set than the
partitioner here (it recomputes some cheap ops): an estimate. On CPU one_document=True is plain causal
SDPA (the flash kernel for CPU), on CUDA the kernel ATTN_BACKEND picks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (its memory figures and the H100 limit)
import train_gpt as tg  # noqa: E402  (speed puts the repository on the path)

ESTIMATE_BACKEND = "aot_eager_decomp_partition"
MIB, GIB = 2 ** 20, 2 ** 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sp8192", help="the preset whose chunk to run (its TTT_* and EVAL_SEQ_LEN)")
    p.add_argument("--estimate", action="store_true", help="CPU: estimate the peak memory per GPU, time nothing")
    p.add_argument("--rows", type=int, default=None, help="rows of the chunk (default TTT_BATCH_DOCS; with "
                                                          "--estimate: rows measured, default 1, and twice as many)")
    p.add_argument("--len", type=int, default=None, dest="length", help="tokens per row (default EVAL_SEQ_LEN)")
    p.add_argument("--dim", type=int, default=None, help="MODEL_DIM instead of the preset's (a quick CPU test)")
    p.add_argument("--warmup", type=int, default=2, help="untimed chunks first (the compilation)")
    p.add_argument("--reps", type=int, default=5, help="timed chunks (median)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the timed mode (eager for tests)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (a summary is printed)")
    args = p.parse_args(argv)
    if min(args.rows or 1, args.length or 1, args.dim or 1, args.warmup + 1, args.reps) < 1:
        p.error("--rows, --len, --dim and --reps must be >= 1, --warmup >= 0")
    return args


def preset_hparams(preset: str, dim: int | None) -> tg.Hyperparameters:
    env = {"PRESET": preset, **({"MODEL_DIM": str(dim)} if dim else {})}
    return tg.hyperparameters_from_env(env, torch.cuda.is_available())[0]


# -----------------------------------------------------------------------------
# The chunk


def scoring_model(h: tg.Hyperparameters, device: torch.device) -> tg.GPT:
    """The preset's model as it scores: the recurrence on, the weights frozen (fp32, as trained)."""
    torch.manual_seed(h.seed)
    model = tg.GPT(h).to(device)
    if model.recur_blocks:
        model.start_recurrence()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def chunk_batch(h: tg.Hyperparameters, rows: int, length: int, device, seed: int = 0):
    """inputs, targets (rows, length) int64: one document per row, a BOS first, ids 4..vocab-1; scored
    (rows, length) bool: the last TTT_CHUNK_TOKENS positions."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(4, h.vocab_size, (rows, length), generator=g)
    inputs[:, 0] = tg.BOS_ID
    targets = torch.randint(4, h.vocab_size, (rows, length), generator=g)
    scored = torch.arange(length)[None].expand(rows, -1) >= length - min(h.ttt_chunk_tokens, length)
    return inputs.to(device), targets.to(device), scored.to(device)


def one_document_forward(model: tg.GPT, run) -> tuple:
    """(inputs, targets) -> per-token losses (rows, length) of rows that hold one document each, through
    `run` (the model or its compiled form), as score_batch calls it. Returns the function and its name."""
    return (lambda x, y: run(x, y, reduction="none", one_document=True)), "one_document=True"


def adapt_on_chunk(forward, adapters: tg.DocumentAdapters, batch, lr: float, autocast) -> torch.Tensor:
    """One chunk as score_batch trains on it: forward with gradients, backward of each row's mean loss
    over its scored positions, one adapter step. Returns the per-row losses (rows,)."""
    inputs, targets, scored = batch
    with torch.enable_grad(), autocast:
        losses = forward(inputs, targets)
    per_row = torch.where(scored, losses, 0.0).sum(dim=1) / scored.sum(dim=1).clamp_min(1)
    per_row.sum().backward()
    adapters.step(lr)
    return per_row.detach()


def autocast_bf16(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


# -----------------------------------------------------------------------------
# On the device: time and peak memory


def timed_ms(fn, count: int, device: torch.device) -> list[float]:
    """Wall milliseconds of `count` calls of fn, the device synced after each."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return times


def measure_phase(fn, args, device: torch.device) -> dict:
    """Warm-up (compilation) seconds, then the timed calls' median ms and the phase's peak memory
    (speed.memory_stats: CUDA peak allocated/reserved MiB, on a CPU the process's max RSS)."""
    rt = tg.Runtime(rank=0, world_size=1, device=device, distributed=False)
    t0 = time.perf_counter()
    timed_ms(fn, args.warmup, device)
    warmup_s = time.perf_counter() - t0
    speed.reset_peak_memory(rt)
    times = timed_ms(fn, args.reps, device)
    return {"warmup_s": warmup_s, "ms": statistics.median(times), "ms_all": times, "memory": speed.memory_stats(rt)}


def run_chunk(args, h: tg.Hyperparameters, device: torch.device) -> dict:
    """The timed chunk (fwd + bwd + step with adapters) and the forward alone (no adapters, no_grad)."""
    rows, length = args.rows or h.ttt_batch_docs, args.length or h.model_eval_seq_len
    model = scoring_model(h, device)
    compiled = torch.compile(model, dynamic=False, backend=args.backend)
    forward, how = one_document_forward(model, compiled)
    adapters = tg.DocumentAdapters(model, rows, h.ttt_lora_rank)
    batch = chunk_batch(h, rows, length, device)
    losses = []
    adapters.attach(True)
    chunk = measure_phase(lambda: losses.append(adapt_on_chunk(forward, adapters, batch, tg.TTT_LR,
                                                               autocast_bf16(device))), args, device)
    adapters.attach(False)

    def forward_only():
        with torch.no_grad(), autocast_bf16(device):
            forward(batch[0], batch[1])
    plain = measure_phase(forward_only, args, device)
    return {"mode": "device", "rows": rows, "length": length, "forward": how, "backend": args.backend,
            "chunk": chunk, "forward_only": plain, "losses_finite": all(bool(x.isfinite().all()) for x in losses),
            "over_h100": speed.over_h100(chunk["memory"]) or speed.over_h100(plain["memory"])}


# -----------------------------------------------------------------------------
# On a CPU: the estimated peak


def saved_bytes(run, skip: set[int]) -> tuple[int, object]:
    """Bytes of the distinct storages the forward inside run() saves for its backward, leaving out the
    storages in `skip` (parameters and adapters, counted apart). Returns (bytes, run's result)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return sum(seen.values()), result


def measure_saved(h: tg.Hyperparameters, model: tg.GPT, rows: int, length: int) -> dict:
    """Saved bytes of one compiled chunk of rows x length on the CPU (bf16 autocast), the seconds it
    took (compilation included), whether its losses are finite, and the adapters' bytes per slot."""
    torch._dynamo.reset()
    adapters = tg.DocumentAdapters(model, rows, h.ttt_lora_rank)
    adapters.attach(True)
    compiled = torch.compile(model, dynamic=False, backend=ESTIMATE_BACKEND)
    forward, how = one_document_forward(model, compiled)
    batch = chunk_batch(h, rows, length, torch.device("cpu"))
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *adapters.a, *adapters.b]}
    t0 = time.perf_counter()
    saved, losses = saved_bytes(lambda: adapt_on_chunk(forward, adapters, batch, tg.TTT_LR,
                                                       autocast_bf16(torch.device("cpu"))), skip)
    adapters.attach(False)
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors) / rows
    return {"rows": rows, "length": length, "saved_bytes": saved, "seconds": time.perf_counter() - t0,
            "losses_finite": bool(losses.isfinite().all()), "forward": how,
            "adapter_a_per_slot": size(adapters.a), "adapter_b_per_slot": size(adapters.b)}


def peak_terms(h: tg.Hyperparameters, model: tg.GPT, small: dict, large: dict) -> list[tuple[str, float]]:
    """(what, bytes) per term of the estimated peak of the preset's chunk, from the two measurements
    (rows r and 2r of the same length)."""
    slots, length = h.ttt_batch_docs, h.model_eval_seq_len
    per_row = (large["saved_bytes"] - small["saved_bytes"]) / (large["rows"] - small["rows"])
    fixed = small["saved_bytes"] - per_row * small["rows"]
    a, b = small["adapter_a_per_slot"] * slots, small["adapter_b_per_slot"] * slots
    return [("parameters (fp32)", sum(p.numel() * p.element_size() for p in model.parameters())),
            (f"adapters A and B (fp32, {slots} slots, rank {h.ttt_lora_rank})", a + b),
            ("adapters: A's reset draw (one slot's)", a / slots),
            ("adapters: gradients", a + b),
            ("adapters: Adam square averages", a + b),
            ("saved activations: fixed part (bf16 weight copies)", fixed),
            (f"saved activations: {slots} rows x {per_row / MIB:.1f} MiB"
             + (f" x {length}/{small['length']} (length, linear)" if small["length"] != length else ""),
             per_row * slots * length / small["length"]),
            (f"fp32 logits of one chunk ({slots} x {length} x {h.vocab_size})", 4.0 * slots * length * h.vocab_size)]


def estimate(args, h: tg.Hyperparameters) -> dict:
    """The estimated peak per GPU of the preset's chunk, measured on this CPU at a few rows."""
    rows, length = args.rows or 1, args.length or h.model_eval_seq_len
    model = scoring_model(h, torch.device("cpu"))
    small = measure_saved(h, model, rows, length)
    large = measure_saved(h, model, 2 * rows, length)
    terms = peak_terms(h, model, small, large)
    total = sum(value for _, value in terms)
    return {"mode": "estimate", "backend": ESTIMATE_BACKEND, "measured": [small, large],
            "terms_mib": {name: value / MIB for name, value in terms}, "estimated_peak_gib": total / GIB,
            "over_h100": total / GIB > speed.H100_LIMIT_GIB,
            "finite": all(math.isfinite(v) for _, v in terms) and small["losses_finite"] and large["losses_finite"]}


# -----------------------------------------------------------------------------
# Report


def describe(h: tg.Hyperparameters, preset: str) -> str:
    return (f"PRESET={preset}: {h.num_layers} blocks, {tg.run_positions(h)} block passes with the recurrence on, "
            f"dim {h.model_dim}, heads {h.num_heads}/{h.num_kv_heads}, vocab {h.vocab_size}; chunk "
            f"TTT_BATCH_DOCS {h.ttt_batch_docs} x EVAL_SEQ_LEN {h.model_eval_seq_len}, LoRA rank {h.ttt_lora_rank}, "
            f"{h.ttt_chunk_tokens} tokens scored per row")


def report(r: dict) -> str:
    flag = f"  ** over {speed.H100_LIMIT_GIB:g} GiB: an H100 would not hold it **" if r["over_h100"] else ""
    lines = [r["config"]]
    if r["mode"] == "estimate":
        for m in r["measured"]:
            lines.append(f"measured on CPU ({r['backend']}, bf16 autocast, {m['forward']}): {m['rows']} x "
                         f"{m['length']}: saved {m['saved_bytes'] / MIB:.1f} MiB, {m['seconds']:.0f} s with the "
                         f"compilation, losses finite {m['losses_finite']}")
        width = max(len(name) for name in r["terms_mib"])
        lines += [f"  {name:<{width}}  {mib:>10,.0f} MiB" for name, mib in r["terms_mib"].items()]
        lines.append(f"ESTIMATED peak memory per GPU: {r['estimated_peak_gib']:.1f} GiB{flag}")
        return "\n".join(lines) + "\n"
    for label, phase in (("chunk (fwd+bwd+step, adapters)", r["chunk"]), ("forward only (no adapters, no_grad)",
                                                                          r["forward_only"])):
        memory = speed.peak_mib(phase["memory"])
        lines.append(f"{label}: {phase['ms']:.1f} ms median of {len(phase['ms_all'])} (warm-up "
                     f"{phase['warmup_s']:.1f} s); memory {memory}")
    lines.append(f"rows {r['rows']} x {r['length']}, {r['forward']}, backend {r['backend']}, losses finite "
                 f"{r['losses_finite']}{flag}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        h = preset_hparams(args.preset, args.dim)
    except tg.RunError as exc:  # an unknown preset, a --dim the heads do not divide
        print(f"ttt_chunk: {exc}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not args.estimate and not cuda and args.backend == "inductor":
        print("ttt_chunk: no CUDA; use --estimate (or --backend eager for a toy run)", file=sys.stderr)
        return 2
    tg.select_sdpa_kernels(h.attn_backend)
    result = estimate(args, h) if args.estimate else run_chunk(args, h, torch.device("cuda" if cuda else "cpu"))
    result.update(config=describe(h, args.preset), preset=args.preset, torch=torch.__version__,
                  device=torch.cuda.get_device_name() if cuda and not args.estimate else "cpu",
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    print(report(result), end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
