# python3 -m pytest -q tests/test_ablate.py
"""bench/ablate.py: the statistics against scipy (where installed), the table on made-up logs, resume
after a killed sweep, a failed run that does not stop the sweep, within-run variants scored from one
training, and one real sweep at smoke size whose within-run variant is bit-identical to a separate
full run of its configuration. The made-up logs come from a stand-in train_gpt.py that writes a log
in the real format in milliseconds."""

import json
import math
import statistics
import sys
import textwrap

import pytest

from conftest import REPO, SAMPLE, TOKENIZER

sys.path.insert(0, str(REPO / "bench"))
import ablate  # noqa: E402


# ----------------------------------------------------------------------------- statistics


def test_t_quantile_and_p_value_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for q, df in ((0.95, 1), (0.95, 2), (0.8, 4), (0.05, 9), (0.99, 30)):
        assert ablate.t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), abs=1e-7)
    base = {1: 1.500, 2: 1.510, 3: 1.495, 4: 1.503}
    variant = {1: 1.497, 2: 1.509, 3: 1.490, 4: 1.504}
    got = ablate.paired_stats(base, variant, effect=0.003)
    seeds = sorted(base)
    expected = stats.ttest_rel([variant[s] for s in seeds], [base[s] for s in seeds], alternative="less").pvalue
    assert got["p_better"] == pytest.approx(expected, rel=1e-6)
    deltas = [variant[s] - base[s] for s in seeds]
    assert got["mean_delta"] == pytest.approx(statistics.fmean(deltas))
    assert got["sd_delta"] == pytest.approx(statistics.stdev(deltas))


def test_seeds_needed_is_the_least_n_the_power_formula_accepts():
    stats = pytest.importorskip("scipy.stats")
    for sd, effect in ((0.008, 0.003), (0.0002, 0.003), (0.003, 0.003), (0.01, 0.001)):
        n = ablate.seeds_needed(sd, effect)

        def enough(k):
            return math.sqrt(k) * effect / sd >= stats.t.ppf(0.95, k - 1) + stats.t.ppf(0.8, k - 1)

        assert enough(n) and (n == 2 or not enough(n - 1)), (sd, effect, n)
    assert ablate.seeds_needed(0.008, 0.003) == 46  # the proxy's paired spread against a leaderboard effect
    assert ablate.seeds_needed(None, 0.003) is None and ablate.seeds_needed(0.0, 0.003) == 2


# ----------------------------------------------------------------------------- sweeps with a stand-in script

FAKE = textwrap.dedent('''\
    """A stand-in for bench/lab.py: a log in its format, a score from the settings, in milliseconds."""
    import os, sys
    from pathlib import Path
    env = os.environ
    here = Path(__file__).parent
    with open(here / "calls.txt", "a") as f:
        f.write(f"{env['SEED']} {env.get('MATRIX_LR', '-')} {env.get('EMA_DECAY', '-')} "
                f"from={int(bool(env.get('FROM_CHECKPOINT')))} also={env.get('AVERAGE_ALSO', '')}\\n")
    lr = float(env.get("MATRIX_LR", "0.025"))
    if lr <= 0:
        sys.exit(print("error: MATRIX_LR, SCALAR_LR, TIED_EMBED_LR must be > 0", file=sys.stderr) or 1)
    if env.get("FROM_CHECKPOINT"):
        assert Path(env["FROM_CHECKPOINT"]).read_text() == "weights"
    if env.get("CHECKPOINT_OUT"):
        Path(env["CHECKPOINT_OUT"]).write_text("weights")
    seed = int(env["SEED"])
    score = 1.5 + 0.01 * seed + (lr - 0.025) * (3, 1, 2)[seed % 3] - (0.002 if env.get("EMA_DECAY") else 0)
    lines = [f"run_id:{env['RUN_ID']}", "hparam TRAIN_BATCH_TOKENS=4096", "hparam EVAL_STRIDE=64",
             f"device:cpu world_size:1 seed:{seed} preset:smoke",
             "step:10/10 train_loss:5.0 train_time:1000ms step_avg:100.00ms eta:0s lr_scale:0.0",
             "train_done steps:10 train_time_ms:1000", f"pre_quant val_loss:1 val_bpb:{score - 0.01:.8f}",
             "artifact_bytes:1000 code_bytes:400 model_bytes:600", "val_tokens:100 val_bytes:400 of_val_tokens:900",
             f"final_roundtrip val_loss:1 val_bpb:{score + 0.01:.8f} eval_time_ms:5",
             f"final_sliding val_loss:1 val_bpb:{score:.8f} eval_time_ms:5", "eval_done eval_time_ms:10"]
    (here.parent / "logs").mkdir(exist_ok=True)
    (here.parent / "logs" / f"{env['RUN_ID']}.txt").write_text("\\n".join(lines) + "\\n")
''')


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake" / "bench" / "lab.py"
    script.parent.mkdir(parents=True)
    script.write_text(FAKE)
    return script


