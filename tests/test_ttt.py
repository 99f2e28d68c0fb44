# Score-first test-time training, legal by construction: python3 -m pytest -q tests/test_ttt.py
"""Each property the rules ask of an evaluation that learns, on a tiny seeded model and the bundled
validation split: the scoring order is fixed up front and a score depends only on what was scored
before it; scores are full distributions; no token trains anything before it is scored; every target
is scored once with the split's bytes; with the learning rates at 0 the score is the plain
per-document score, bit for bit; the compile warm-up reads no validation token."""
import copy
import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import cpu_runtime, tiny_hparams, tiny_model

SMALL = dict(ttt_batch_docs=2, ttt_chunk_tokens=32, ttt_lora_rank=4, ttt_phases="2", val_tokens=3500)


def setup(**overrides):
    h = tiny_hparams(**{**SMALL, **overrides})
    return h, tiny_model(h), tg.load_validation(h, tg.load_tokenizer(h), cpu_runtime())


def run(h, model, val, adapt=True, log=None, deadline=np.inf):
    trace = []
    loss, bpb = tg.evaluate_documents(h, cpu_runtime(log or tg.no_log), model, model, val,
                                      deadline if adapt else -np.inf, trace)
    return loss, bpb, trace


def scored_targets(docs: tg.Documents, event) -> np.ndarray:
    _, d, lo, hi = event[:4]
    return docs.start[d] + np.arange(lo, hi)


def test_the_order_is_fixed_longest_first_and_covers_every_target_once():
    h, model, val = setup()
    docs = tg.split_documents(val.tokens.numpy())
    lengths = docs.num_targets[docs.order]
    assert (np.diff(lengths) <= 0).all() and sorted(docs.order) == list(range(len(docs.start)))
    _, _, trace = run(h, model, val)
    counts = np.zeros(val.num_targets, dtype=int)
    for event in (e for e in trace if e[0] == "score"):
        counts[scored_targets(docs, event)] += 1
    assert (counts == 1).all(), "a target scored twice or never"


