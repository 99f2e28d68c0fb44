"""What attention within documents (DOC_ATTENTION) costs on CPU, against plain causal SDPA.

    OMP_NUM_THREADS=1 python3 bench/doc_attention.py                 # prints the table
    OMP_NUM_THREADS=1 python3 bench/doc_attention.py --reps 5 > logs/bench/doc_attention_cpu.txt

Rows, per shape (B x H/Hkv heads x T x head dim, fp32): `causal` (train_gpt.causal_attention as every
preset runs it), `sdpa-mask` (the same call with DOC_ATTENTION's boolean mask: the path train_gpt
takes), `mask-build` (document_mask from the tokens: once per forward pass, shared by every layer),
FlexAttention with a document block mask, eager and compiled (CPU has no FlexAttention backward in
torch 2.13, so only its forward is timed), and `block-mask-build` (create_block_mask). Then the whole
proxy model (the lab's shape: frontier at d128, 11 layers, 2 x 256 tokens a micro-batch) forward and
backward with DOC_ATTENTION off and on. Documents: bench/attn_check.py's seeded uniform lengths (T/32 .. T/2).
Times are medians of --reps (ms); on a shared CPU expect +-10% between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

_spec = importlib.util.spec_from_file_location("attn_check", REPO / "bench" / "attn_check.py")
attn_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attn_check)

SHAPES = {"proxy micro-batch": (2, 2, 1, 256, 64), "sp8192 row": (1, 8, 4, 2048, 64)}
PROXY = {"PRESET": "frontier", "MODEL_DIM": "128", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "256",
         "TRAIN_BATCH_TOKENS": "4096", "COMPILE": "0"}


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def attention_rows(name: str, shape, reps: int) -> list[tuple[str, str]]:
    B, H, Hkv, T, hd = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, T, hd, generator=g) for heads in (H, Hkv, Hkv))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    tokens = attn_check.document_tokens(B, T, "cpu", "uniform")
    docs = attn_check.document_ids(tokens)
    mask = tg.document_mask(tokens)
    fwd_bwd = lambda run: lambda: run(*leaves).sum().backward()
    rows = [("causal fwd+bwd", median_ms(fwd_bwd(lambda a, b, c: tg.causal_attention(a, b, c)), reps)),
            ("sdpa-mask fwd+bwd", median_ms(fwd_bwd(lambda a, b, c: tg.causal_attention(a, b, c, mask=mask)), reps)),
            ("mask-build", median_ms(lambda: tg.document_mask(tokens), reps))]
    with torch.no_grad():
        rows += [("causal fwd", median_ms(lambda: tg.causal_attention(q, k, v), reps)),
                 ("sdpa-mask fwd", median_ms(lambda: tg.causal_attention(q, k, v, mask=mask), reps))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for label, compiled in (("flex eager fwd", False), ("flex compiled fwd", True)):
                run = attn_check.flex(compiled)
                rows.append((label, median_ms(lambda: run(q, k, v, tokens), max(1, reps // 2))))
            from torch.nn.attention.flex_attention import create_block_mask
            mask_mod = lambda b, h, qi, ki: (qi >= ki) & (docs[b, qi] == docs[b, ki])
            rows.append(("block-mask-build", median_ms(lambda: create_block_mask(mask_mod, B, None, T, T, device="cpu"),
                                                       max(1, reps // 2))))
    try:
        attn_check.flex(False)(*leaves, tokens).sum().backward()
        backward = "runs"
    except Exception as exc:  # torch 2.13: "FlexAttention does not support backward on CPU"
        backward = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    base = rows[0][1]
    out = [(f"{name} {'x'.join(map(str, shape))} {label}", f"{ms:9.2f} ms  ({ms / base:5.2f}x causal fwd+bwd)")
           for label, ms in rows]
    return out + [(f"{name} flex backward on CPU", backward)]


def model_rows(reps: int) -> list[tuple[str, str]]:
    h, _ = tg.hyperparameters_from_env(PROXY, cuda_available=False)
    x = torch.randint(4, h.vocab_size, (2, h.train_seq_len + 1), generator=torch.Generator().manual_seed(0))
    x[:, ::200] = tg.BOS_ID
    rows, base = [], None
    for on in (False, True):
        torch.manual_seed(0)
        model = tg.GPT(dataclasses.replace(h, doc_attention=on))
        model.start_recurrence()
        ms = median_ms(lambda: model(x[:, :-1], x[:, 1:]).backward(), reps)
        base = base or ms
        rows.append((f"proxy model fwd+bwd 2x{h.train_seq_len}, DOC_ATTENTION={int(on)}",
                     f"{ms:9.2f} ms  ({ms / base:5.2f}x off)"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    args = p.parse_args(argv)
    print(f"doc_attention: torch {torch.__version__}, cpu, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.reps}", flush=True)
    for name in args.shapes.split(","):
        for label, figure in attention_rows(name, SHAPES[name], args.reps):
            print(f"{label:<52} {figure}", flush=True)
    for label, figure in model_rows(args.reps):
        print(f"{label:<52} {figure}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
