"""The 1.06 stack's quantizer pieces on and off, on one trained proxy model, and the full-size estimate.

    OMP_NUM_THREADS=1 PRESET=frontier DATA_PATH=... python3 bench/quant_pieces.py --raw /tmp/q.pt \
        [--val-tokens N] [--calib-batches 32] [--out logs/bench/quant_pieces.txt]

Trains one model with train_gpt.py's own code, configured by the environment as train_gpt.py is (or
loads the unquantized weights --raw saved before), collects GPTQ Hessians (with the head's) from
--calib-batches training batches, then for each variant quantizes the same weights, serializes,
reads the artifact back and scores it on the same validation tokens: model bytes and roundtrip
val_bpb. Variants: the pieces added one at a time from today's int6 GPTQ + clip search, then all
on less each one.

Then the full-size estimate for the sp8192 shape (11L d512 8/4 heads MLP 4x, tied 8,192 x 512
embedding; parameters counted on the model train_gpt.py builds): the measured compressed bits per
value of each class of this proxy's weights under the chosen clip widths (zstd-22 of that class's
values alone), its scales and extras per row, times the full-size counts. An estimate: the full
model's weight distributions are not this proxy's. The table goes to stdout and --out.
"""

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
from bench.quant_gap import score, trained_state  # noqa: E402

SDCLIP = dict(sdclip_attn=13.0, sdclip_mlp=11.5, sdclip_other=12.85)  # PR #1855's widths
EMBED = dict(quant_bits_embed=7, gptq_embed=True, sdclip_embed=14.0)
ALL_ON = dict(**SDCLIP, **EMBED, quant_gates_int8=True, lqer_top=3, awq_groups=1)
# Each variant: overrides of the base (int6 everywhere, int8 embedding, clip search) and whether GPTQ runs.
VARIANTS = [
    ("rtn_clip_search", {}, False),
    ("gptq_clip_search", {}, True),
    ("+sdclip", SDCLIP, True),
    ("+embed_int7_gptq", dict(**SDCLIP, **EMBED), True),
    ("+gates_int8", dict(**SDCLIP, **EMBED, quant_gates_int8=True), True),
    ("+lqer_3", dict(**SDCLIP, **EMBED, quant_gates_int8=True, lqer_top=3), True),
    ("+awq_1 (all on)", ALL_ON, True),
    ("all - gptq", ALL_ON | dict(gptq_embed=False, awq_groups=0), False),
    ("all - sdclip", ALL_ON | dict(sdclip_attn=0.0, sdclip_mlp=0.0, sdclip_other=0.0, sdclip_embed=0.0), True),
    ("all - lqer", ALL_ON | dict(lqer_top=0), True),
    ("all - awq", ALL_ON | dict(awq_groups=0), True),
]


def quantize(h, state, hessians) -> dict:
    """write_artifact's quantization, without the fitting."""
    return tg.quantize_model(state, h, hessians)[0]


def kind(name: str) -> str:
    if name == "tok_emb.weight":
        return "embed"
    for pattern, label in ((tg.BLOCK_ATTN, "attn"), (tg.BLOCK_MLP, "mlp"), (tg.GATE_TENSORS, "gates")):
        if tg.re.fullmatch(pattern, name):
            return label
    return "other"


def zstd_bytes(arrays: list[np.ndarray]) -> int:
    if not arrays:
        return 0
    data = b"".join(tg.to_byte_planes(np.ascontiguousarray(a)) for a in arrays)
    return len(zstandard.ZstdCompressor(level=22).compress(data))


def class_costs(quantized: dict) -> dict[str, dict]:
    """Per kind of tensor: values, rows, and compressed bytes of its values, its scales and its AWQ group."""
    costs = {}
    for label in ("attn", "mlp", "embed", "gates", "other"):
        entries = [e for n, e in quantized.items() if kind(n) == label]
        if not entries:
            continue
        quant = [e for e in entries if e["class"] in tg.QUANT_BITS]
        costs[label] = dict(
            values=sum(math.prod(e["shape"]) for e in entries),
            rows=sum(len(e["arrays"]["scale"]) for e in quant),
            value_bytes=zstd_bytes([e["arrays"]["q"] for e in quant] + [e["arrays"]["value"] for e in entries
                                                                         if "value" in e["arrays"]]),
            scale_bytes=zstd_bytes([e["arrays"]["scale"] for e in quant]),
            awq_bytes=zstd_bytes([e["arrays"][p] for e in quant if "awq_q" in e["arrays"] for p in tg.AWQ_PARTS]),
            awq_values=sum(e["arrays"]["awq_q"].size for e in quant if "awq_q" in e["arrays"]),
            classes=sorted({e["class"] for e in entries}),
        )
    return costs