def calls(script) -> list[str]:
    path = script.parent / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def fake_spec(variants, seeds=(1, 2, 3)):
    return ablate.Spec("fake", {"PRESET": "smoke"}, {"base": {}, **variants}, list(seeds))


def test_the_table_on_made_up_logs(fake, tmp_path):
    spec = fake_spec({"lr": {"MATRIX_LR": "0.026"}, "ema": {"SWA_INTERVAL": "0", "EMA_DECAY": "0.8"},
                      "null": {"SEED_OFFSET": "10"}})
    summary = ablate.run_sweep(spec, script=fake, out_root=tmp_path / "out", say=lambda line: None)
    lr, ema, base, null = (summary["variants"][name] for name in ("lr", "ema", "base", "null"))
    assert null["stats"]["mean_delta"] == pytest.approx(0.1) and not null["within_run"]  # seeds 11-13 vs 1-3
    deltas = [0.001 * (3, 1, 2)[seed % 3] for seed in (1, 2, 3)]  # the stand-in's formula
    assert lr["stats"]["mean_delta"] == pytest.approx(statistics.fmean(deltas), abs=1e-8)
    assert lr["stats"]["sd_delta"] == pytest.approx(statistics.stdev(deltas), abs=1e-8)
    assert lr["stats"]["p_better"] > 0.9 and not lr["within_run"]
    assert ema["stats"]["mean_delta"] == pytest.approx(-0.002, abs=1e-8) and ema["within_run"]
    assert base["mean"]["sliding_bpb"] == pytest.approx(1.52) and base["mean"]["roundtrip_bpb"] == pytest.approx(1.53)
    assert base["mean"]["pre_quant_bpb"] == pytest.approx(1.51) and base["mean"]["tokens"] == 40960
    assert base["mean"]["step_ms"] == 100.0 and base["mean"]["artifact_bytes"] == 1000
    # one training per seed for the base, with a checkpoint tracking EMA; the EMA variant scored from it
    made = calls(fake)
    assert sorted(c for c in made if c.endswith("also=ema:0.8")) == [f"{s} - - from=0 also=ema:0.8" for s in (1, 2, 3)]
    assert sorted(c for c in made if "from=1" in c) == [f"{s} - 0.8 from=1 also=" for s in (1, 2, 3)]
    assert len(made) == 12 and {f"{s} - - from=0 also=" for s in (11, 12, 13)} <= set(made)  # the null's seeds
    written = json.loads((tmp_path / "out" / "fake" / "results.json").read_text())
    assert written["variants"]["lr"]["per_seed"] == {str(s): pytest.approx(v) for s, v in lr["per_seed"].items()}
    md = (tmp_path / "out" / "fake" / "results.md").read_text()
    assert "| ema | within-run |" in md and "| lr | trained |" in md


