"""Attention kernels at the presets' real shapes: which ones run, whether they match, how fast.

    python3 bench/attn_check.py                               # CUDA: the GPU presets' shapes, every candidate
    python3 bench/attn_check.py --presets sp8192 --cases documents --out $OUT/attention.json   # the device call
    OMP_NUM_THREADS=1 python3 bench/attn_check.py --shape 2,4,2,64,16 --reps 1    # CPU: a toy shape

Cases: `causal` at each preset's per-GPU micro-batch (TRAIN_BATCH_TOKENS / 8 / TRAIN_SEQ_LEN sequences
x NUM_HEADS / NUM_KV_HEADS heads x TRAIN_SEQ_LEN x head dim, bf16 on CUDA: 48 x 8/4 x 2048 x 64 for
sp8192 and the frontier), and `documents`: causal attention within documents only (DOC_ATTENTION), on
sp8192's shape (else the first), the rows holding seeded documents back to back, a BOS starting each
(--documents lognormal: FineWeb-like lengths, mean DOC_MEAN_TOKENS; uniform: 1/32 .. 1/2 of a row).
Candidates: SDPA as ATTN_BACKEND=auto leaves it (the row names the aten op torch dispatched), each SDPA
kernel alone (flash, efficient, cudnn; math as the slow baseline), FlashAttention 3 and 4 where they
import (`flash_attn_interface`, `flash_attn.cute`: not installed is a row, not an error); for documents
SDPA with train_gpt's dense (B, 1, T, T) mask, FlexAttention with a block mask (compiled on CUDA;
train_gpt's document_block_mask where it has one), torch's varlen_attn and the FA varlen entry points
(documents as variable-length sequences), and SDPA cuDNN plain causal, the no-document baseline (checked
against the causal reference). Each is compared with one reference, fp32 math attention on the same
inputs: the relative error ||out - ref|| / ||ref|| of the output and of the gradients of q, k, v (for a
random output gradient), on the first --check-batch sequences; then forward and forward+backward are
timed on the whole micro-batch (median of --reps after a warm-up; CUDA events). A kernel that rejects
a shape says why in its row; nothing here stops at a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

GPU_PRESET_ORDER = ("frontier", "pr1204", "sp8192", "pr76")  # the shapes worth the device's time, first first
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}  # relative error that still matches
CASES = ("causal", "documents")
# FineWeb-like documents: mean ~800 tokens (the SP8192 validation split holds 40,540,160 targets in 50,000
# documents: 811); the spread, lognormal with sigma 1 (median ~490), is an assumption, not a measurement.
DOC_MEAN_TOKENS, DOC_SIGMA = 800, 1.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="", help="comma-separated presets whose shapes to check "
                                                  "(default: those of frontier, pr1204, sp8192, pr76 that exist)")
    p.add_argument("--shape", default="", help="B,H,HKV,T,HD instead of the presets' shapes (a toy shape for CPU)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: causal, documents")
    p.add_argument("--documents", choices=("lognormal", "uniform"), default="lognormal",
                   help="document lengths of the documents case")
    p.add_argument("--check-batch", type=int, default=2, help="sequences compared with the fp32 reference")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (median)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (the table is printed)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.check_batch < 1:
        p.error("--reps and --check-batch must be >= 1")
    if not set(args.cases.split(",")) <= set(CASES):
        p.error(f"--cases {args.cases!r}: expected a comma-separated subset of {', '.join(CASES)}")
    return args


def preset_shapes(names: list[str]) -> list[dict]:
    """One case per distinct shape: (preset, B, H, Hkv, T, hd) of a per-GPU micro-batch."""
    shapes, seen = [], set()
    for name in names:
        if name not in tg.PRESETS:
            raise SystemExit(f"attn_check: unknown preset {name}; train_gpt has {', '.join(tg.PRESETS)}")
        h, _ = tg.hyperparameters_from_env({"PRESET": name}, True)
        shape = (h.train_batch_tokens // tg.SLICES_PER_STEP // h.train_seq_len, h.num_heads, h.num_kv_heads,
                 h.train_seq_len, h.model_dim // h.num_heads)
        if shape not in seen:
            seen.add(shape)
            shapes.append({"preset": name, "shape": shape})
    return shapes


# -----------------------------------------------------------------------------
# Documents: token rows with a BOS starting each document, and the pieces attention sees


def document_lengths(total: int, seq_len: int, kind: str = "lognormal", seed: int = 0) -> list[int]:
    """Seeded document lengths (tokens) that tile `total`: `lognormal` with mean DOC_MEAN_TOKENS and
    sigma DOC_SIGMA (at least 1 token), `uniform` seq_len/32 .. seq_len/2 (64..1024 at 2048). The last
    is cut to fit."""
    rng, lengths, filled = torch.Generator().manual_seed(seed), [], 0
    mu = math.log(DOC_MEAN_TOKENS) - DOC_SIGMA ** 2 / 2  # the lognormal's mean is exp(mu + sigma^2 / 2)
    while filled < total:
        if kind == "lognormal":
            length = max(1, round(math.exp(mu + DOC_SIGMA * float(torch.randn(1, generator=rng)))))
        else:
            length = int(torch.randint(max(1, seq_len // 32), seq_len // 2 + 1, (1,), generator=rng))
        lengths.append(min(length, total - filled))
        filled += lengths[-1]
    return lengths


def document_tokens(batch: int, seq_len: int, device, kind: str = "lognormal") -> torch.Tensor:
    """(B, T) token ids: documents of document_lengths back to back, cut into rows (a document crosses a
    row's end as in the token stream), tg.BOS_ID starting each; the other ids are 4 (only BOS matters)."""
    lengths = torch.tensor(document_lengths(batch * seq_len, seq_len, kind))
    tokens = torch.full((batch * seq_len,), 4, dtype=torch.long)
    tokens[lengths.cumsum(0)[:-1]] = tg.BOS_ID
    tokens[0] = tg.BOS_ID
    return tokens.view(batch, seq_len).to(device)


def document_ids(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) document number of each position within its row, as tg.document_mask counts them: a BOS
    starts one, and so does a row's start (the part of a document carried over from the last row)."""
    return torch.cumsum(tokens == tg.BOS_ID, dim=1)


def piece_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Lengths of the pieces attention sees in tokens (B, T), row after row: a piece starts at a BOS or
    at a row's start. The variable-length sequences of a varlen kernel."""
    starts = tokens == tg.BOS_ID
    starts[:, 0] = True
    first = starts.flatten().nonzero().flatten()
    return torch.diff(first, append=torch.tensor([tokens.numel()], device=first.device))


def reference(q, k, v, tokens=None):
    """fp32 math attention, GQA by repeating k, v; causal, within documents when tokens are given."""
    group = q.size(1) // k.size(1)
    q, k, v = q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    T = q.size(2)
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if tokens is not None:
        docs = document_ids(tokens)
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    scores = (q @ k.mT) / q.size(-1) ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


# -----------------------------------------------------------------------------
# Candidates: each a function (q, k, v, tokens) -> out, with q (B, H, T, hd), k, v (B, Hkv, T, hd) and
# tokens (B, T) or None (causal case). Optional attributes: `note` (said in the row) and `documents`
# (False: a baseline that ignores documents, checked against the causal reference).


def per_input(build):
    """build(tokens), made once per input tensor: a training step builds its masks once per batch and
    every layer shares them."""
    cache = {}

    def get(tokens):
        key = (tokens.data_ptr(), tuple(tokens.shape))
        if key not in cache:
            cache[key] = build(tokens)
        return cache[key]
    return get


def sdpa(backend: SDPBackend | None, masked: bool = False):
    masks = per_input(tg.document_mask)  # train_gpt's own (B, 1, T, T) mask

    def run(q, k, v, tokens):
        gqa = k.size(1) != q.size(1)
        context = sdpa_kernel(backend) if backend is not None else sdpa_kernel(
            [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)])
        with context:
            if not masked:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=masks(tokens), enable_gqa=gqa)
    return run