def lqer_cost(quantized: dict) -> tuple[int, int]:
    """(compressed bytes, values) of every LQER factor and scale."""
    arrays = [e["arrays"][p] for e in quantized.values() if "lqer_a" in e["arrays"] for p in tg.LQER_PARTS]
    return zstd_bytes(arrays), sum(a.size for a in arrays)


def full_size_counts() -> tuple[dict[str, dict], int]:
    """Values and rows per kind in the sp8192 shape, on the model train_gpt.py builds (meta tensors)."""
    h = dataclasses.replace(tg.Hyperparameters(), **(tg.FRONTIER | ALL_ON | dict(
        num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4, vocab_size=8192, bigram_vocab_size=0,
        ve_layers="", first_block_mlp_only=False, recur_blocks="3,4,5", recur_untie_mlp=False, virtual_depth=False,
        lanes_from=8, quant_bits_mlp=6)))
    tg.validate(h)
    with torch.device("meta"):
        state = tg.GPT(h).state_dict()
    plan = tg.quant_plan(state, h)
    counts = {}
    for name, tensor in state.items():
        c = counts.setdefault(kind(name), dict(values=0, rows=0, classes=set()))
        c["values"] += tensor.numel()
        c["rows"] += tensor.shape[0] if plan[name] in tg.QUANT_BITS and tensor.dim() == 2 else 0
        c["classes"].add(plan[name])
    return counts, sum(t.numel() for t in state.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, help="unquantized weights: loaded if the file exists, else saved there")
    ap.add_argument("--val-tokens", type=int, default=0, help="score only this many validation tokens (0: all)")
    ap.add_argument("--calib-batches", type=int, default=32, help="GPTQ calibration batches of TRAIN_BATCH_TOKENS")
    ap.add_argument("--code-bytes", type=int, default=0,
                    help="code bytes for the estimate (0: this train_gpt.py's shipped form)")
    ap.add_argument("--out", type=Path, default=Path("logs/bench/quant_pieces.txt"))
    args = ap.parse_args()
    lines = []

    def out(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    h, preset, rt = tg.configure(tg.init_runtime())
    h = dataclasses.replace(h, quant_bits_mlp=6, quant_bits_embed=8)
    out(f"preset:{preset} layers:{h.num_layers} dim:{h.model_dim} mlp_mult:{h.mlp_mult} vocab:{h.vocab_size} "
        f"iterations:{h.iterations} batch:{h.train_batch_tokens} seq:{h.train_seq_len} data:{h.data_path}")
    sp = tg.load_tokenizer(h)
    val = tg.load_validation(h, sp, rt)
    state = trained_state(h, rt, val, args.raw)
    if args.val_tokens:
        val = tg.load_validation(dataclasses.replace(h, val_tokens=args.val_tokens), sp, rt)
    out(f"scoring {val.num_targets} targets, {val.num_bytes} bytes")
    model = tg.build_model(h, rt)
    model.load_state_dict(state, strict=True)
    loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, rt)
    calib = dataclasses.replace(h, gptq_calib_tokens=args.calib_batches * h.train_batch_tokens, gptq_embed=True)
    t0 = time.perf_counter()
    hessians = tg.collect_hessians(model, loader, calib, rt)
    out(f"GPTQ calibration: {args.calib_batches} batches of {h.train_batch_tokens} tokens, "
        f"{len(hessians)} Hessians, {time.perf_counter() - t0:.1f}s")
    base_bpb = score(h, rt, state, val)
    out(f"\n{'variant':22s} {'val_bpb':>9s} {'gap':>9s} {'model_bytes':>12s} {'d_bytes':>9s} {'seconds':>8s}")
    out(f"{'unquantized':22s} {base_bpb:9.5f}")
    results, reference = {}, None
    for name, overrides, gptq in VARIANTS:
        hv = dataclasses.replace(h, **overrides)
        t0 = time.perf_counter()
        quantized = quantize(hv, state, hessians if gptq else None)
        seconds = time.perf_counter() - t0
        blob = tg.serialize_artifact(quantized, tg.model_config(hv))
        _, loaded = tg.deserialize_artifact(blob, name)
        bpb = score(h, rt, tg.dequantize_state(loaded), val)
        reference = reference or len(blob)
        out(f"{name:22s} {bpb:9.5f} {bpb - base_bpb:+9.5f} {len(blob):12d} {len(blob) - reference:+9d} {seconds:8.1f}")
        results[name] = quantized
    all_on = dataclasses.replace(h, **ALL_ON)
    proxy_bytes = len(tg.serialize_artifact(results["+awq_1 (all on)"], tg.model_config(all_on)))
    estimate(results["all - awq"], results["+awq_1 (all on)"], proxy_bytes, args.code_bytes, out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


def estimate(no_awq: dict, all_on: dict, proxy_bytes: int, code_bytes: int, out) -> None:
    """Bytes per value of each kind from `no_awq` (AWQ's zeroed group columns would flatter them);
    AWQ and LQER from `all_on`, scaled to the full size's largest matrix (bounds)."""
    costs, awq_costs = class_costs(no_awq), class_costs(all_on)
    out("\nproxy, all on but AWQ: compressed bytes per kind (zstd-22 of that kind alone)")
    out(f"{'kind':6s} {'classes':14s} {'values':>9s} {'rows':>6s} {'bits/value':>10s} {'scale B/row':>11s}")
    for label, c in costs.items():
        out(f"{label:6s} {','.join(c['classes']):14s} {c['values']:9d} {c['rows']:6d} "
            f"{8 * c['value_bytes'] / c['values']:10.3f} {c['scale_bytes'] / max(c['rows'], 1):11.3f}")
    awq_bytes = sum(c["awq_bytes"] for c in awq_costs.values())
    awq_values = sum(c["awq_values"] for c in awq_costs.values())
    lqer_bytes, lqer_values = lqer_cost(all_on)
    parts = sum(c["value_bytes"] + c["scale_bytes"] + c["awq_bytes"] for c in awq_costs.values()) + lqer_bytes
    out(f"awq: {awq_bytes} bytes for {awq_values} int8 values; lqer: {lqer_bytes} bytes for {lqer_values} values "
        f"and scales")
    out(f"all on: sum of the kinds {parts} bytes; the proxy artifact {proxy_bytes} bytes (header and framing: "
        f"{proxy_bytes - parts})")
    counts, total_params = full_size_counts()
    code_bytes = code_bytes or len(tg.shipped_form(Path(tg.__file__).read_bytes()))
    out(f"\nESTIMATE, sp8192 shape, all on: {total_params} parameters")
    total = 0.0
    for label, c in counts.items():
        proxy = costs.get(label)
        if proxy is None or not c["rows"]:  # fp16, or a kind the proxy lacks: 2 bytes a value
            nbytes = c["values"] * 2
        else:
            nbytes = c["values"] * proxy["value_bytes"] / proxy["values"] + \
                c["rows"] * proxy["scale_bytes"] / proxy["rows"]
        total += nbytes
        out(f"{label:6s} {','.join(sorted(c['classes'])):14s} {c['values']:9d} values {c['rows']:6d} rows "
            f"-> {nbytes:12.0f} bytes ({8 * nbytes / c['values']:.3f} bits/value)")
    # bounds: the AWQ groups and LQER's 3 corrections as if all on the widest matrix (the 8192 x 512 embedding)
    groups = sum(len(e["arrays"]["awq_group"]) for e in all_on.values() if "awq_q" in e["arrays"])
    full_awq = groups * 8192 * tg.AWQ_WIDTH * awq_bytes / max(awq_values, 1)
    full_lqer = 3 * (tg.LQER_RANK * (8192 + 512) + 8192 * tg.LQER_RANK // 512 + 1) * lqer_bytes / max(lqer_values, 1)
    header = proxy_bytes - parts
    total += full_awq + full_lqer + header
    out(f"awq (<= {groups} group(s) of 8192 rows at the proxy's bytes per value, less nothing): {full_awq:.0f} bytes")
    out(f"lqer (<= 3 x the embedding's factors at the proxy's bytes per value): {full_lqer:.0f} bytes")
    out(f"header and framing (as the proxy's): {header}")
    out(f"model ~{total:.0f} bytes + code {code_bytes} = ~{total + code_bytes:.0f}; margin under 16,000,000: "
        f"~{16_000_000 - total - code_bytes:.0f} (estimate)")

if __name__ == "__main__":
    main()
