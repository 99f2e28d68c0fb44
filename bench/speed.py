"""Training-step, evaluation and artifact speed of train_gpt.py, measured through its own code.

    python3 bench/speed.py [--tokens synthetic|real] [--steps N] [--eval] [--quant]      # the GPU(s) present
    torchrun --standalone --nproc_per_node=8 bench/speed.py --eval --quant               # 8 GPUs
    OMP_NUM_THREADS=1 python3 bench/speed.py --eval --val-tokens 20000 --quant           # CPU: smoke preset
    python3 bench/speed.py --compare before.json after.json                              # speed and loss changes

Configured by the same environment variables as train_gpt.py (PRESET=pr76 forces the record
configuration; with no CUDA the auto preset is the CPU smoke configuration). It builds the model,
optimizers and loader with train_gpt's functions, warms up with train_gpt.warm_up_and_reset (the
compile warm-up the record runs before its clock starts), then times train_gpt.train_step:
--steps steps with a device sync after each (per-step times; the training loop syncs every step
too), then --steps more with a single sync at the end (what the step costs without host syncs).
--eval times one train_gpt.evaluate() with the sliding window (EVAL_STRIDE) over a validation set of
--val-tokens scored targets (default: FineWeb's 62,021,632); --quant times quantize_state and
serialize_artifact (zstd, level 22) and the read back.

--tokens synthetic (default) needs no data: uniform random ids with a BOS every ~1000 tokens, written
to temporary shards in the challenge's format and read by train_gpt's own loader. --tokens real
reads DATA_PATH (train shards, and the real validation split for --eval).

Model FLOPs are analytic (model_flops_per_token): 6 FLOPs per matrix parameter per token for
forward + backward, plus causal attention. Results: a JSON and a text table, by default
logs/bench/<device>_<world>x_<preset>[_compiled]_<date>.{json,txt}. Figures from a CPU are not
comparable to a GPU's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402  (importing it has no side effects)

sys.path.insert(0, str(REPO / "bench"))
from attn_check import dispatched_kernel_report  # noqa: E402  (the kernel SDPA really dispatched)

FINEWEB_VAL_TARGETS = 62_021_632
WALLCLOCK_MS = 600_000
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's datasheets. The H200 has the
# H100 SXM's compute (more and faster memory). Matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (("H100 80GB HBM3", 989.0), ("H100 SXM", 989.0), ("H200", 989.0), ("H100 NVL", 835.0),
                    ("H100 PCIe", 756.0), ("A100", 312.0))


# -----------------------------------------------------------------------------
# FLOP counting
#
# Convention (the usual one, Kaplan et al. 2020 / PaLM's MFU, with attention halved for causality):
# a matrix product with N multiply-accumulates costs 2N FLOPs forward and 4N backward (gradients of
# the input and of the weight), so a matrix parameter applied to every token costs 6 FLOPs per
# token. Matrix parameters are the block matrices, the bigram projection and the tied output head;
# the token embedding and the bigram table are lookups, not products. Attention scores (QK^T) and
# the weighted sum (AV) each cost T x d multiply-accumulates per token per layer at sequence length
# T and model width d (query heads x head dim; GQA's shared keys do not shrink it), so 4Td FLOPs
# forward, 12Td forward + backward, halved because a causal token sees on average half the
# sequence (the exact mean is (T+1)/2): 6Td per token per layer. Norms, RoPE, softcap, relu^2, the
# loss and the optimizers are not counted. For the record: 6 x 28,884,992 + 6 x 12 x 1024 x 512 =
# 211.06 MFLOP per token, the issue's ~211. With the depth recurrence on, a token passes through
# more blocks than NUM_LAYERS (block_positions) and each pass counts. Within-document attention
# (DOC_ATTENTION) is counted as causal attention, as the records' MFU figures count it.


def block_positions(h: tg.Hyperparameters, recurrence: bool = False) -> int:
    """Blocks a token passes through: NUM_LAYERS, or with the depth recurrence on, every repeated pass
    too (the blocks in RECUR_BLOCKS run RECUR_REPEATS more times: sp8192 17 from 11, pr1204 13)."""
    return tg.run_positions(h) if recurrence else h.num_layers


def matmul_params(h: tg.Hyperparameters, recurrence: bool = False) -> dict[str, int]:
    """Matrix parameters multiplied once per token, by part; a repeated block's matrices count once
    per pass (they do the work again, shared or not)."""
    d, kv_dim, hidden = h.model_dim, h.num_kv_heads * (h.model_dim // h.num_heads), h.mlp_mult * h.model_dim
    per_block = 2 * d * d + 2 * d * kv_dim + 2 * d * hidden  # c_q, proj; c_k, c_v; mlp fc, proj
    return {"blocks": block_positions(h, recurrence) * per_block, "bigram_proj": h.bigram_dim * d,
            "head": h.vocab_size * d}


def attention_flops_per_token(h: tg.Hyperparameters, seq_len: int, training: bool = True,
                              causal: bool = True, recurrence: bool = False) -> float:
    passes = 3 if training else 1  # backward: twice the forward's products
    return passes * 4 * seq_len * h.model_dim * block_positions(h, recurrence) * (0.5 if causal else 1.0)


def model_flops_per_token(h: tg.Hyperparameters, seq_len: int | None = None, training: bool = True,
                          causal: bool = True, recurrence: bool = False) -> float:
    """Model FLOPs per token (see the convention above); forward only with training=False; with the
    depth recurrence on (`recurrence`), every pass of a repeated block counts."""
    seq_len = seq_len or h.train_seq_len
    matmul = (6 if training else 2) * sum(matmul_params(h, recurrence).values())
    return matmul + attention_flops_per_token(h, seq_len, training, causal, recurrence)


# -----------------------------------------------------------------------------
# Compilation counters
#
# Dynamo's own bookkeeping: torch._dynamo.utils.counters (frames compiled, graphs made) and the
# per-compilation records of torch._dynamo.utils.get_compilation_metrics(), whose recompile_reason
# is set when a frame that already had a compiled graph is compiled again (the same text
# TORCH_LOGS=recompiles prints). Both are internal but long-lived (torch 2.2 .. 2.13); anything
# missing reads as None rather than failing the bench. A backward graph is compiled lazily at the
# first backward and gets its own record, except when AOTAutograd's on-disk cache (under
# /tmp/torchinductor_<user>) already holds the pair: then the hit is counted and the warm-up time
# is not a cold compile's.


def compile_snapshot():
    from torch._dynamo.utils import counters, get_compilation_metrics
    return (counters["frames"]["ok"], counters["stats"]["unique_graphs"], list(get_compilation_metrics()))


def compiles_since(snapshot) -> dict:
    try:
        frames, graphs, before = snapshot
        now_frames, now_graphs, after = compile_snapshot()
        new = [m for m in after if not any(m is b for b in before)]
        reasons = [m.recompile_reason for m in new if getattr(m, "recompile_reason", None)]
        return {"frames": now_frames - frames, "graphs": now_graphs - graphs,
                "backward_graphs": sum(getattr(m, "is_forward", None) is False for m in new),
                "aot_cache_hits": sum(getattr(m, "aotautograd_local_cache_hit_count", 0) or 0 for m in new),
                "aot_cache_misses": sum(getattr(m, "aotautograd_local_cache_miss_count", 0) or 0 for m in new),
                "recompiles": len(reasons), "recompile_reasons": reasons}
    except Exception as exc:  # an internal API moved: say so, keep measuring
        return {"frames": None, "graphs": None, "backward_graphs": None, "aot_cache_hits": None,
                "aot_cache_misses": None, "recompiles": None, "recompile_reasons": [f"counters unavailable: {exc!r}"]}


# -----------------------------------------------------------------------------
# Synthetic data


def synthetic_tokens(count: int, vocab_size: int, seed: int) -> np.ndarray:
    """Uniform random ids >= 4 (no pad/eos/unk, as in FineWeb), in documents of 500..1500 tokens,
    each starting with BOS, as the real stream does. A prefix does not depend on `count`: runs with
    more steps see the same first batches (losses comparable across runs)."""
    tokens = np.random.default_rng([seed, 0]).integers(4, vocab_size, size=count, dtype=np.uint16)
    starts = np.cumsum(np.random.default_rng([seed, 1]).integers(500, 1501, size=count // 500 + 1))
    tokens[0] = tg.BOS_ID
    tokens[starts[starts < count]] = tg.BOS_ID
    return tokens


def write_synthetic_shards(folder: Path, count: int, vocab_size: int, shard_tokens: int = 100_000_000) -> None:
    """fineweb_train_*.bin shards (100 M tokens each, like FineWeb's) holding `count` tokens."""
    tokens = synthetic_tokens(count, vocab_size, seed=0)
    for i, lo in enumerate(range(0, count, shard_tokens)):
        part = tokens[lo:lo + shard_tokens]
        header = np.zeros(256, dtype="<i4")
        header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, len(part))
        (folder / f"fineweb_train_{i:06d}.bin").write_bytes(header.tobytes() + part.astype("<u2").tobytes())


