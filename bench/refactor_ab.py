"""A refactor's cost in the eager forward and backward pass: a preset's model (toy size, SCALE=toy; smoke as it is)
from train_gpt.py at a git revision against the working file, timed interleaved on one CPU thread, with the number
of aten ops each issues. Figures only; torch.compile on a GPU hides most per-call Python overhead.

    OMP_NUM_THREADS=1 python3 bench/refactor_ab.py --base 55c4d1e --preset smoke pr1204 sp8192
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from loop_syncs import load  # bench/ is on the path when this script runs

REPO = Path(__file__).resolve().parent.parent


def model_and_batch(tg, preset: str):
    env = {"PRESET": preset} if preset == "smoke" else {"PRESET": preset, "SCALE": "toy"}
    if preset == "smoke":  # its sample lies beside the working file, not beside a revision's copy
        env.update(DATA_PATH=str(REPO / "tests/fixtures/sample"),
                   TOKENIZER_PATH=str(REPO / "tests/fixtures/sample_1024_bpe.model"))
    h = tg.hyperparameters_from_env(env, False)[0]
    torch.manual_seed(0)
    model = tg.GPT(h)
    if model.recur_blocks:
        model.start_recurrence()
    tokens = torch.randint(4, h.vocab_size, (4, h.train_seq_len + 1), generator=torch.Generator().manual_seed(0))
    return model, tokens[:, :-1], tokens[:, 1:]


def aten_ops(model, x, y) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x, y).backward()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare the working train_gpt.py with")
    parser.add_argument("--preset", nargs="+", default=["smoke"])
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds of 5 steps each")
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{args.base}:train_gpt.py"], capture_output=True,
                            text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "train_gpt.py").write_text(source, encoding="utf-8")
        versions = {args.base: load(Path(folder) / "train_gpt.py", "tg_base"),
                    "working": load(REPO / "train_gpt.py", "tg_working")}
        print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds of 5 forward+backward steps")
        for preset in args.preset:
            setups = {name: model_and_batch(tg, preset) for name, tg in versions.items()}
            times = {name: [] for name in setups}
            for model, x, y in setups.values():
                model(x, y).backward()  # first-call allocations out of the timing
            for r in range(args.rounds):
                for name in (list(setups) if r % 2 else list(setups)[::-1]):
                    model, x, y = setups[name]
                    t0 = time.perf_counter()
                    for _ in range(5):
                        model(x, y).backward()
                    times[name].append(1000 * (time.perf_counter() - t0) / 5)
            median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            for name, (model, x, y) in setups.items():
                print(f"{preset:8s} {name:10s} median {median[name]:7.1f} ms per forward+backward, "
                      f"aten ops {aten_ops(model, x, y)}")
            print(f"{preset:8s} working / {args.base}: {median['working'] / median[args.base]:.3f}")


if __name__ == "__main__":
    main()