def causal_baseline():
    """SDPA cuDNN, plain causal: what attention costs without documents."""
    run = sdpa(SDPBackend.CUDNN_ATTENTION)
    run.documents, run.note = False, "no documents: the causal baseline"
    return run


def flash_attn_dense(module_name: str):
    module = optional_module(module_name)
    if module is None:
        return None
    return lambda q, k, v, tokens: tg.causal_attention(q, k, v, module.flash_attn_func)


def varlen(call):
    """A varlen kernel as a candidate: the pieces (piece_lengths) as variable-length sequences, q, k, v
    packed (B * T, heads, hd), cumulative lengths int32; call(q, k, v, cu_seqlens, longest) -> out."""
    def cumulative(tokens):
        lengths = piece_lengths(tokens)
        return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), int(lengths.max())
    pieces = per_input(cumulative)

    def run(q, k, v, tokens):
        B, H, T, hd = q.shape
        cu, longest = pieces(tokens)
        pack = lambda x: x.transpose(1, 2).reshape(B * T, x.size(1), hd)
        y = call(pack(q), pack(k), pack(v), cu, longest)
        y = y[0] if isinstance(y, tuple) else y
        return y.view(B, T, H, hd).transpose(1, 2)
    return run


def flash_attn_varlen(module_name: str):
    module = optional_module(module_name)
    if module is None or not hasattr(module, "flash_attn_varlen_func"):
        return None
    return varlen(lambda q, k, v, cu, n: module.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n, causal=True))


