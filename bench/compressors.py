"""Compressors on one quantized model: bytes and seconds of each, with and without byte planes.

    python3 bench/compressors.py logs/<RUN_ID>.ptz            # an artifact train_gpt.py wrote
    PRESET=pr1204 NUM_LAYERS=... python3 bench/compressors.py --state weights.pt[:KEY]

--state quantizes a saved state dict (or the KEY entry of a saved dict of them) as train_gpt.py
would with the settings of the environment: the model's shape, GPTQ calibrated as configured
(GPTQ_SELFGEN_SEQS or GPTQ_CALIB_TOKENS, the latter reading DATA_PATH), INT6_MATRICES, the classes.

Every method compresses the same parts the artifact holds (the JSON header, then one part per
section: the integer values of each class, the scales, the fp16 values), each part on its own as
train_gpt.py does, with the multi-byte arrays as byte planes (the artifact's layout) or in their
native byte order. Bytes are the whole file: magic, frame table and frames (brotli's frames carry
a 4-byte CRC-32). lrzip and zpaq run only where their binaries are installed. Then whole artifacts:
brotli, COMPRESSOR=ans, and PR #1855's per-group lrzip with and without its row reordering (lrzip
installed). Results go to stdout.
"""

import argparse
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def quantized_from_state(spec: str) -> tuple[dict, dict[str, dict]]:
    """(model config, quantized state) of a saved state dict, quantized as the environment configures."""
    path, _, key = spec.partition(":")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state[key] if key else state
    h, _ = tg.hyperparameters_from_env(dict(os.environ), cuda_available=False)
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
    model = tg.GPT(h)
    model.load_state_dict(state, strict=True)
    model.recur_active = bool(model.recur_blocks)
    t0 = time.perf_counter()
    hessians = None
    if h.gptq_selfgen_seqs:
        hessians = tg.selfgen_hessians(model, h, rt)
    elif h.gptq_calib_tokens:
        loader = tg.DistributedTokenLoader(tg.find_shards(h, "train"), h.vocab_size, rt)
        hessians = tg.collect_hessians(model, loader, h, rt)
    quantized, _ = tg.quantize_model(state, h, hessians)
    print(f"quantized {spec} ({sum(v.numel() for v in state.values())} params) in {time.perf_counter() - t0:.0f}s: "
          f"{json.dumps({c: sum(e['class'] == c for e in quantized.values()) for c in tg.CLASS_BITS})}")
    return tg.model_config(h), quantized


def artifact_parts(config: dict, quantized: dict[str, dict]) -> tuple[list[bytes], list[bytes]]:
    """The parts the artifact compresses: with byte planes (as written) and in native byte order."""
    blob = tg.serialize_artifact(quantized, config)
    planes = [tg.decompress_frame(frame, tg.ARTIFACT_MAX_PAYLOAD_BYTES) for frame in tg.unpack_frames(blob)]
    header, sections = planes[0], planes[1:]
    blobs, native, start = json.loads(header)["blobs"], [], 0
    for section in sections:
        chunks, stop = [], start + len(section)
        for b in blobs:
            if start <= b["offset"] < stop:
                at = b["offset"] - start
                dtype = np.dtype(tg.ARTIFACT_DTYPES[b["dtype"]])
                chunks.append(tg.from_byte_planes(section[at:at + b["nbytes"]], dtype).tobytes())
        native.append(b"".join(chunks))
        start = stop
    return planes, [header] + native


def external(binary: str, args: list[str], suffix: str):
    """Compress and decompress through a system binary that works on files (lrzip, zpaq)."""
    def run(data: bytes) -> tuple[int, float, float]:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "part"
            src.write_bytes(data)
            t0 = time.perf_counter()
            subprocess.run([binary, *args, str(src)], check=True, capture_output=True)
            t1 = time.perf_counter()
            size = Path(str(src) + suffix).stat().st_size
            return size, t1 - t0, float("nan")
    return run


def in_memory(compress, decompress):
    def run(data: bytes) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        packed = compress(data)
        t1 = time.perf_counter()
        assert decompress(packed) == data
        return len(packed), t1 - t0, time.perf_counter() - t1
    return run