def test_a_killed_sweep_resumes_with_the_runs_not_done(fake, tmp_path, monkeypatch):
    spec = fake_spec({"lr": {"MATRIX_LR": "0.03"}})
    real, started = ablate.execute, []

    def killed_after_two(*args):
        if len(started) == 2:
            raise KeyboardInterrupt
        started.append(args[0])
        return real(*args)

    monkeypatch.setattr(ablate, "execute", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        ablate.run_sweep(spec, script=fake, out_root=tmp_path / "out", say=lambda line: None)
    assert len(calls(fake)) == 2
    monkeypatch.setattr(ablate, "execute", real)
    lines = []
    summary = ablate.run_sweep(spec, script=fake, out_root=tmp_path / "out", say=lines.append)
    assert len(calls(fake)) == 6  # the 4 runs not done, not the 2 finished ones
    assert lines[0].startswith("ablate fake: 6 runs (2 cached")
    assert any("ETA" in line for line in lines) and len(summary["variants"]["lr"]["per_seed"]) == 3
    # a second sweep sharing the base runs none of the base's runs again
    ablate.run_sweep(fake_spec({"lr2": {"MATRIX_LR": "0.02"}}), script=fake, out_root=tmp_path / "out",
                     say=lambda line: None)
    assert len(calls(fake)) == 9


def test_a_failed_run_is_reported_and_the_others_go_on(fake, tmp_path):
    spec = fake_spec({"broken": {"MATRIX_LR": "-1"}, "lr": {"MATRIX_LR": "0.03"}}, seeds=(1, 2))
    lines = []
    summary = ablate.run_sweep(spec, script=fake, out_root=tmp_path / "out", say=lines.append)
    broken = summary["variants"]["broken"]
    assert broken["failed"] == {1: "error: MATRIX_LR, SCALAR_LR, TIED_EMBED_LR must be > 0",
                                2: "error: MATRIX_LR, SCALAR_LR, TIED_EMBED_LR must be > 0"}
    assert broken["per_seed"] == {} and len(summary["variants"]["lr"]["per_seed"]) == 2
    assert sum("error: MATRIX_LR" in line for line in lines) >= 2
    assert "seed 1 FAILED: error: MATRIX_LR" in (tmp_path / "out" / "fake" / "results.md").read_text()
    assert ablate.main([str(tmp_path / "missing.json")]) == 2


# ----------------------------------------------------------------------------- the real script


@pytest.mark.slow
def test_a_smoke_sweep_end_to_end_and_its_within_run_variant_equals_a_full_run(tmp_path, run_script, monkeypatch):
    """One training; the EMA and the stride-32 variants scored from its checkpoint; a separate run
    trained with EMA gives the same final lines and the same artifact, bit for bit."""
    # Bit for bit needs the same thread count (float sums are reordered across threads): the sweep's
    # runs get the caller's OMP_NUM_THREADS, run_script's gets 1.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = {"PRESET": "smoke", "DATA_PATH": str(SAMPLE), "TOKENIZER_PATH": str(TOKENIZER), "ITERATIONS": "8",
            "WARMUP_STEPS": "0", "VAL_TOKENS": "4096", "GPTQ_CALIB_TOKENS": "4096", "TRAIN_LOG_EVERY": "4"}
    ema = {"SWA_INTERVAL": "0", "EMA_DECAY": "0.8"}  # the smoke preset's own is 0.9
    spec = ablate.Spec("smoke", base, {"base": {}, "ema": ema, "stride32": {"EVAL_STRIDE": "32"}}, [7])
    summary = ablate.run_sweep(spec, out_root=tmp_path / "out", say=lambda line: None)
    rows = summary["variants"]
    assert all(not row["failed"] for row in rows.values()), {k: r["failed"] for k, r in rows.items()}
    assert rows["ema"]["within_run"] and rows["stride32"]["within_run"] and not rows["base"]["within_run"]
    assert rows["base"]["mean"]["steps"] == 8 and rows["base"]["mean"]["tokens"] == 8 * 4096
    assert rows["ema"]["per_seed"][7] != rows["base"]["per_seed"][7] != rows["stride32"]["per_seed"][7]
    assert rows["stride32"]["mean"]["roundtrip_bpb"] == rows["base"]["mean"]["roundtrip_bpb"]  # same weights
    assert (tmp_path / "out" / "smoke" / "results.md").exists()

    run_dirs = {json.loads(p.read_text())["variant"]: p.parent for p in (tmp_path / "out" / "runs").glob("*/result.json")}
    scored = (run_dirs["ema"] / "train.log").read_text()
    assert "from_checkpoint:" in scored and "ema: decay 0.8 over 8 updates" in scored
    full = run_script({**base, **ema, "SEED": "7"})
    assert full.returncode == 0, full.explain()

    def results(log):
        """The result lines without their timings (the log's copy of the source left out)."""
        keep = ("pre_quant", "val_tokens", "final_roundtrip", "final_sliding", "ema:", "artifact_bytes")
        return [" ".join(w for w in line.split() if not w.startswith("eval_time_ms"))
                for line in ablate.submit.split_source(log)[2].splitlines() if line.startswith(keep)]

    assert len(results(scored)) == 6 and results(scored) == results(full.log)


def test_the_callers_train_gpt_settings_do_not_reach_a_run(monkeypatch):
    monkeypatch.setenv("MATRIX_LR", "0.5")
    monkeypatch.setenv("EMA_DECAI", "0.9")  # a typo would stop every run
    monkeypatch.setenv("CHECKPOINT_OUT", "stray.pt")  # the lab's own: only the tool sets it
    env = ablate.subprocess_env({"SEED": "1"}, threads=1)
    assert "MATRIX_LR" not in env and "EMA_DECAI" not in env and env["OMP_NUM_THREADS"] == "1"
    assert "CHECKPOINT_OUT" not in env