def torch_varlen():
    """torch.nn.attention.varlen.varlen_attn where this torch has it: causal by window_size=(-1, 0)
    (or is_causal in the first versions); GQA by enable_gqa from torch 2.12, else the KV heads are
    expanded to the query heads (said in the row)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = "enable_gqa" in params

    def call(q, k, v, cu, n):
        group = q.size(1) // k.size(1)
        if group > 1 and not gqa:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        extra = {"enable_gqa": True} if group > 1 and gqa else {}
        return varlen_attn(q, k, v, cu, cu, n, n, **causal, **extra)
    run = varlen(call)
    run.note = "GQA: enable_gqa" if gqa else "GQA: KV heads expanded (no enable_gqa in this torch)"
    return run


def flex(compiled: bool):
    """FlexAttention with a block mask: train_gpt's document_block_mask where it has one, else this
    bench's (causal and same document, documents numbered as document_ids)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    kernel = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def own_block_mask(tokens):
        docs = document_ids(tokens)
        mask_mod = lambda b, h, qi, ki: (qi >= ki) & (docs[b, qi] == docs[b, ki])
        return create_block_mask(mask_mod, tokens.size(0), None, tokens.size(1), tokens.size(1), device=tokens.device)
    ours = getattr(tg, "document_block_mask", None)
    masks = per_input(ours or own_block_mask)

    def run(q, k, v, tokens):
        return kernel(q, k, v, block_mask=masks(tokens), enable_gqa=k.size(1) != q.size(1))
    run.note = "mask: train_gpt.document_block_mask" if ours else "mask: the bench's (no tg.document_block_mask)"
    return run


def optional_module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def candidates(device: torch.device, case: str) -> dict:
    """name -> function, or None where the kernel is not installed here."""
    cuda = device.type == "cuda"
    if case == "causal":
        found = {"sdpa-auto": sdpa(None), "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
                 "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION), "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
                 "sdpa-math": sdpa(SDPBackend.MATH)}
        for name, module in tg.OPTIONAL_KERNELS.items():
            found[name] = flash_attn_dense(module) if cuda else None
        return found
    found = {"flex": flex(compiled=cuda), "torch-varlen": torch_varlen() if cuda else None}
    for name, module in tg.OPTIONAL_KERNELS.items():
        found[f"{name}-varlen"] = flash_attn_varlen(module) if cuda else None
    found.update({"sdpa-cudnn-mask": sdpa(SDPBackend.CUDNN_ATTENTION, masked=True),
                  "sdpa-efficient-mask": sdpa(SDPBackend.EFFICIENT_ATTENTION, masked=True),
                  "sdpa-math-mask": sdpa(SDPBackend.MATH, masked=True), "sdpa-cudnn-causal": causal_baseline()})
    return found


# -----------------------------------------------------------------------------
# Checking and timing


