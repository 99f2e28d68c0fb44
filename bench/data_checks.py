"""Start-up cost of the data checks train_gpt.py runs before training, on a data folder of your choice.

    python3 bench/data_checks.py --data DATA_PATH --tokenizer TOKENIZER_PATH [--world-size 8]
    python3 bench/data_checks.py --tile-from SMALL_DATA_PATH --data /tmp/bigdata   # build a pod-sized folder first

Times, for rank 0 of a run with --world-size ranks (each rank does its share of the work, so the
figure is the wall time of the whole check on a pod): reading the validation split, the byte tables,
the proof of every document's bytes against its decoded text with the re-encoding of a spread of
documents, the split's sha256, and the leak check over the training shards. Prints one line per
check and writes nothing. Per-pod figures are extrapolated from these in docs/data.md.

--tile-from repeats a small folder's validation split to >= 62 M tokens and its training tokens into
three 100 M-token shards, the sizes of the FineWeb sp1024 export (the text repeats; only the cost is
of interest), and writes them to --data."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def timed(label: str, fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    print(f"{label}: {time.perf_counter() - t0:.2f}s", flush=True)
    return result


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens))
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def tile(source: str, out: Path) -> None:
    small = dataclasses.replace(tg.Hyperparameters(), data_path=source, vocab_size=1 << 16)
    val = np.concatenate([tg.load_shard(f, 1 << 16) for f in tg.find_shards(small, "val")])
    train = np.concatenate([tg.load_shard(f, 1 << 16) for f in tg.find_shards(small, "train")])
    out.mkdir(parents=True, exist_ok=False)
    write_shard(out / "fineweb_val_000000.bin", np.tile(val, -(-62_021_633 // len(val))))
    train = np.tile(train, -(-300_000_000 // len(train)))
    for i in range(3):
        write_shard(out / f"fineweb_train_{i:06d}.bin", train[i * 100_000_000:(i + 1) * 100_000_000])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--tile-from", help="build --data from this small folder, then exit")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--world-size", type=int, default=1, help="time rank 0's share of a run on this many ranks")
    args = parser.parse_args()
    if args.tile_from:
        tile(args.tile_from, Path(args.data))
        return 0
    h = dataclasses.replace(tg.Hyperparameters(), data_path=args.data, tokenizer_path=args.tokenizer,
                            vocab_size=args.vocab_size)
    sp = tg.load_tokenizer(h)
    files = tg.find_shards(h, "val")
    tokens = timed("read validation split", lambda: np.concatenate([tg.load_shard(f, h.vocab_size) for f in files]))
    tables = timed("byte tables", tg.byte_tables, sp)
    token_bytes = np.concatenate(([0], tg.target_bytes(tokens[:-1], tokens[1:], tables)))
    starts = tg.document_starts(tokens)
    print(f"validation: {len(tokens)} tokens, {len(starts)} documents, {int(token_bytes.sum())} bytes")
    mine = range(0, len(starts), args.world_size)
    bad, _, _ = timed(f"decode {len(mine)} documents (rank 0 of {args.world_size}) and re-encode "
                   f"{len(range(0, len(mine), max(1, len(starts) // tg.REENCODE_DOCS)))}",
                   tg.first_disagreement, sp, tokens, token_bytes, starts, mine, False)
    print(f"first disagreement: {bad if bad < len(starts) else 'none'}")
    timed("sha256 of the split", lambda: tg.hashlib.sha256(tokens.astype("<u2").tobytes()).hexdigest())
    digests = frozenset(timed("validation document digests", tg.document_digests, tokens, True))
    train = tg.find_shards(h, "train")
    identical, scanned, hits = timed("leak check (rank 0's share)", tg.leak_counts, h, train, digests, 0, args.world_size)
    print(f"leak check of rank 0: {scanned} tokens scanned, {hits} hits, {identical} identical shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