def test_a_score_depends_only_on_what_was_scored_before_it():
    """Change every token scored after a cut in the scoring order (the rest of the documents being
    adapted to, and every later document): every score up to the cut stays bitwise equal."""
    h, model, val = setup()
    state = copy.deepcopy(model.state_dict())
    docs = tg.split_documents(val.tokens.numpy())
    _, _, trace = run(h, model, val)
    scores = [e for e in trace if e[0] == "score"]
    assert any(e[0] == "phase" for e in trace) and any(e[0] == "update" for e in trace)
    for cut in (len(scores) // 3, 2 * len(scores) // 3):
        later = np.concatenate([scored_targets(docs, e) for e in scores[cut:]]) + 1  # token index of each target
        tokens = val.tokens.clone()
        later = later[tokens[later].numpy() != tg.BOS_ID]  # documents keep their boundaries
        tokens[later] = torch.from_numpy((tokens[later].numpy() * 7 + 11) % (h.vocab_size - 4) + 4)
        changed = tg.ValidationSet(tokens, val.num_targets, val.num_bytes, val.tables, val.split_targets,
                                   val.target_bytes)
        model.load_state_dict(state)
        _, _, again = run(h, model, changed)
        again_scores = [e for e in again if e[0] == "score"]
        assert again_scores[:cut] == scores[:cut], f"a score before the cut at {cut} changed"
        assert again_scores[cut:] != scores[cut:]  # the change was real
        model.load_state_dict(state)


def test_no_token_trains_anything_before_it_is_scored():
    h, model, val = setup()
    docs = tg.split_documents(val.tokens.numpy())
    _, _, trace = run(h, model, val)
    scored = set()
    for event in trace:
        if event[0] == "score":
            scored.update(scored_targets(docs, event).tolist())
        elif event[0] == "update":
            assert set(scored_targets(docs, event).tolist()) <= scored
            assert event[3] < docs.num_targets[event[1]], "a document's last chunk was trained on"
        else:
            used = {t for d in event[1] for t in range(docs.start[d], docs.start[d] + docs.num_targets[d])}
            assert used <= scored, "a phase trained on a target not yet scored"


def test_the_bytes_are_the_splits_and_the_count_is_checked():
    h, model, val = setup()
    loss, bpb, _ = run(h, model, val, adapt=False)
    assert bpb == pytest.approx(loss * val.num_targets / np.log(2) / val.num_bytes, rel=1e-12)
    wrong = tg.ValidationSet(val.tokens, val.num_targets, val.num_bytes + 1, val.tables, val.split_targets,
                             val.target_bytes)
    with pytest.raises(tg.RunError, match="per-document evaluation scored"):
        run(h, model, wrong, adapt=False)


def test_with_learning_rates_at_zero_the_adapted_score_is_the_plain_one_bit_for_bit():
    h, model, val = setup(ttt_lr_scale=0.0)
    plain = run(h, model, val, adapt=False)[:2]
    assert run(h, model, val, adapt=True)[:2] == plain
    h1 = tiny_hparams(**SMALL)
    assert run(h1, model, val, adapt=True)[:2] != plain  # and with them on, adaptation changes the score


def test_plain_per_document_score_is_close_to_the_stream_score():
    """Per-document rows see no other document: not the same number, but the same scale."""
    h, model, val = setup()
    stream = tg.evaluate(model, val, h.model_eval_seq_len, h.ttt_chunk_tokens, 4096, cpu_runtime())
    lines = []
    plain = run(h, model, val, adapt=False, log=lines.append)[:2]
    assert plain[1] == pytest.approx(stream[1], rel=0.05)
    # a deadline of -inf adapts nothing, so nothing stops: no 'adaptation stopped' line, no phase
    assert not [line for line in lines if line.startswith(("ttt: adaptation stopped", "ttt_phase:"))], lines
    assert any(line.startswith("final_ttt ") for line in lines)


def test_scores_are_full_normalized_distributions_with_adapters_on():
    h, model, val = setup()
    adapters = tg.DocumentAdapters(model, 2, 4)
    with torch.no_grad():
        for b in adapters.b:
            b.normal_(0, 0.5)
    adapters.attach(True)
    inputs, targets = val.tokens[None, :64].repeat(2, 1), val.tokens[None, 1:65].repeat(2, 1)
    with torch.no_grad():
        logits = model(inputs)
        losses = model(inputs, targets, reduction="none")
    adapters.attach(False)
    assert torch.allclose(logits.softmax(-1).sum(-1), torch.ones(2, 64), atol=1e-5)
    assert torch.allclose(losses, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
                          .view(2, 64))
    with torch.no_grad():
        assert not torch.allclose(model(inputs), logits)  # the adapters were really in the forward


def test_adapter_slots_are_independent():
    """Row b's output depends on slot b's adapters only: a batch of documents adapts as one each."""
    h, model, val = setup()
    adapters = tg.DocumentAdapters(model, 2, 4)
    inputs = val.tokens[None, :32].repeat(2, 1)
    adapters.attach(True)
    with torch.no_grad():
        before = model(inputs)
        for b in adapters.b:
            b[1].normal_(0, 0.5)
        after = model(inputs)
    adapters.attach(False)
    assert torch.equal(after[0], before[0]) and not torch.allclose(after[1], before[1])


# ----------------------------------------------------------------------------- the time budget


def lognormal_documents(count: int = 50_000, mean: float = 800.0, seed: int = 0) -> tg.Documents:
    """FineWeb-like document lengths (lognormal, sigma 1, the given mean) as a Documents split."""
    lengths = np.maximum(np.random.default_rng(seed).lognormal(np.log(mean) - 0.5, 1.0, count).astype(np.int64), 1)
    start = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
    end = start + lengths + 2  # BOS, the text, the next BOS
    return tg.Documents(start, end, np.lexsort((start, start - end)))


def simulate(work: list[list[int]], budget_s: float, rate: float = 1e-6, overhead: float = 0.0):
    """Drives TTTBudget as evaluate_documents does, on a clock that advances by each chunk's cost:
    `overhead` seconds plus `rate` seconds per position adapted, a third of both plain. Returns
    (seconds, adapted flags in order)."""
    clock = [0.0]
    budget = tg.TTTBudget(work, 1, budget_s, lambda: clock[0])
    adapted = []
    for b, chunks in enumerate(work):
        for c, positions in enumerate(chunks):
            adapt = budget.adapt(b, c)
            cost = (overhead + positions * rate) * (1 if adapt else tg.TTTBudget.PLAIN_SHARE)
            clock[0] += cost
            budget.observe(positions, cost, adapt)
            adapted.append(adapt)
    return clock[0], adapted


def test_the_budget_rule_plans_on_50000_fineweb_like_documents():
    """Planned work at half the budget adapts every document; at 1.5x the budget adaptation stops at
    the chunk the plan gives (the last whose adapted cost plus the rest scored plain fits) and the
    evaluation ends within the budget."""
    h = tiny_hparams(ttt_batch_docs=64, ttt_chunk_tokens=48, eval_seq_len=2048, train_seq_len=2048,
                     train_batch_tokens=8 * 2048)
    docs = lognormal_documents()
    assert 780 < docs.num_targets.mean() < 820
    batches = [docs.order[i:i + 64] for i in range(0, len(docs.order), 64)]
    work = tg.batch_work(docs, batches, h)
    flat = np.array([p for chunks in work for p in chunks], dtype=np.float64)
    adapted_s = flat.sum() * 1e-6
    seconds, adapted = simulate(work, 2 * adapted_s)
    assert all(adapted) and seconds == pytest.approx(adapted_s)
    budget = adapted_s / 1.5
    seconds, adapted = simulate(work, budget)
    cost_if_stopped_after = np.cumsum(flat) * 1e-6 + (flat.sum() - np.cumsum(flat)) * 1e-6 / 3
    planned = int(np.argmax(cost_if_stopped_after > budget))  # the first chunk that no longer fits adapted
    assert adapted == [True] * planned + [False] * (len(flat) - planned)
    share = flat[:planned].sum() / flat.sum()  # a + (1 - a) / 3 = 1 / 1.5: half the work adapted
    assert 0.49 < share <= 0.5 and budget - flat.max() * 1e-6 < seconds <= budget, (share, seconds)


def test_the_budget_rule_prices_each_chunk_shape_as_measured_so_a_fixed_overhead_does_not_stop_it():
    """With 10 ms of overhead per chunk (the adapters' step, launches) and 1 us per position, the first,
    smallest chunks are mostly overhead: priced per shape once a batch is measured, a budget that
    covers adapting everything adapts everything, and a tight one still ends within it."""
    h = tiny_hparams(ttt_batch_docs=64, ttt_chunk_tokens=48, eval_seq_len=2048, train_seq_len=2048,
                     train_batch_tokens=8 * 2048)
    docs = lognormal_documents(count=6250, seed=1)  # one GPU's share of 50,000
    batches = [docs.order[i:i + 64] for i in range(0, len(docs.order), 64)]
    work = tg.batch_work(docs, batches, h)
    chunks = sum(len(c) for c in work)
    adapted_s = sum(0.01 + p * 1e-6 for c in work for p in c)
    seconds, adapted = simulate(work, 1.02 * adapted_s, overhead=0.01)
    assert all(adapted) and seconds == pytest.approx(adapted_s)
    budget = 0.6 * adapted_s
    seconds, adapted = simulate(work, budget, overhead=0.01)
    cost = np.array([0.01 + p * 1e-6 for c in work for p in c])
    planned = int(np.argmax(np.cumsum(cost) + (cost.sum() - np.cumsum(cost)) / 3 > budget))
    assert adapted == [True] * planned + [False] * (chunks - planned) and seconds <= budget, (sum(adapted), planned)


def test_past_the_deadline_nothing_adapts(monkeypatch):
    h, model, val = setup()
    lines = []
    _, _, trace = run(h, model, val, log=lines.append, deadline=time.perf_counter() - 1)
    assert not any(e[0] in ("update", "phase") for e in trace)
    assert any(line.startswith("ttt_adapted: positions 0 of ") and "ranks out of time: 1 of 1" in line
               for line in lines), lines


def test_a_split_that_ends_on_a_bos_scores_it_as_the_last_documents_target():
    h, model, val = setup()
    end = int(tg.document_starts(val.tokens.numpy())[3])  # VAL_TOKENS landing on a BOS
    cut = tg.ValidationSet(val.tokens[:end + 1], end, int(val.target_bytes[:end].sum()), val.tables, val.split_targets,
                           val.target_bytes[:end])
    assert int(cut.tokens[-1]) == tg.BOS_ID and len(tg.split_documents(cut.tokens.numpy()).start) == 3
    for adapt in (False, True):
        loss, bpb, _ = run(h, model, cut, adapt=adapt)
        assert np.isfinite(bpb)


def test_qat_fake_quantizes_training_only_not_the_adapted_scores():
    """QAT_BITS (PR #192's fake quantization) trains on quantized weights; TTT's adapted chunks score the
    artifact's weights as they are, so at learning rate 0 the adapted score is the plain one bit for bit."""
    h, model, val = setup(qat_bits=6, ttt_lr_scale=0.0)
    assert run(h, model, val, adapt=True)[:2] == run(h, model, val, adapt=False)[:2]
    x = val.tokens[None, :64]
    with torch.enable_grad():
        trained = model(x, val.tokens[None, 1:65])
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.enable_grad():
        frozen = model(x, val.tokens[None, 1:65])
    assert not torch.equal(trained, frozen)  # the fake quantization is real where weights train


def test_a_chunk_longer_than_the_window_is_refused_at_start():
    with pytest.raises(tg.RunError, match="TTT_CHUNK_TOKENS=100 must be <= EVAL_SEQ_LEN=64"):
        tiny_hparams(ttt_enabled=True, ttt_chunk_tokens=100)


def test_once_adaptation_stops_the_rest_is_the_plain_per_document_score_bit_for_bit(monkeypatch):
    h, model, val = setup(ttt_phases="")
    _, _, plain = run(h, model, val, adapt=False)
    calls = []

    def adapt(self, batch, chunk):  # out of time at the 5th chunk (a time-free stand-in for the clock)
        calls.append((batch, chunk))
        self.adapting = self.adapting and len(calls) < 5
        return self.adapting

    monkeypatch.setattr(tg.TTTBudget, "adapt", adapt)
    lines = []
    _, _, adapted = run(h, model, val, log=lines.append)
    assert any(line.startswith("ttt: adaptation stopped in batch 1 of") for line in lines), lines
    scores = [e for e in adapted if e[0] == "score"]
    plain_scores = [e for e in plain if e[0] == "score"]
    assert [e[:4] for e in scores] == [e[:4] for e in plain_scores]
    first_chunk_scores = sum(1 for e in scores if e[2] == 0 and e[1] in tg.split_documents(val.tokens.numpy()).order[:2])
    stop = next(i for i, e in enumerate(scores) if e[2] == 4 * h.ttt_chunk_tokens)  # the 5th chunk of batch 1
    assert first_chunk_scores and scores[stop:] == plain_scores[stop:]
    assert scores[first_chunk_scores:stop] != plain_scores[first_chunk_scores:stop]  # adapted before the stop
    assert all(e[0] != "update" or e[2] < 4 * h.ttt_chunk_tokens for e in adapted)


def test_where_a_document_ends_changes_none_of_its_earlier_scores():
    """Move the BOS that ends a document later: every earlier target of it scores the same, adapted."""
    h, model, val = setup(ttt_phases="")
    state = copy.deepcopy(model.state_dict())
    docs = tg.split_documents(val.tokens.numpy())
    d = int(docs.order[1])
    end = int(docs.start[d] + docs.num_targets[d])  # the token index of the BOS that ends d
    assert val.tokens[end] == tg.BOS_ID and docs.num_targets[d] > 3 * h.ttt_chunk_tokens
    tokens = val.tokens.clone()
    tokens[end], tokens[end + 5] = tokens[end + 5], tg.BOS_ID  # d now ends 5 tokens later
    moved = tg.ValidationSet(tokens, val.num_targets, val.num_bytes, val.tables, val.split_targets, val.target_bytes)

    def losses_of_d(trace, until):
        out = []
        for e in trace:
            if e[0] == "score" and e[1] == d:
                out += e[4][:max(0, until - e[2])]
        return out[:until]

    _, _, before = run(h, model, val)
    model.load_state_dict(state)
    _, _, after = run(h, model, moved)
    n = int(docs.num_targets[d]) - 1  # d's targets before the moved BOS
    assert len(losses_of_d(before, n)) == n and losses_of_d(after, n) == losses_of_d(before, n)


# ----------------------------------------------------------------------------- compiled: every graph built in warm-up


def test_warm_up_builds_every_graph_ttt_runs_and_scoring_compiles_nothing(monkeypatch):
    """On dynamo's eager backend: warm_up_ttt builds one graph per (row length, adapters) and the phase,
    on random tokens, without changing a weight; then plain and adapted scoring (a phase, documents
    shorter than 64, a stop mid-batch) run under fail_on_recompile."""
    h, model, val = setup(eval_seq_len=256, ttt_phases="2")
    monkeypatch.setattr(tg, "compile_enabled", lambda h, rt: True)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    compiled = tg.maybe_compile(h, cpu_runtime(), model, backend=counting)
    before = copy.deepcopy(model.state_dict())
    lines = []
    tg.warm_up_ttt(h, cpu_runtime(lines.append), model, compiled)
    assert tg.ttt_graphs(h) == [64, 128, 256]
    assert len(graphs) == 2 * 3 + 1, graphs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert re.match(r"ttt_warmup: 7 graphs \(rows 64\.\.256, a phase\) built on random tokens in \d+ms", lines[0])
    tokens = val.tokens.clone()
    tokens[[100, 130, 140]] = tg.BOS_ID  # documents of 29 and 9 targets: rows shorter than 64
    val = tg.ValidationSet(tokens, val.num_targets, val.num_bytes, val.tables, val.split_targets, val.target_bytes)
    assert (tg.split_documents(tokens.numpy()).num_targets < 32).sum() == 2
    with torch.compiler.set_stance("fail_on_recompile"):
        tg.evaluate_documents(h, cpu_runtime(), model, compiled, val, -np.inf)
        tg.evaluate_documents(h, cpu_runtime(lines.append), model, compiled, val)
        tg.evaluate_documents(h, cpu_runtime(lines.append), model, compiled, val, time.perf_counter())
    assert any(line.startswith("ttt_phase:1 ") for line in lines)
    assert any(line.startswith("ttt: adaptation stopped") for line in lines)
    assert len(graphs) == 7
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_ttt_run_beats_its_plain_score_and_two_processes_agree_with_one(run_script):
    ttt = {"TTT_ENABLED": "1", "TTT_PHASES": "2", "VAL_TOKENS": "5000", "TTT_BATCH_DOCS": "2"}
    one = run_script({"ITERATIONS": "12", **ttt})
    assert one.returncode == 0, one.explain()
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^(final_\w+|ttt_phase:1) .*$", one.body, re.M)}
    assert {"final_sliding", "final_ttt", "ttt_phase:1"} <= set(lines)
    accounting = re.findall(r"^val_tokens:\d+ val_bytes:\d+ of_val_tokens:\d+$", one.body, re.M)
    assert len(accounting) == 2 and len(set(accounting)) == 1
    assert re.search(r"^ttt_eval_time_ms:\d+$", one.body, re.M)

    def ttt_bpb(run) -> float:
        assert run.returncode == 0, run.explain()
        return float(re.search(r"^final_ttt .*val_bpb:([\d.]+)", run.body, re.M).group(1))
    plain = ttt_bpb(run_script({"EVAL_ONLY": str(one.artifact), **ttt, "TTT_LR_SCALE": "0"}))  # TTT's baseline
    assert ttt_bpb(one) < plain  # adapting to already-scored text helps a trained model
    assert ttt_bpb(run_script({"EVAL_ONLY": str(one.artifact), **ttt}, nproc=2)) == pytest.approx(ttt_bpb(one), abs=1e-6)


def test_a_reset_restores_fresh_adapters_after_training():
    """Every document starts from the same adapters, whichever documents its slot held before (so a
    score does not depend on which rank took which batch)."""
    h, model, val = setup()
    adapters = tg.DocumentAdapters(model, 2, 4)
    fresh = [t.detach().clone() for t in adapters.a + adapters.b]
    adapters.attach(True)
    inputs = val.tokens[None, :32].repeat(2, 1)
    model(inputs, val.tokens[None, 1:33].repeat(2, 1)).backward()
    adapters.step(1e-2)
    assert not all(torch.equal(t, f) for t, f in zip(adapters.a + adapters.b, fresh))
    adapters.reset()
    adapters.attach(False)
    assert all(torch.equal(t, f) for t, f in zip(adapters.a + adapters.b, fresh)) and adapters.steps == 0