class DispatchedOps(TorchDispatchMode):
    """Records the names of the aten ops that run below autograd (the kernels SDPA chose)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


SDPA_OPS = (("_scaled_dot_product_flash_attention_for_cpu", "flash-cpu"),  # most specific names first
            ("_scaled_dot_product_flash_attention", "flash"), ("_scaled_dot_product_efficient_attention", "efficient"),
            ("_efficient_attention_forward", "efficient"), ("_scaled_dot_product_cudnn_attention", "cudnn"),
            ("_scaled_dot_product_fused_attention_overrideable", "fused-overrideable"))


def dispatched_kernel_report(h, rt) -> str:
    """The kernel tg.causal_attention runs for one micro-batch of the training shape (batch 1 on CPU or with
    DOC_ATTENTION), in the training dtype, forward and backward (forward only for EVAL_ONLY), with the
    ATTN_BACKEND in force: named from the aten op torch dispatched (`math`: no fused op ran). With
    DOC_ATTENTION, the model's own mask (tg.attention_mask), a BOS every 200 positions. A pinned kernel that
    rejects the shape is a one-line tg.RunError. tg.attention_kernel_report says what was selected."""
    head_dim = h.model_dim // h.num_heads
    batch = h.train_batch_tokens // tg.SLICES_PER_STEP // h.train_seq_len if rt.device.type == "cuda" else 1
    batch = 1 if h.doc_attention else batch  # uncompiled FlexAttention materializes the scores: one row
    dtype = torch.bfloat16 if rt.bf16 else torch.float32
    shape = f"{batch}x{h.num_heads}/{h.num_kv_heads} heads x {h.train_seq_len} x {head_dim} {str(dtype)[6:]}"
    grad = not h.eval_only
    q = torch.randn(batch, h.num_heads, h.train_seq_len, head_dim, device=rt.device, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(batch, h.num_kv_heads, h.train_seq_len, head_dim, device=rt.device, dtype=dtype,
                        requires_grad=grad) for _ in range(2))
    kernel = tg.optional_kernel(h.attn_backend) if rt.device.type == "cuda" else None
    mask = None
    if h.doc_attention:
        tokens = (torch.arange(h.train_seq_len, device=rt.device)[None] % 200 == 0).long() * tg.BOS_ID
        with torch.set_grad_enabled(grad):
            mask = tg.attention_mask(tokens.expand(batch, -1), h.attn_backend)
        shape += " within documents"
    recorder = DispatchedOps()  # FlexAttention (a higher-order op) runs outside it: its kernel is known
    try:
        with (warnings.catch_warnings(), torch.set_grad_enabled(grad),
              contextlib.nullcontext() if isinstance(mask, tg.BlockMask) else recorder):
            warnings.simplefilter("ignore")  # torch warns why each kernel does not apply; the error says it
            y = tg.causal_attention(q, k, v, kernel, mask)
            if grad:
                y.sum().backward()
    except RuntimeError as exc:
        raise tg.RunError(f"ATTN_BACKEND={h.attn_backend}: no kernel it allows runs attention of {shape} on "
                          f"{rt.device.type} ({str(exc).splitlines()[0][:200]})") from None
    if kernel is not None:
        return f"{h.attn_backend} ({tg.OPTIONAL_KERNELS[h.attn_backend]}.flash_attn_func) for {shape}"
    if isinstance(mask, tg.BlockMask):
        return f"flex (FlexAttention, {tg.FLEX_BLOCK}x{tg.FLEX_BLOCK} block mask) for {shape}"
    ran = next((label for op, label in SDPA_OPS if any(n.startswith(op) for n in recorder.names)), "math")
    op = next((f"aten.{n.removesuffix('.default')}" for n in recorder.names if "attention" in n), "bmm + softmax")
    return f"{ran} ({op}) for {shape}" + (" (dense mask)" if h.doc_attention else "")


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def make_inputs(shape, dtype, device, seed: int):
    B, H, Hkv, T, hd = shape
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda heads: torch.randn(B, heads, T, hd, generator=g, device=device, dtype=dtype)
    return make(H), make(Hkv), make(Hkv), make(H)  # q, k, v, the output's gradient


def check(run, shape, dtype, device, tokens, seed: int) -> dict:
    """Output and q/k/v-gradient errors against the fp32 reference (fresh random inputs): within the
    documents of `tokens`, or causal for a candidate that ignores them (documents=False)."""
    q, k, v, grad = make_inputs(shape, dtype, device, seed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    recorder = DispatchedOps()
    with recorder:
        out = run(*leaves, tokens)
    out.backward(grad)
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_leaves, tokens if getattr(run, "documents", True) else None)
    ref.backward(grad.float())
    errors = {"out": relative_error(out.detach(), ref.detach())}
    for name, mine, theirs in zip("qkv", leaves, ref_leaves):
        errors[f"d{name}"] = relative_error(mine.grad, theirs.grad)
    fused = [n.removesuffix(".default") for n in recorder.names if "attention" in n]
    return {"errors": errors, "aten_op": fused[0] if fused else None}


def timer(device: torch.device):
    if device.type == "cuda":
        def measure(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return measure

    def measure(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)
    return measure


def time_kernel(run, shape, dtype, device, tokens, reps: int) -> dict:
    q, k, v, grad = make_inputs(shape, dtype, device, seed=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    measure = timer(device)

    def forward():
        with torch.no_grad():
            run(q, k, v, tokens)

    def forward_backward():
        run(q, k, v, tokens).backward(grad)

    forward(), forward_backward()  # warm-up: compilation, workspace allocation, cuDNN plans
    fwd = statistics.median(measure(forward) for _ in range(reps))
    both = statistics.median(measure(forward_backward) for _ in range(reps))
    return {"fwd_ms": fwd, "fwd_bwd_ms": both}


def attention_flops(shape, tokens=None) -> float:
    """Forward FLOPs of the scores and the weighted sum over the pairs a query attends to: causal over
    the row, or within the pieces of `tokens` (piece_lengths)."""
    B, H, _, T, hd = shape
    pieces = torch.full((B,), T) if tokens is None else piece_lengths(tokens).cpu()
    return 4 * float((pieces * (pieces + 1) // 2).sum()) * H * hd


def documents_summary(tokens: torch.Tensor, kind: str) -> dict:
    """What the documents case ran on: its pieces and their attention work against causal's."""
    pieces = piece_lengths(tokens).cpu()
    shape = (tokens.size(0), 1, 1, tokens.size(1), 1)
    return {"kind": kind, "mean_document_tokens": DOC_MEAN_TOKENS if kind == "lognormal" else None,
            "pieces": len(pieces), "mean_piece_tokens": float(pieces.float().mean()),
            "work_vs_causal": attention_flops(shape, tokens) / attention_flops(shape)}


