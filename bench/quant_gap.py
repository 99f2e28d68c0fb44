"""Quantization gap and artifact bytes, side by side on one trained model.

    python3 bench/quant_gap.py --raw /tmp/mid.pt [--val-tokens 200000]

Trains one model with train_gpt.py's own code, configured by the same environment variables (or,
if --raw names an existing file, loads the unquantized weights a previous call saved there), then:

1. scores the unquantized model (standard evaluation, EVAL_SEQ_LEN windows);
2. for each rounding method, quantizes with the record's classes (int5 MLP, int6 attention, fp16
   rest), writes the artifact, reads it back and scores the reloaded model: bpb, gap to (1), bytes;
3. measures what the container layout and the compressor do to the bytes of the old (absmax) and
   new (GPTQ + clip search) quantized weights: int8 containers vs bit-packed payloads, byte planes
   for fp16 (the artifact's layout), zstd levels and long-range window, lzma.

--val-tokens scores a prefix of the validation split, to keep CPU runs short; every method is
scored on the same tokens, so the comparison is like for like. Results go to stdout.
"""

import argparse
import dataclasses
import lzma
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def trained_state(h, rt, val, raw: Path | None) -> dict[str, torch.Tensor]:
    if raw is not None and raw.is_file():
        print(f"loading unquantized weights from {raw}")
        return torch.load(raw, map_location=rt.device, weights_only=True)
    t0 = time.perf_counter()
    base_model, _, _ = tg.train_model(h, dataclasses.replace(rt, log=print), val)
    print(f"trained in {time.perf_counter() - t0:.0f}s")
    state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    if raw is not None:
        torch.save(state, raw)
    return state


def score(h, rt, state, val) -> float:
    model = tg.build_model(h, rt)
    model.load_state_dict(state, strict=True)
    return tg.evaluate(model, val, h.model_eval_seq_len, h.model_eval_seq_len, h.val_batch_size, rt)[1]


