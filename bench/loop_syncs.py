"""Counts the host waits of train_gpt's training loop: device syncs (Runtime.sync) and all-reduces
(each read back by .item() / .tolist()), per step, without a GPU.

    python3 bench/loop_syncs.py                        # this checkout's train_gpt.py
    python3 bench/loop_syncs.py /other/train_gpt.py    # e.g. an older version, to compare

train() runs with a stand-in train_step that takes --step-ms on a simulated clock (no model, no
data), a --cap-s wallclock cap, and the depth recurrence pending, once as one process and once as
if under torchrun (all-reduces counted, not performed). Prints steps taken, syncs, all-reduces.
"""

import argparse
import dataclasses
import importlib.util
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load(path: Path, name: str = "train_gpt_counted"):
    """A copy of train_gpt.py at `path` as its own module `name` (bench/refactor_ab.py loads two side by side)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def count(tg, cap_s: float, step_ms: float, distributed: bool) -> tuple[int, int, int]:
    counts = {"sync": 0, "all_reduce": 0}
    clock = types.SimpleNamespace(now=0.0)

    @dataclasses.dataclass
    class CountingRuntime(tg.Runtime):
        def sync(self) -> None:
            counts["sync"] += 1

    def stand_in_step(h, rt, model, optimizers, loader, step, scale, progress=0.0):
        clock.now += step_ms / 1000
        return torch.tensor(1.0)

    def all_reduce(tensor, op=None):
        counts["all_reduce"] += 1

    tg.train_step, tg.time.perf_counter, tg.dist.all_reduce = stand_in_step, lambda: clock.now, all_reduce
    h = tg.Hyperparameters(preset="smoke", **{**tg.SMOKE, "iterations": 100_000, "max_wallclock_seconds": cap_s,
                                              "gptq_calib_tokens": 0, "train_log_every": 200, "warmdown_iters": 100})
    model = types.SimpleNamespace(recur_blocks=(0,), recur_active=False)
    model.start_recurrence = lambda: setattr(model, "recur_active", True)
    rt = CountingRuntime(rank=0, world_size=1, device=torch.device("cpu"), distributed=distributed)
    steps, _ = tg.train(h, rt, model, None, [], None, None, [])
    return steps, counts["sync"], counts["all_reduce"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train_gpt", nargs="?", type=Path, default=REPO / "train_gpt.py")
    p.add_argument("--cap-s", type=float, default=60.0)
    p.add_argument("--step-ms", type=float, default=100.0)
    args = p.parse_args(argv)
    tg = load(args.train_gpt.resolve())
    for distributed in (False, True):
        steps, syncs, reduces = count(tg, args.cap_s, args.step_ms, distributed)
        waits = syncs + (reduces if distributed else 0)
        print(f"{args.train_gpt}: {'torchrun' if distributed else 'one process'}: {steps} steps, {syncs} device "
              f"syncs, {reduces} all-reduces, {waits / steps:.3f} host waits per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