def run_case(case: str, shape, dtype, device, args, rows: list[dict], save) -> None:
    tokens = document_tokens(shape[0], shape[3], device, args.documents) if case == "documents" else None
    check_shape = (min(args.check_batch, shape[0]), *shape[1:])
    check_tokens = tokens[:check_shape[0]] if tokens is not None else None
    for name, run in candidates(device, case).items():
        row = {"case": case, "shape": "x".join(map(str, shape)), "kernel": name}
        rows.append(row)
        if run is None:
            row["status"] = "not installed" if device.type == "cuda" else "n/a: needs CUDA"
            print(table_row(row), flush=True)
            save()
            continue
        row["note"] = getattr(run, "note", "")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row.update(check(run, check_shape, dtype, device, check_tokens, seed=0))
                worst = max(row["errors"].values())
                row["status"] = "match" if worst <= TOLERANCE[dtype] else f"MISMATCH ({worst:.2e})"
                row.update(time_kernel(run, shape, dtype, device, tokens, args.reps))
            flops = attention_flops(shape, tokens if getattr(run, "documents", True) else None)
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9  # backward ~2.5x the forward's products
        except Exception as exc:  # a kernel that rejects the shape: its row says why, the rest go on
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(table_row(row), flush=True)
        save()  # after every kernel: a run cut at its time limit keeps the rows it finished


def table_row(row: dict) -> str:
    errors = row.get("errors", {})
    err = f"out {errors['out']:.1e} grad {max(errors['dq'], errors['dk'], errors['dv']):.1e}" if errors else ""
    speed = (f"fwd {row['fwd_ms']:.3f} ms ({row['fwd_tflops']:.0f} TF/s) fwd+bwd {row['fwd_bwd_ms']:.3f} ms"
             if "fwd_ms" in row else "")
    return f"{row['case']:<10} {row['shape']:<16} {row['kernel']:<20} {row['status']:<24} {err:<26} {speed} " \
           f"{row.get('aten_op') or ''} {row.get('note') or ''}".rstrip()


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tg.select_sdpa_kernels("auto")  # as train_gpt configures it; the candidates pin their own kernels
    if args.shape:
        try:
            cases = [{"preset": "--shape", "shape": tuple(int(x) for x in args.shape.split(","))}]
            assert len(cases[0]["shape"]) == 5
        except (ValueError, AssertionError):
            raise SystemExit(f"attn_check: --shape {args.shape!r}: expected B,H,HKV,T,HD") from None
    else:
        names = [n for n in args.presets.split(",") if n] or [n for n in GPU_PRESET_ORDER if n in tg.PRESETS]
        cases = preset_shapes(names)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"attn_check: {device_name}, torch {torch.__version__}, {str(dtype)[6:]}, shapes "
          f"{', '.join(c['preset'] + ' ' + 'x'.join(map(str, c['shape'])) for c in cases)}", flush=True)
    rows = []
    result = {"device": device_name, "torch": torch.__version__, "dtype": str(dtype), "tolerance": TOLERANCE[dtype],
              "reference": "fp32 math attention on the same inputs", "cases": cases, "rows": rows}

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    wanted = args.cases.split(",")
    for case in cases if "causal" in wanted else []:
        run_case("causal", case["shape"], dtype, device, args, rows, save)
    if "documents" in wanted:
        shape = next((c for c in cases if c["preset"] == "sp8192"), cases[0])["shape"]  # the preset that needs it
        result["documents"] = documents_summary(document_tokens(shape[0], shape[3], "cpu", args.documents),
                                                args.documents)
        print(f"attn_check: documents {result['documents']}", flush=True)
        run_case("documents", shape, dtype, device, args, rows, save)
    failed = [r for r in rows if r["status"].startswith("MISMATCH")]
    print(f"attn_check: {sum(r['status'] == 'match' for r in rows)} kernels match, {len(failed)} mismatch, "
          f"{sum(r['status'].startswith('error') for r in rows)} rejected a shape", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
