# The TTT chunk bench's CPU-testable parts: python3 -m pytest -q tests/test_ttt_chunk_bench.py
"""bench/ttt_chunk.py: the saved-bytes count (distinct storages, parameters left out), the estimate's
terms from two measurements (the per-row part scaled to the preset's rows and length, the adapters'
state linear in the slots), the one-document forward equal to document attention on one-document
rows, a chunk that moves the adapters and not the model, and both modes end to end at a toy shape
(finite figures, the JSON written)."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import HANG_FACTOR, REPO, clean_env, tiny_hparams

_spec = importlib.util.spec_from_file_location("ttt_chunk", REPO / "bench" / "ttt_chunk.py")
tc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tc)
tg = tc.tg


def test_saved_bytes_counts_each_storage_once_and_leaves_out_the_skipped():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)

    def forward():
        y = x @ w  # saves x (and w, which is skipped)
        return (y.exp() * y.exp()).sum()  # saves each exp's result: two storages of 4 x 8 floats

    saved, loss = tc.saved_bytes(forward, skip={w.untyped_storage().data_ptr()})
    assert saved == x.numel() * 4 + 2 * 4 * 8 * 4 and loss.requires_grad
    views = lambda: (x[:2] * w[:2]).sum() + (x[2:] * w[2:4]).sum()  # saves two views of x: one storage
    assert tc.saved_bytes(views, skip=set())[0] == x.numel() * 4


def test_the_estimates_terms_scale_the_per_row_part_and_the_adapters():
    h = tiny_hparams(ttt_batch_docs=16, eval_seq_len=256, ttt_lora_rank=4)
    model = tc.scoring_model(h, torch.device("cpu"))
    small = {"rows": 1, "length": 64, "saved_bytes": 1_000 + 300, "adapter_a_per_slot": 40.0,
             "adapter_b_per_slot": 60.0}
    large = {**small, "rows": 2, "saved_bytes": 1_000 + 600}
    terms = dict(tc.peak_terms(h, model, small, large))
    per_row = next(v for k, v in terms.items() if k.startswith("saved activations: 16 rows"))
    assert per_row == 300 * 16 * 256 / 64 and terms["saved activations: fixed part (bf16 weight copies)"] == 1_000
    assert terms["adapters A and B (fp32, 16 slots, rank 4)"] == 100 * 16 == terms["adapters: gradients"]
    assert terms["adapters: A's reset draw (one slot's)"] == 40
    assert terms[f"fp32 logits of one chunk (16 x 256 x {h.vocab_size})"] == 4 * 16 * 256 * h.vocab_size
    assert terms["parameters (fp32)"] == 4 * sum(p.numel() for p in model.parameters())


def test_the_one_document_forward_equals_document_attention_on_one_document_rows():
    h = tiny_hparams(doc_attention=True)
    model = tc.scoring_model(h, torch.device("cpu"))
    inputs, targets, _ = tc.chunk_batch(h, rows=3, length=32, device="cpu")
    assert (inputs == tg.BOS_ID).sum(dim=1).eq(1).all() and (inputs[:, 0] == tg.BOS_ID).all()
    with torch.no_grad():
        documents = model(inputs, targets, reduction="none")  # DOC_ATTENTION's dense mask
        forward, how = tc.one_document_forward(model, model)
        one = forward(inputs, targets)
    assert how == "one_document=True"
    assert torch.allclose(one, documents, atol=1e-5)


def test_a_chunk_moves_the_adapters_and_not_the_model():
    h = tiny_hparams(ttt_batch_docs=2, ttt_lora_rank=4, ttt_chunk_tokens=8)
    model = tc.scoring_model(h, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = tg.DocumentAdapters(model, 2, 4)
    adapters.attach(True)
    forward, _ = tc.one_document_forward(model, model)
    batch = tc.chunk_batch(h, rows=2, length=32, device="cpu")
    assert batch[2].sum(dim=1).tolist() == [8, 8]  # the chunk: the last TTT_CHUNK_TOKENS positions
    losses = tc.adapt_on_chunk(forward, adapters, batch, tg.TTT_LR, tc.autocast_bf16(torch.device("cpu")))
    assert losses.shape == (2,) and losses.isfinite().all()
    assert any(b.abs().sum() > 0 for b in adapters.b) and adapters.steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def run_bench(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "ttt_chunk.py"), *argv], cwd=REPO,
                          env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=HANG_FACTOR * 300)


def test_estimate_at_a_toy_shape_prints_finite_figures(tmp_path):
    out = tmp_path / "estimate.json"
    proc = run_bench("--estimate", "--preset", "smoke", "--len", "32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ESTIMATED peak memory per GPU:" in proc.stdout and "x 128/32 (length, linear)" in proc.stdout
    r = json.loads(out.read_text())
    assert r["mode"] == "estimate" and r["finite"] and r["estimated_peak_gib"] > 0 and not r["over_h100"]
    assert all(math.isfinite(v) for v in r["terms_mib"].values())
    small, large = r["measured"]
    assert (small["rows"], large["rows"]) == (1, 2) and large["saved_bytes"] > small["saved_bytes"]
    assert r["estimated_peak_gib"] * 1024 == pytest.approx(sum(r["terms_mib"].values()))


def test_the_device_mode_runs_at_a_toy_shape_on_cpu(tmp_path):
    out = tmp_path / "chunk.json"
    proc = run_bench("--preset", "smoke", "--rows", "2", "--len", "32", "--backend", "eager", "--warmup", "1",
                     "--reps", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["chunk"]["ms"] > 0 and r["forward_only"]["ms"] > 0 and len(r["chunk"]["ms_all"]) == 2
    assert r["losses_finite"] and (r["rows"], r["length"]) == (2, 32) and "max_rss_mib" in r["chunk"]["memory"]
    assert "chunk (fwd+bwd+step, adapters):" in proc.stdout
    assert run_bench("--preset", "smoke").returncode == 2  # inductor without CUDA: use --estimate
