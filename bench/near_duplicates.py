"""How many training documents nearly repeat a validation document, on a data folder of your choice.

    python3 bench/near_duplicates.py --data DATA_PATH --tokenizer TOKENIZER_PATH [--train-shards 1]

Decodes the validation split and the first --train-shards training shards to documents (split at BOS,
the decoded text is what tools/build_dataset.py would see as the normalized documents), indexes the
validation documents as the builder does (tools/build_dataset.ValidationIndex) and counts the training
documents it would drop as equal to a validation document and as nearly equal to one: the near
duplicates that an exact check (the builder's hash, train_gpt.py's leak check) misses. Then, exactly,
on the shingle strings (not the builder's hashes or its index): the Jaccard similarity of each near
duplicate with its closest validation document, and the highest among the training documents kept, to
show where the threshold falls on this text. Writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import build_dataset as bd  # noqa: E402  (its ValidationIndex; it imports train_gpt, without side effects)


def decoded_documents(sp: spm.SentencePieceProcessor, paths: list[str], vocab_size: int) -> list[str]:
    tokens = np.concatenate([bd.tg.load_shard(p, vocab_size) for p in paths])
    bounds = np.append(bd.tg.document_starts(tokens), len(tokens))
    return sp.decode([tokens[s + 1:e].tolist() for s, e in zip(bounds[:-1], bounds[1:])])


def shingles(doc: str) -> set[str]:
    words, k = doc.lower().split(), bd.NEAR_SHINGLE_WORDS
    return {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--train-shards", type=int, default=1)
    a = p.parse_args()
    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    val = decoded_documents(sp, bd.tg.shard_files(a.data, "val"), sp.vocab_size())
    train_files = bd.tg.shard_files(a.data, "train")[:a.train_shards]
    train = decoded_documents(sp, train_files, sp.vocab_size())
    t0 = time.perf_counter()
    index = bd.ValidationIndex()
    for doc in val:
        index.add(doc)
    verdicts = [index.match(doc) for doc in train]
    seconds = time.perf_counter() - t0
    val_shingles = [shingles(doc) for doc in val]
    holders = defaultdict(list)  # shingle -> the validation documents that hold it
    for i, held in enumerate(val_shingles):
        for shingle in held:
            holders[shingle].append(i)

    def closest(doc: str) -> tuple[float, int]:
        """(exact Jaccard similarity, index) of the closest validation document; (0, -1) if none shares a shingle."""
        mine = shingles(doc)
        shared = Counter(i for shingle in mine for i in holders.get(shingle, ()))
        return max(((n / (len(mine) + len(val_shingles[i]) - n), i) for i, n in shared.items()), default=(0.0, -1))

    near = [doc for doc, v in zip(train, verdicts) if v == "dropped_near_duplicates_of_val"]
    exact_jaccard, sources = zip(*map(closest, near)) if near else ((), ())
    kept = max((closest(doc) for doc, v in zip(train, verdicts) if v is None), default=(0.0, -1))
    print(f"data: {a.data}; validation: {len(val):,} documents; training: {len(train):,} documents in "
          f"{', '.join(Path(f).name for f in train_files)} (the last document may continue in the next shard)")
    print(f"equal to a validation document (sha256 of the text, what the builder's exact check drops): "
          f"{verdicts.count('dropped_duplicates_of_val'):,}")
    print(f"nearly equal to one, not equal (word {bd.NEAR_SHINGLE_WORDS}-gram Jaccard >= {bd.NEAR_JACCARD}): "
          f"{len(near):,}, repeating {len(set(sources)):,} distinct validation documents")
    if near:
        q = np.quantile(exact_jaccard, [0, 0.1, 0.5, 0.9, 1])
        print(f"their exact Jaccard with the closest validation document: min {q[0]:.3f}, 10% {q[1]:.3f}, "
              f"median {q[2]:.3f}, 90% {q[3]:.3f}, max {q[4]:.3f}; below {bd.NEAR_JACCARD}: "
              f"{sum(j < bd.NEAR_JACCARD for j in exact_jaccard)}")
    print(f"the training document kept that is most like a validation document: exact Jaccard {kept[0]:.3f}")
    print(f"index and lookups: {seconds:.1f} s ({1e3 * seconds / max(len(train), 1):.2f} ms per training document)")


if __name__ == "__main__":
    main()