def methods() -> dict:
    found = {
        "zstd-22": in_memory(zstandard.ZstdCompressor(level=22, write_checksum=True).compress,
                             zstandard.ZstdDecompressor().decompress),
        "lzma-9e (xz -9e)": in_memory(lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    }
    try:
        import brotli
        found["brotli-11"] = in_memory(lambda d: brotli.compress(d, quality=11), brotli.decompress)
        found["brotli-11 lgwin 24"] = in_memory(lambda d: brotli.compress(d, quality=11, lgwin=24), brotli.decompress)
    except ImportError:
        print("brotli: not installed (pip install brotli)")
    for binary, args, suffix in (("lrzip", ["-z", "-q"], ".lrz"), ("zpaq", ["a"], ".zpaq")):
        if shutil.which(binary):
            found[binary] = external(binary, args, suffix)
        else:
            print(f"{binary}: no binary on this machine (`which {binary}` finds nothing): not measured")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", nargs="?", type=Path, help="an artifact (.ptz) written by train_gpt.py")
    parser.add_argument("--state", help="a saved state dict, PATH or PATH:KEY, quantized as the environment says")
    args = parser.parse_args()
    if (args.artifact is None) == (args.state is None):
        parser.error("give an artifact or --state, not both")
    torch.set_num_threads(1)
    if args.state:
        config, quantized = quantized_from_state(args.state)
    else:
        config, quantized = tg.deserialize_artifact(args.artifact.read_bytes(), str(args.artifact))
    layouts = dict(zip(("byte planes", "native order"), artifact_parts(config, quantized)))
    container = len(tg.ARTIFACT_MAGIC) + 4 + 8 * len(layouts["byte planes"])
    raw = sum(map(len, layouts["byte planes"]))
    print(f"{len(quantized)} tensors; {raw} bytes in {len(layouts['byte planes'])} parts before compression")
    runs = methods()
    print(f"{'method':<20} {'layout':<13} {'bytes':>10} {'vs zstd-22 planes':>18} {'compress s':>11} "
          f"{'decompress s':>13}")
    rows = []
    for name, run in runs.items():
        for layout, parts in layouts.items():
            results = [run(part) for part in parts]
            size = container + sum(r[0] for r in results) + (4 * len(parts) if name.startswith("brotli") else 0)
            rows.append((name, layout, size, sum(r[1] for r in results), sum(r[2] for r in results)))
    base = next(r[2] for r in rows if r[:2] == ("zstd-22", "byte planes"))
    for name, layout, size, c_s, d_s in rows:
        print(f"{name:<20} {layout:<13} {size:>10} {size - base:>+18} {c_s:>11.2f} {d_s:>13.2f}")
    print("\nwhole artifacts, the integer codes coded otherwise (the rest: the brotli frames above):")
    whole = [(c, *timed(lambda c=c: len(tg.serialize_artifact(quantized, config, c)))) for c in ("brotli", "ans")]
    if shutil.which("lrzip"):
        whole += [(f"per-group lrzip{' rows reordered' if sort else ''}", *timed(lambda sort=sort: per_group_lrzip(quantized, config, sort)))
                  for sort in (False, True)]
    else:
        print("lrzip: no binary on this machine: per-group lrzip not measured")
    brotli_bytes = whole[0][1]
    for name, size, seconds in whole:
        print(f"{name:<34} {size:>10} {size - brotli_bytes:>+9} vs brotli ({100 * (size / brotli_bytes - 1):+.2f}%) {seconds:>7.1f} s")


def timed(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def per_group_lrzip(quantized: dict[str, dict], config: dict, sort: bool) -> int:
    """Bytes of PR #1855's layout: the integer codes of each kind of matrix (every block's c_q, ...,
    the embedding) as one lrzip -z -L 9 (ZPAQ) stream, each matrix transposed (a column's values
    adjacent), rows first reordered greedily by nearest neighbour in L1 for the embedding, c_q and
    mlp.fc (sort; the order costs 2 bytes a row); the other sections brotli-11, as COMPRESSOR=brotli."""
    groups, rest = {}, {}
    for name, entry in quantized.items():
        q = entry["arrays"].get("q")
        if q is not None and q.ndim == 2 and re.fullmatch(tg.BLOCK_MATRICES + r"|tok_emb\.weight", name):
            groups.setdefault(re.sub(r"\.\d+\.", ".", name), []).append(q)
            rest[name] = dict(entry, arrays={k: v for k, v in entry["arrays"].items() if k != "q"})
        else:
            rest[name] = entry
    total = 0
    for kind, arrays in groups.items():
        reorder = sort and kind in ("tok_emb.weight", "blocks.attn.c_q.weight", "blocks.mlp.fc.weight")
        if reorder:
            arrays = [a[nearest_neighbour_order(a)] for a in arrays]
            total += sum(2 * a.shape[0] for a in arrays)
        total += external("lrzip", ["-z", "-q", "-L", "9"], ".lrz")(b"".join(np.ascontiguousarray(a.T).tobytes() for a in arrays))[0]
    # the rest as the brotli artifact holds it, less the empty "q" entries' headers
    sections = tg.unpack_frames(tg.serialize_artifact(
        {n: e for n, e in rest.items() if e["arrays"]}, config, "brotli"))
    return total + len(tg.BROTLI_MAGIC) + 4 + 8 * len(sections) + sum(map(len, sections))


def nearest_neighbour_order(matrix: np.ndarray) -> np.ndarray:
    """Rows in greedy nearest-neighbour order (L1), from row 0."""
    rows = matrix.astype(np.int32)
    free, order = np.ones(len(rows), dtype=bool), [0]
    free[0] = False
    for _ in range(len(rows) - 1):
        candidates = np.flatnonzero(free)
        best = candidates[np.abs(rows[candidates] - rows[order[-1]]).sum(1).argmin()]
        order.append(best)
        free[best] = False
    return np.array(order)


if __name__ == "__main__":
    main()
