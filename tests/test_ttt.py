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
from conftest import CPU, cpu_runtime, tiny_hparams, tiny_model

SMALL = dict(ttt_batch_docs=2, ttt_chunk_tokens=32, ttt_lora_rank=4, ttt_phases="2", val_tokens=3500)


def setup(**overrides):
    h = tiny_hparams(**{**SMALL, **overrides})
    return h, tiny_model(h), tg.load_validation(h, tg.load_tokenizer(h), CPU)


def run(h, model, val, adapt=True, log=None, deadline=np.inf):
    trace = []
    loss, bpb = tg.evaluate_documents(h, cpu_runtime(), model, model, val, adapt, log or (lambda m: None), deadline,
                                      trace)
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
    plain = run(h, model, val, adapt=False)[:2]
    assert plain[1] == pytest.approx(stream[1], rel=0.05)


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


def test_adaptation_stops_within_the_budget_and_scoring_goes_on():
    h, model, val = setup()
    lines = []
    loss, bpb, trace = run(h, model, val, log=lines.append, deadline=time.perf_counter() + 1e-6)
    assert any(line.startswith("ttt: adaptation stopped after batch 1 of") for line in lines)
    updates = [e for e in trace if e[0] == "update"]
    first_batch = set(tg.split_documents(val.tokens.numpy()).order[:h.ttt_batch_docs].tolist())
    assert updates and {e[1] for e in updates} <= first_batch
    assert not any(e[0] == "phase" for e in trace)
    assert np.isfinite(bpb)


def test_the_compile_warm_up_reads_random_tokens_and_restores_the_weights(monkeypatch):
    """warm_up_ttt gets the byte tables, never the split; it runs the whole TTT path (a phase too)
    on random tokens and leaves the weights as they were."""
    h, model, val = setup()
    monkeypatch.setattr(tg, "compile_enabled", lambda h, rt: True)
    seen = []
    real = tg.evaluate_documents
    monkeypatch.setattr(tg, "evaluate_documents", lambda h, rt, m, f, v, adapt, log, deadline, trace=None:
                        seen.append((v, adapt)) or real(h, rt, m, f, v, adapt, log, deadline, trace))
    before = copy.deepcopy(model.state_dict())
    lines = []
    tg.warm_up_ttt(h, cpu_runtime(), model, model, val.tables, lines.append)
    [(plain, no), (stand_in, adapt)] = seen  # both evaluations' graphs: without adapters, then with
    assert plain is stand_in and not no and adapt and stand_in.num_targets == 2 * h.ttt_batch_docs * (h.model_eval_seq_len + h.ttt_chunk_tokens)
    assert not any(torch.equal(stand_in.tokens[:64], val.tokens[i:i + 64]) for i in range(0, 1000))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert re.match(r"ttt_warmup: graphs built on random tokens in \d+ms", lines[0])


@pytest.mark.slow
def test_a_ttt_run_logs_both_scores_and_two_processes_agree_with_one(run_script):
    ttt = {"TTT_ENABLED": "1", "TTT_PHASES": "2", "VAL_TOKENS": "5000", "TTT_BATCH_DOCS": "2"}
    env = {"ITERATIONS": "12", **ttt}
    one = run_script(env)
    assert one.returncode == 0, one.explain()
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^(final_\w+|ttt_phase:1) .*$", one.body, re.M)}
    assert {"final_sliding", "final_document", "final_ttt", "ttt_phase:1"} <= set(lines)
    accounting = re.findall(r"^val_tokens:\d+ val_bytes:\d+ of_val_tokens:\d+$", one.body, re.M)
    assert len(accounting) == 3 and len(set(accounting)) == 1
    assert re.search(r"^ttt_eval_time_ms:\d+$", one.body, re.M)
    bpb = {k: float(re.search(r"val_bpb:([\d.]+)", v).group(1)) for k, v in lines.items() if k.startswith("final")}
    assert bpb["final_ttt"] < bpb["final_document"]  # adapting to already-scored text helps a trained model
    two = run_script({"EVAL_ONLY": str(one.artifact), **ttt}, nproc=2)
    assert two.returncode == 0, two.explain()
    for key in ("final_document", "final_ttt"):
        other = float(re.search(rf"^{key} .*val_bpb:([\d.]+)", two.body, re.M).group(1))
        assert other == pytest.approx(bpb[key], abs=1e-6), key


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