def synthetic_validation(num_targets: int, vocab_size: int, device: torch.device) -> tg.ValidationSet:
    """A validation set of num_targets scored targets. Byte tables: 1 byte per token, control ids
    0..3 boundaries (the bpb it gives means nothing; the work is that of the real evaluation)."""
    tokens = synthetic_tokens(num_targets + 1, vocab_size, seed=1)
    base = np.ones(vocab_size, dtype=np.int64)
    boundary = np.zeros(vocab_size, dtype=bool)
    base[:4], boundary[:4] = 0, True
    tables = (base, np.zeros(vocab_size, dtype=bool), boundary)
    return tg.training_tokens_as_eval_set(tokens, tuple(torch.from_numpy(t).to(device) for t in tables))


# -----------------------------------------------------------------------------
# Machine facts


def device_name(rt: tg.Runtime) -> str:
    if rt.device.type == "cuda":
        return torch.cuda.get_device_name(rt.device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def memory_stats(rt: tg.Runtime) -> dict:
    if rt.device.type == "cuda":
        return {"peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
    return {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB


H100_LIMIT_GIB = 75.0  # a peak above this would not fit an H100 (80 GB, ~79 GiB, less the CUDA context)


def over_h100(memory: dict | None) -> bool:
    """Whether a CUDA peak (memory_stats) passes H100_LIMIT_GIB: the reserved bytes, what the allocator
    holds (on an H200 a run can pass it and still finish)."""
    return bool(memory) and memory.get("peak_reserved_mib", 0) > H100_LIMIT_GIB * 1024


def reset_peak_memory(rt: tg.Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


# -----------------------------------------------------------------------------
# The measurements


def time_steps(h, rt, model, optimizers, loader, first_step: int, count: int, sync_each: bool,
               base_model=None, recur_at: int | None = None) -> dict:
    """count train_gpt.train_step calls. sync_each: a device sync after every step (per-step times);
    else one at the end (the device queue stays full, as it would without the loop's host syncs).
    recur_at: the step from which the depth recurrence runs (its graph was built in the warm-up); the
    peak memory before it is kept ("memory_recur_off") and the peak restarts there."""
    losses, step_ms, switch_memory = [], [], None
    rt.sync()
    t_start = time.perf_counter()
    for i in range(count):
        t0 = time.perf_counter()
        step = first_step + i
        if recur_at is not None and step >= recur_at and not base_model.recur_active:
            switch_memory = memory_stats(rt)
            reset_peak_memory(rt)
            base_model.recur_active = True
        losses.append(tg.train_step(h, rt, model, optimizers, loader, step, tg.lr_scale(h, step, 0.0)))
        if sync_each:
            rt.sync()
            step_ms.append(1000 * (time.perf_counter() - t0))
            if rt.is_main:  # as it happens: a run cut at its time limit leaves these in its output
                print(f"bench: step {step} {step_ms[-1]:.1f} ms recurrence "
                      f"{'on' if base_model is not None and base_model.recur_active else 'off'}", flush=True)
    rt.sync()
    total_ms = 1000 * (time.perf_counter() - t_start)
    mean_losses = [tg.mean_over_ranks(rt, loss) for loss in losses]
    return {"steps": count, "total_ms": total_ms, "step_ms": step_ms, "losses": mean_losses,
            "memory_recur_off": switch_memory}


def count_host_syncs(h, rt, model, optimizers, loader, step: int) -> dict:
    """CUDA only: one train_step under torch.cuda.set_sync_debug_mode('warn'); every synchronizing
    call it makes (an .item(), a pageable copy to the host, a nonzero...) warns once."""
    if rt.device.type != "cuda":
        return {"count": None, "where": ["n/a: needs CUDA (set_sync_debug_mode)"]}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tg.train_step(h, rt, model, optimizers, loader, step, 1.0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        return {"count": len(syncs), "where": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})}
    except Exception as exc:
        return {"count": None, "where": [f"failed: {exc!r}"]}


def time_evaluation(h, rt, model, val: tg.ValidationSet, recurrence: bool) -> dict:
    seq_len, stride = h.model_eval_seq_len, h.eval_stride or h.model_eval_seq_len
    windows = len(tg.window_plan(val.num_targets, seq_len, stride)[0])
    reset_peak_memory(rt)
    snapshot = compile_snapshot()
    rt.sync()
    t0 = time.perf_counter()
    val_loss, _ = tg.evaluate(tg.model_for_eval(model), val, seq_len, stride, h.val_batch_size, rt)
    rt.sync()
    seconds = time.perf_counter() - t0
    flops = windows * seq_len * model_flops_per_token(h, seq_len, training=False, recurrence=recurrence)
    return {"seconds": seconds, "seq_len": seq_len, "stride": stride, "targets": val.num_targets,
            "windows": windows, "window_tokens": windows * seq_len, "targets_per_s": val.num_targets / seconds,
            "model_tflop": flops / 1e12, "tflops_per_gpu": flops / seconds / rt.world_size / 1e12,
            "val_loss": val_loss, "compiles": compiles_since(snapshot), "memory": memory_stats(rt)}


def time_quantization(h, rt, base_model) -> dict:
    """quantize_state + serialize_artifact (as write_artifact does, without fit_to_limit, which only
    runs when over the byte limit), then the read back (deserialize + dequantize)."""
    rt.sync()
    t0 = time.perf_counter()
    state = base_model.state_dict()
    quantized = tg.quantize_state(state, {n: tg.QuantRecipe(c) for n, c in tg.quant_plan(state, h).items()})
    t1 = time.perf_counter()
    blob = tg.serialize_artifact(quantized, tg.model_config(h))
    t2 = time.perf_counter()
    tg.dequantize_state(tg.deserialize_artifact(blob, "bench")[1])
    t3 = time.perf_counter()
    code_bytes = len(tg.shipped_form(Path(tg.__file__).read_bytes()))  # what counts
    return {"quantize_s": t1 - t0, "compress_s": t2 - t1, "load_s": t3 - t2,
            "model_bytes": len(blob), "code_bytes": code_bytes, "artifact_bytes": len(blob) + code_bytes,
            "note": "weights after a few steps compress differently from a trained model's: times matter, bytes less"}


ATTENTION_MARKERS = ("attention", "flash", "fmha", "cudnn", "sdpa", "attn")  # in kernel and op names


def profile_steps(h, rt, model, optimizers, loader, first_step: int, count: int) -> tuple[str, list[str]]:
    """The top ops of `count` profiled steps (a table), and the names of every profiled op or kernel
    that looks like attention: under torch.compile, the kernels that really ran."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if rt.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(count):
            tg.train_step(h, rt, model, optimizers, loader, first_step + i, 1.0)
        rt.sync()
    key = "self_device_time_total" if rt.device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    attention = sorted({e.key for e in averages if any(m in e.key.lower() for m in ATTENTION_MARKERS)})
    return averages.table(sort_by=key, row_limit=30), attention


def recurrence_phases(step_ms: list[float], recur_at: int, h, rt, peak: float | None, memory: dict) -> dict:
    """ms/step, tokens/s, model TFLOP/s (every pass of a repeated block counted) and peak memory of the
    synced steps before and after the recurrence switch (after it a token passes through more blocks:
    a slower step, timed apart). memory: label -> memory_stats of that phase."""
    phases = {}
    for label, ms, on in (("recur_off", step_ms[:recur_at], False), ("recur_on", step_ms[recur_at:], True)):
        if ms:
            median = statistics.median(ms)
            tokens_per_gpu_s = h.train_batch_tokens / (median / 1000) / rt.world_size
            tflops = model_flops_per_token(h, recurrence=on) * tokens_per_gpu_s / 1e12
            phases[label] = {"steps": len(ms), "ms_per_step_median": median, "positions": block_positions(h, on),
                             "tokens_per_s": h.train_batch_tokens / (median / 1000), "model_tflops_per_gpu": tflops,
                             "mfu": tflops / peak if peak else None, "memory": memory.get(label)}
    return phases


def summarize_steps(timed: dict, pipelined: dict, h, rt, flops_per_token: float, peak: float | None) -> dict:
    ms = timed["step_ms"]
    median = statistics.median(ms)
    tokens_per_gpu_s = h.train_batch_tokens / (median / 1000) / rt.world_size
    tflops = flops_per_token * tokens_per_gpu_s / 1e12
    result = {
        "ms_per_step_median": median, "ms_per_step_mean": statistics.fmean(ms),
        "ms_per_step_min": min(ms), "ms_per_step_max": max(ms),
        "ms_per_step_stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "tokens_per_s_per_gpu": tokens_per_gpu_s, "model_tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None,
        "losses": timed["losses"],
    }
    if pipelined["steps"]:
        result["pipelined_steps"] = pipelined["steps"]
        result["pipelined_ms_per_step"] = pipelined["total_ms"] / pipelined["steps"]
        result["pipelined_losses"] = pipelined["losses"]
    # The projection the issue asks for: on W GPUs a step is 8/W slices per GPU, so one slice per
    # GPU, i.e. the 8-GPU step, takes about ms x W / 8. It leaves out the gradient all-reduce and
    # the all-reduce of Muon's updates, and on fewer GPUs the optimizer's work (all matrices on
    # each GPU instead of 1/8 each) is spread over the 8 slices: an estimate, not a measurement.
    est_8gpu_ms = median * rt.world_size / tg.SLICES_PER_STEP
    result["projection"] = {
        "steps_in_600s_this_world": WALLCLOCK_MS / median,
        "est_8gpu_ms_per_step": est_8gpu_ms,
        "est_8gpu_steps_in_600s": WALLCLOCK_MS / est_8gpu_ms,
        "est_8gpu_note": "ms/step x world/8: per-GPU compute of one slice; no communication, optimizer "
                         "work per GPU as measured at this world size (estimate)",
    }
    return result


# -----------------------------------------------------------------------------
# Report


def config_summary(h: tg.Hyperparameters, preset: str, base_model: tg.GPT) -> dict:
    keys = ("num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "vocab_size", "train_seq_len",
            "train_batch_tokens", "bigram_vocab_size", "bigram_dim", "eval_seq_len", "eval_stride",
            "val_batch_size", "warmup_steps", "compile", "cpu_autocast")
    return {"preset": preset, **{k: getattr(h, k) for k in keys},
            "params": sum(p.numel() for p in base_model.parameters()), "matmul_params": matmul_params(h)}


def peak_mib(memory: dict | None) -> str:
    """The phase's peak: CUDA allocated/reserved MiB, else the process's max RSS."""
    if not memory:
        return "n/a"
    if "peak_allocated_mib" in memory:
        return f"{memory['peak_allocated_mib']:.0f}/{memory['peak_reserved_mib']:.0f} MiB allocated/reserved"
    return f"max RSS {memory['max_rss_mib']:.0f} MiB"


def fmt(value, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def report_table(r: dict) -> str:
    c, s, comp = r["config"], r["train"], r["compile"]
    proj = s["projection"]
    cpu_note = "  (CPU: not comparable to GPU figures)" if r["device"].startswith("cpu") else ""
    mem = "; ".join(f"{phase}: " + ", ".join(f"{k} {v:.0f}" for k, v in stats.items())
                    for phase, stats in r["memory"].items())
    rows = [
        ("device", f"{r['device']}{cpu_note}"),
        ("torch / date", f"{r['torch']}  cuda {r['cuda']}  {r['date']}"),
        ("world / accum", f"world_size {r['world_size']}, grad_accum_steps {r['grad_accum_steps']}"),
        ("config", f"preset {c['preset']}: {c['num_layers']}L x {c['model_dim']}, heads {c['num_heads']}/"
                   f"{c['num_kv_heads']}, mlp {c['mlp_mult']}x, seq {c['train_seq_len']}, params {c['params']:,}, "
                   f"compile {r['compile_enabled']} ({r['compile_backend']}), bf16 {r['bf16']}, tokens {r['tokens']}"),
        ("attention", r.get("attention_backend", "n/a")),
        ("profiled attention", ", ".join(r.get("profiled_attention_kernels") or []) or "n/a (--profile-steps 0)"),
        ("tokens/step", f"{c['train_batch_tokens']:,}"),
        ("ms/step", f"median {s['ms_per_step_median']:.2f}, mean {s['ms_per_step_mean']:.2f}, min "
                    f"{s['ms_per_step_min']:.2f}, max {s['ms_per_step_max']:.2f}, stdev {s['ms_per_step_stdev']:.2f} "
                    f"({r['timed_steps']} steps, synced each)"),
        ("ms/step, 1 sync", fmt(s.get("pipelined_ms_per_step")) + f" ({s.get('pipelined_steps', 0)} more steps, "
                            f"one sync at the end)"),
        ("tokens/s per GPU", f"{s['tokens_per_s_per_gpu']:,.0f}"),
        ("recurrence", "off throughout" if not s.get("recurrence") else
         f"blocks {s['recurrence']['blocks']} on from timed step {s['recurrence']['recur_at']}: " + "; ".join(
             f"{label} {p['ms_per_step_median']:.2f} ms/step ({p['steps']} steps, {p['positions']} block passes, "
             f"{p['model_tflops_per_gpu']:.3f} TFLOP/s, MFU {fmt(p['mfu'] and 100 * p['mfu'], '.1f', '%')}, "
             f"peak {peak_mib(p['memory'])})" for label, p in s["recurrence"].items() if isinstance(p, dict))),
        ("model FLOP/token", f"{r['flops_per_token'] / 1e6:.2f} M (train; 6N + causal attention; of the first "
                             f"timed step" + (f"; {r['flops_per_token_recurrence'] / 1e6:.2f} M with the recurrence "
                                              f"on" if r.get("flops_per_token_recurrence") else "") + ")"),
        ("TFLOP/s per GPU", f"{s['model_tflops_per_gpu']:.3f}"),
        ("MFU", fmt(s["mfu"] and 100 * s["mfu"], ".1f", "%") + f" of {fmt(r['peak_tflops'], '.0f')} TFLOP/s"),
        ("memory (MiB)", mem),
        ("warm-up", f"{r['warmup_ms'] / 1000:.1f} s ({c['warmup_steps']} steps + 1 eval batch)"),
        ("compiles warm-up", f"frames {comp['warmup']['frames']}, graphs {comp['warmup']['graphs']}, backward "
                             f"{comp['warmup']['backward_graphs']}, recompiles {comp['warmup']['recompiles']} "
                             f"{comp['warmup']['recompile_reasons']}, cache hits/misses "
                             f"{comp['warmup']['aot_cache_hits']}/{comp['warmup']['aot_cache_misses']}"),
        ("compiles timed", f"frames {comp['timed']['frames']}, graphs {comp['timed']['graphs']}, recompiles "
                           f"{comp['timed']['recompiles']}"),
        ("host syncs/step", f"{fmt(r['host_syncs']['count'], 'd')} {', '.join(r['host_syncs']['where'])}"),
        ("steps in 600 s", f"{proj['steps_in_600s_this_world']:,.0f} at world {r['world_size']}; 8-GPU estimate "
                           f"{proj['est_8gpu_ms_per_step']:.2f} ms/step -> {proj['est_8gpu_steps_in_600s']:,.0f} "
                           f"steps (estimate: no communication)"),
    ]
    if r.get("eval"):
        e = r["eval"]
        rows.append(("sliding eval", f"{e['seconds']:.2f} s for {e['targets']:,} targets (seq {e['seq_len']}, stride "
                                     f"{e['stride']}, {e['windows']:,} windows): {e['targets_per_s']:,.0f} targets/s, "
                                     f"{e['tflops_per_gpu']:.3f} TFLOP/s per GPU, recompiles "
                                     f"{e['compiles']['recompiles']}, memory " +
                                     ", ".join(f"{k} {v:.0f}" for k, v in e["memory"].items())))
    if r.get("quant"):
        q = r["quant"]
        rows.append(("quantize", f"{q['quantize_s']:.2f} s; zstd-22 {q['compress_s']:.2f} s; read back "
                                 f"{q['load_s']:.2f} s; model {q['model_bytes']:,} B + code {q['code_bytes']:,} B"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


def compare_runs(a: dict, b: dict) -> str:
    """Speed and losses of two runs. The losses are comparable when both ran the same config, seed and
    tokens (any world size): a change that keeps the math must keep them equal within bf16 noise."""
    rows = [f"{'':<22}{'A':>14}{'B':>14}{'B/A':>9}"]
    for label, get in (("ms/step (median)", lambda r: r["train"]["ms_per_step_median"]),
                       ("ms/step (1 sync)", lambda r: r["train"].get("pipelined_ms_per_step")),
                       ("tokens/s per GPU", lambda r: r["train"]["tokens_per_s_per_gpu"]),
                       ("warm-up s", lambda r: r["warmup_ms"] / 1000),
                       ("eval s", lambda r: r.get("eval", {}).get("seconds")),
                       ("quantize+zstd s", lambda r: r["quant"]["quantize_s"] + r["quant"]["compress_s"]
                        if r.get("quant") else None)):
        va, vb = get(a), get(b)
        ratio = vb / va if va and vb is not None else None
        rows.append(f"{label:<22}{fmt(va):>14}{fmt(vb):>14}{fmt(ratio, '.3f'):>9}")
    losses_a = a["train"]["losses"] + a["train"].get("pipelined_losses", [])
    losses_b = b["train"]["losses"] + b["train"].get("pipelined_losses", [])
    n = min(len(losses_a), len(losses_b))
    worst = max(abs(x - y) for x, y in zip(losses_a[:n], losses_b[:n]))
    rows.append(f"train losses: max |A-B| over the first {n} steps {worst:.2e} (final A {losses_a[n - 1]:.6f}, "
                f"B {losses_b[n - 1]:.6f})")
    if a.get("eval") and b.get("eval"):
        rows.append(f"eval val_loss: A {a['eval']['val_loss']:.8f}, B {b['eval']['val_loss']:.8f} (after "
                    f"{a['eval'].get('after_steps')} and {b['eval'].get('after_steps')} steps)")
    differ = sorted(k for k in a["config"] if a["config"].get(k) != b["config"].get(k))
    differ += [k for k in ("tokens", "world_size", "compile_enabled", "bf16", "device", "torch") if a[k] != b[k]]
    rows.append("differ: " + (", ".join(f"{k} {a['config'].get(k, a.get(k))} -> {b['config'].get(k, b.get(k))}"
                                        for k in differ) or "nothing in the config"))
    return "\n".join(rows) + "\n"


def default_out(rt: tg.Runtime, name: str, preset: str, compiled: bool, stamp: str) -> Path:
    """logs/bench/<device>_<world>x_<preset>[_compiled]_<date>.json, e.g. h100-80gb-hbm3_8x_record_compiled_..."""
    slug = "cpu" if rt.device.type == "cpu" else "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    slug = slug.replace("nvidia-", "")
    return REPO / "logs" / "bench" / f"{slug}_{rt.world_size}x_{preset}{'_compiled' if compiled else ''}_{stamp}.json"


# -----------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up (>= 2)")
    p.add_argument("--pipelined-steps", type=int, default=None,
                   help="steps timed with one sync at the end (default: --steps; 0: skip)")
    p.add_argument("--eval", action="store_true", help="time one sliding-window evaluation")
    p.add_argument("--val-tokens", type=int, default=FINEWEB_VAL_TARGETS,
                   help="scored targets of the synthetic validation set (with --tokens synthetic)")
    p.add_argument("--quant", action="store_true", help="time quantization, compression and read back")
    p.add_argument("--profile-steps", type=int, default=0, help="profile this many extra steps (top ops to the .txt)")
    p.add_argument("--recur-at", type=int, default=None,
                   help="switch the depth recurrence (RECUR_BLOCKS) on from this timed step (0..--steps): the "
                        "synced steps before and after are reported apart; the later phases run with it on")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU where the device is not known")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend when compile is on (train_gpt uses inductor; eager for CPU tests)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (a .txt table is written beside it)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="print speed and loss differences of two earlier runs, run nothing")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2")
    if args.pipelined_steps is None:
        args.pipelined_steps = args.steps
    if args.recur_at is not None and not 0 <= args.recur_at <= args.steps:
        p.error("--recur-at must be in 0..--steps")
    return args


def training_data(args, h: tg.Hyperparameters, scratch: Path) -> list[str]:
    if args.tokens == "real":
        return tg.find_shards(h, "train")
    steps = h.warmup_steps + 1 + args.steps + args.pipelined_steps + args.profile_steps
    per_step = tg.SLICES_PER_STEP * (h.train_batch_tokens // tg.SLICES_PER_STEP + 1)
    write_synthetic_shards(scratch, steps * per_step + 1, h.vocab_size)
    return tg.find_shards(dataclasses.replace(h, data_path=str(scratch)), "train")


def validation_data(args, h: tg.Hyperparameters, rt: tg.Runtime) -> tg.ValidationSet:
    if args.tokens == "real":
        return tg.load_validation(h, tg.load_tokenizer(h), rt)
    # without --eval, only its byte tables are used (the warm-up scores training tokens)
    return synthetic_validation(args.val_tokens if args.eval else 2 * h.model_eval_seq_len, h.vocab_size, rt.device)


def bench(args, h: tg.Hyperparameters, preset: str, rt: tg.Runtime, scratch: Path) -> dict:
    def log(message: str) -> None:
        if rt.is_main:
            print(message, flush=True)

    name = device_name(rt)
    compile_on = tg.compile_enabled(h, rt)
    if compile_on and h.warmup_steps == 0:
        log("warning: WARMUP_STEPS=0 with compile on: the timed steps include compilation")
    files = training_data(args, h, scratch)
    val = validation_data(args, h, rt)
    base_model = tg.build_model(h, rt)
    optimizers = tg.build_optimizers(h, rt, base_model)
    model = tg.wrap_model(h, rt, base_model, args.compile_backend)

    def make_loader():
        return tg.DistributedTokenLoader(files, h.vocab_size, rt)

    if args.recur_at is not None and not base_model.recur_blocks:
        raise tg.RunError(f"--recur-at {args.recur_at}: this configuration repeats no blocks (RECUR_BLOCKS is empty)")
    log(f"bench: {name}, world {rt.world_size}, preset {preset}, compile {compile_on}, tokens {args.tokens}")
    snapshot = compile_snapshot()
    warmup_ms = tg.warm_up_and_reset(h, dataclasses.replace(rt, log=log), base_model, model, optimizers, make_loader,
                                     val.tables)
    warmup_compiles = compiles_since(snapshot)
    memory_warmup = memory_stats(rt)
    loader = make_loader()
    reset_peak_memory(rt)
    snapshot = compile_snapshot()
    # As in train_gpt's loop: a compilation inside the timed steps is an error, not a slow step.
    with tg.compiled_graphs_only(h, rt, "inside the timed steps"):
        timed = time_steps(h, rt, model, optimizers, loader, 0, args.steps, sync_each=True, base_model=base_model,
                           recur_at=args.recur_at)
        pipelined = time_steps(h, rt, model, optimizers, loader, args.steps, args.pipelined_steps, sync_each=False)
    timed_compiles = compiles_since(snapshot)
    memory_timed = memory_stats(rt)
    next_step = args.steps + args.pipelined_steps
    host_syncs = count_host_syncs(h, rt, model, optimizers, loader, next_step)
    profile, profiled_attention = profile_steps(h, rt, model, optimizers, loader, next_step + 1, args.profile_steps) \
        if args.profile_steps else (None, None)
    flops_per_token = model_flops_per_token(h, recurrence=args.recur_at == 0)  # of the first timed step
    peak = peak_tflops(name, args.peak_tflops) if (rt.bf16 or args.peak_tflops) else None
    result = {
        "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": platform.node(), "world_size": rt.world_size, "grad_accum_steps": rt.grad_accum_steps,
        "tokens": args.tokens, "compile_enabled": compile_on,
        "compile_backend": args.compile_backend if compile_on else None,
        "bf16": rt.bf16, "attention_backend": dispatched_kernel_report(h, rt),
        "config": config_summary(h, preset, base_model), "tokens_per_step": h.train_batch_tokens,
        "timed_steps": args.steps, "flops_per_token": flops_per_token,
        "flops_per_token_parts": {"matmul": 6 * sum(matmul_params(h).values()),
                                  "attention": attention_flops_per_token(h, h.train_seq_len)},
        "flops_per_token_recurrence": model_flops_per_token(h, recurrence=True) if h.recur_blocks else None,
        "peak_tflops": peak, "warmup_ms": warmup_ms,
        "train": summarize_steps(timed, pipelined, h, rt, flops_per_token, peak),
        "compile": {"warmup": warmup_compiles, "timed": timed_compiles},
        "memory": {"warmup": memory_warmup, "timed_steps": memory_timed},
        "host_syncs": host_syncs, "profile": profile, "profiled_attention_kernels": profiled_attention,
    }
    if args.recur_at is not None:
        result["train"]["recurrence"] = {"recur_at": args.recur_at, "blocks": h.recur_blocks,
                                         **recurrence_phases(timed["step_ms"], args.recur_at, h, rt, peak, {
                                             "recur_off": timed["memory_recur_off"], "recur_on": memory_timed})}
    if args.eval:
        log("bench: timing the sliding-window evaluation")
        with tg.compiled_graphs_only(h, rt, "inside the timed steps"):
            result["eval"] = time_evaluation(h, rt, model, val, base_model.recur_active)
        # the model scored has taken every step above (the sync count's one only on CUDA)
        result["eval"]["after_steps"] = next_step + (rt.device.type == "cuda") + args.profile_steps
    if args.quant:
        log("bench: timing quantization and compression")
        result["quant"] = time_quantization(h, rt, base_model)
    return result


def write_outputs(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = report_table(result)
    if result.get("profile"):
        table += "\nprofile (top ops by self time):\n" + result["profile"]
    out.with_suffix(".txt").write_text(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(compare_runs(*(json.loads(path.read_text()) for path in args.compare)), end="")
        return 0
    rt = None
    try:
        h, preset, rt = tg.configure(tg.init_runtime())
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        with tempfile.TemporaryDirectory(prefix="bench_shards_") as scratch:
            result = bench(args, h, preset, rt, Path(scratch))
        if rt.is_main:
            out = args.out or default_out(rt, result["device"], preset, result["compile_enabled"], stamp)
            write_outputs(result, out)
            print(report_table(result), end="")
            print(f"bench: wrote {out} and {out.with_suffix('.txt')}")
        return 0
    except tg.RunError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if rt is not None and rt.distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
