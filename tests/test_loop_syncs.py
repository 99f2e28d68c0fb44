# The training loop's host syncs and clock checks: python3 -m pytest -q tests/test_loop_syncs.py
"""train() waits for the device only at clock checks (at most CLOCK_CHECK_STEPS apart, denser near the
wallclock cap and the recurrence switch) and log steps, yet stops at the same step, and switches the
recurrence at the same step, as a loop that checked after every step. Run with a stand-in train_step
and a simulated clock (each step takes a fixed time), so the schedule is exact and takes no seconds."""
import dataclasses
import types

import pytest
import torch

import train_gpt as tg
from conftest import tiny_hparams


@dataclasses.dataclass
class CountingRuntime(tg.Runtime):
    syncs: int = 0

    def sync(self) -> None:
        self.syncs += 1


def simulated_run(monkeypatch, step_s: float, recur: bool = False, **overrides):
    """train() with each step taking step_s on a simulated clock; returns (steps, syncs, log lines,
    the step at which the recurrence was on for the first time, LR scales per step)."""
    h = tiny_hparams(gptq_calib_tokens=0, train_log_every=1000, **overrides)
    clock = types.SimpleNamespace(now=0.0)
    scales, recur_on = [], []
    model = types.SimpleNamespace(recur_blocks=(0,) if recur else (), recur_active=False)
    model.start_recurrence = lambda: setattr(model, "recur_active", True)

    def fake_step(h, rt, model_, optimizers, loader, step, scale, progress=0.0):
        scales.append(scale)
        recur_on.append(model.recur_active)
        clock.now += step_s
        return torch.tensor(1.0)

    monkeypatch.setattr(tg, "train_step", fake_step)
    monkeypatch.setattr(tg.time, "perf_counter", lambda: clock.now)
    lines = []
    rt = CountingRuntime(rank=0, world_size=1, device=torch.device("cpu"), distributed=False, log=lines.append)
    steps, train_ms = tg.train(h, rt, model, None, [], None, None, [])
    first_recur = recur_on.index(True) if True in recur_on else None
    return steps, rt.syncs, lines, first_recur, scales


def reference_stop(cap_s: float, step_s: float, iterations: int) -> int:
    """The step at which a loop that reads the clock after every step stops: the first step s after
    which s + 1 steps would cross the cap."""
    for s in range(1, iterations + 1):
        if (s + 1) * step_s > cap_s:
            return s
    return iterations


@pytest.mark.parametrize("cap_s, step_s", [(10.05, 0.1), (7.3, 0.047), (3.0, 0.5), (100.0, 0.2)])
def test_stops_where_a_per_step_check_would_with_few_syncs(monkeypatch, cap_s, step_s):
    iterations = 400
    steps, syncs, lines, _, _ = simulated_run(monkeypatch, step_s, iterations=iterations,
                                              max_wallclock_seconds=cap_s, warmdown_iters=0)
    assert steps == reference_stop(cap_s, step_s, iterations)
    assert steps * step_s <= cap_s
    # before: a sync after every step (steps + 2); now a check every <= 16 steps plus the approach to the cap
    assert syncs <= steps / tg.CLOCK_CHECK_STEPS + 12, (steps, syncs)
    assert (steps < iterations) == any(line.startswith("stopping_early") for line in lines)


def test_without_a_cap_the_loop_syncs_every_sixteen_steps(monkeypatch):
    steps, syncs, _, _, _ = simulated_run(monkeypatch, 0.01, iterations=64, max_wallclock_seconds=0.0)
    assert steps == 64
    assert syncs == 2 + 64 // tg.CLOCK_CHECK_STEPS + 1  # start, end; checks at 1, 17, 33, 49 and the last step


@pytest.mark.parametrize("iterations, frac", [(60, 0.5), (37, 0.3), (10, 0.7), (1000, 0.35)])
def test_recurrence_switches_at_the_same_step_by_steps(monkeypatch, iterations, frac):
    _, _, lines, first_recur, _ = simulated_run(monkeypatch, 0.01, recur=True, iterations=iterations,
                                                max_wallclock_seconds=0.0, recur_start_frac=frac)
    switch = next(s for s in range(1, iterations + 1) if s / iterations >= frac)  # the per-step loop's switch
    assert first_recur == switch  # first_recur: 0-based index of the first step run with it = step switch + 1
    assert f"run twice from step {switch + 1}" in "\n".join(lines)


def test_recurrence_switches_within_a_step_of_the_time_fraction(monkeypatch):
    _, _, _, first_recur, _ = simulated_run(monkeypatch, 0.1, recur=True, iterations=10_000,
                                            max_wallclock_seconds=20.0, recur_start_frac=0.5, warmdown_iters=0)
    per_step_switch = 100  # elapsed / cap >= 0.5 first after step 100 (10 s of 20)
    assert per_step_switch <= first_recur <= per_step_switch + 1


def test_lr_schedule_uses_the_agreed_clock(monkeypatch):
    """With a constant step time, the extrapolated clock equals the true one: the warmdown's LR scales are
    those of a per-step clock reading."""
    steps, _, _, _, scales = simulated_run(monkeypatch, 0.1, iterations=10_000, max_wallclock_seconds=10.05,
                                           warmdown_iters=50)
    h = tiny_hparams(gptq_calib_tokens=0, iterations=10_000, max_wallclock_seconds=10.05, warmdown_iters=50)
    expected = [tg.lr_scale(h, s, 100.0 * s) for s in range(steps)]
    assert scales == pytest.approx(expected, abs=1e-9)
    assert scales[-1] < 0.05


def test_first_step_at_fraction_is_exact():
    for iterations in (1, 7, 10, 30, 60, 1000, 20000):
        for frac in (0.0, 0.1, 0.3, 0.35, 0.5, 0.7, 0.99):
            expected = next(s for s in range(0, iterations + 1) if s / iterations >= frac)
            assert tg.first_step_at_fraction(frac, iterations) == expected, (iterations, frac)