def pack_bits(q: np.ndarray, bits: int) -> bytes:
    """Dense little-endian bit packing of signed values offset to [0, 2^bits)."""
    offset = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).ravel()
    planes = np.unpackbits(offset[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def layout_bytes(quantized: dict, mode: str) -> bytes:
    parts = []
    for part in ("q", "scale", "value"):
        for entry in quantized.values():
            if part not in entry["arrays"]:
                continue
            array = np.ascontiguousarray(entry["arrays"][part])
            if part == "q" and mode == "bitpack":
                parts.append(pack_bits(array, tg.QUANT_BITS[entry["class"]]))
            elif array.dtype == np.float16 and mode == "shuffle":
                parts.append(array.view(np.uint8).reshape(-1, 2).T.tobytes())  # low bytes, then high bytes
            else:
                parts.append(array.tobytes())
    return b"".join(parts)


def packing_table(by_method: dict[str, dict]) -> None:
    """Payload bytes (arrays only, no header) per rounding method, layout and compressor."""
    compressors = (("zstd-22", lambda b: zstandard.ZstdCompressor(level=22).compress(b)),
                   ("zstd-19", lambda b: zstandard.ZstdCompressor(level=19).compress(b)),
                   ("zstd-22-long", lambda b: zstandard.ZstdCompressor(level=22, compression_params=
                       zstandard.ZstdCompressionParameters.from_level(22, window_log=27, enable_ldm=True)).compress(b)),
                   ("lzma-9e", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)))
    print("\nmethod        layout   compressor    raw_bytes   compressed  seconds")
    for method, quantized in by_method.items():
        for mode in ("int8", "bitpack", "shuffle"):
            payload = layout_bytes(quantized, mode)
            for name, compress in compressors:
                if mode != "shuffle" and name != "zstd-22":
                    continue
                t0 = time.perf_counter()
                size = len(compress(payload))
                print(f"{method:13s} {mode:8s} {name:12s} {len(payload):10d} {size:11d} {time.perf_counter() - t0:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, help="unquantized weights: loaded if the file exists, else saved there")
    ap.add_argument("--val-tokens", type=int, default=0, help="score only this many validation tokens (0: all)")
    ap.add_argument("--no-packing", action="store_true", help="skip the layout/compressor table")
    ap.add_argument("--bytes-only", action="store_true", help="skip the evaluations: bytes only")
    ap.add_argument("--fit", action="store_true", help="then fit the GPTQ + clip artifact under ARTIFACT_LIMIT_BYTES")
    ap.add_argument("--calib-tokens", type=int, default=131072, help="GPTQ calibration tokens (from train shards)")
    args = ap.parse_args()
    h, preset, rt = tg.configure(tg.init_runtime())
    print(f"preset:{preset} layers:{h.num_layers} dim:{h.model_dim} iterations:{h.iterations} "
          f"batch:{h.train_batch_tokens} seq:{h.train_seq_len} data:{h.data_path}")
    sp = tg.load_tokenizer(h)
    val = tg.load_validation(h, sp, rt)
    state = trained_state(h, rt, val, args.raw)
    if args.val_tokens:  # the prefix train_gpt.py scores with VAL_TOKENS
        val = tg.load_validation(dataclasses.replace(h, val_tokens=args.val_tokens), sp, rt)
    print(f"scoring {val.num_targets} targets, {val.num_bytes} bytes")
    base_bpb = math.nan if args.bytes_only else score(h, rt, state, val)
    print("\nmethod        val_bpb     gap         model_bytes")
    print(f"unquantized   {base_bpb:.6f}")
    plan = tg.quant_plan(state, h)
    model = tg.build_model(h, rt)
    model.load_state_dict(state, strict=True)
    loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, rt)
    t0 = time.perf_counter()
    hessians = tg.collect_hessians(model, loader, tg.dataclasses.replace(h, gptq_calib_tokens=args.calib_tokens), rt)
    print(f"(GPTQ calibration: {args.calib_tokens} training tokens, {time.perf_counter() - t0:.1f}s)")
    by_method = {}
    for method, clip_search, use_hessians in (("absmax", False, False), ("clip_search", True, False),
                                             ("gptq_absmax", False, True), ("gptq_clip", True, True)):
        t0 = time.perf_counter()
        recipes = {n: tg.QuantRecipe(c, hessian=hessians.get(n) if use_hessians else None, clip_search=clip_search)
                   for n, c in plan.items()}
        quantized = tg.quantize_state(state, recipes)
        seconds = time.perf_counter() - t0
        blob = tg.serialize_artifact(quantized, tg.model_config(h))
        _, reloaded = tg.deserialize_artifact(blob, method)
        bpb = math.nan if args.bytes_only else score(h, rt, tg.dequantize_state(reloaded), val)
        print(f"{method:13s} {bpb:.6f}  {bpb - base_bpb:+.6f}  {len(blob):11d}  (quantized in {seconds:.1f}s)")
        by_method[method] = recipes, quantized
    if args.fit:
        fit(h, rt, state, *by_method["gptq_clip"], val, base_bpb, args.bytes_only)
    if not args.no_packing:
        packing_table({m: by_method[m][1] for m in ("absmax", "gptq_clip")})


def fit(h, rt, state, recipes, quantized, val, base_bpb, bytes_only) -> None:
    """train_gpt's fitting policy on this model, as write_artifact runs it."""
    code_bytes = len((Path(tg.__file__)).read_bytes())
    budget = h.artifact_limit_bytes - code_bytes
    print(f"\nfit: limit {h.artifact_limit_bytes}, code {code_bytes}, model budget {budget}")
    t0 = time.perf_counter()
    blob, moves = tg.fit_to_limit(state, dict(quantized), recipes,
                                  lambda q: tg.serialize_artifact(q, tg.model_config(h)), budget, print)
    print(f"fit: {len(moves)} moves in {time.perf_counter() - t0:.0f}s; model {len(blob)} bytes, "
          f"total {len(blob) + code_bytes} (margin {h.artifact_limit_bytes - len(blob) - code_bytes})")
    if not bytes_only:
        bpb = score(h, rt, tg.dequantize_state(tg.deserialize_artifact(blob, "fit")[1]), val)
        print(f"fitted        {bpb:.6f}  {bpb - base_bpb:+.6f}  {len(blob):11d}")


if __name__ == "__main__":
    main()
