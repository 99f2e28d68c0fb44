# The attention check's CPU-testable parts: python3 -m pytest -q tests/test_attn_check.py
"""bench/attn_check.py: its fp32 reference (causal, and within documents checked against attention
computed one document at a time), a toy run on CPU (the kernels CPU has match, the ones it lacks are
rows that say so, not a crash), and a wrong kernel reported as a mismatch with a failing exit code."""
import importlib.util
import json

import torch

from conftest import REPO

_spec = importlib.util.spec_from_file_location("attn_check", REPO / "bench" / "attn_check.py")
ac = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ac)


def test_document_reference_equals_attention_one_document_at_a_time():
    torch.manual_seed(0)
    B, H, Hkv, T, hd = 2, 4, 2, 64, 8
    q, k, v = torch.randn(B, H, T, hd), torch.randn(B, Hkv, T, hd), torch.randn(B, Hkv, T, hd)
    docs = ac.document_ids(B, T, "cpu")
    assert docs.unique().numel() > 2 * B, "the toy stream must hold several documents per sequence"
    out = ac.reference(q, k, v, docs)
    for b in range(B):
        for d in docs[b].unique():
            span = (docs[b] == d).nonzero().flatten()
            lo, hi = int(span[0]), int(span[-1]) + 1
            alone = ac.reference(q[b:b + 1, :, lo:hi], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi])
            assert torch.allclose(out[b:b + 1, :, lo:hi], alone, atol=1e-6)
    assert not torch.allclose(out, ac.reference(q, k, v)), "documents must change the result"


def test_toy_run_on_cpu_matches_what_cpu_has_and_lists_the_rest(tmp_path, capsys):
    out = tmp_path / "attn.json"
    assert ac.main(["--shape", "2,4,2,64,16", "--reps", "1", "--out", str(out)]) == 0
    rows = {(r["case"], r["kernel"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("causal", "sdpa-auto")]["status"] == "match"
    assert rows[("causal", "sdpa-auto")]["aten_op"] == "_scaled_dot_product_flash_attention_for_cpu"
    assert rows[("documents", "sdpa-math-mask")]["status"] == "match"
    assert rows[("causal", "fa3")]["status"] == "n/a: needs CUDA"
    assert rows[("causal", "sdpa-cudnn")]["status"].startswith("error: RuntimeError")
    assert rows[("causal", "sdpa-flash")]["fwd_ms"] > 0 and rows[("causal", "sdpa-flash")]["fwd_bwd_ms"] > 0
    assert "kernels match, 0 mismatch" in capsys.readouterr().out


def test_a_wrong_kernel_is_a_mismatch_and_fails_the_check(monkeypatch, tmp_path):
    wrong = lambda q, k, v, docs: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # not causal
    monkeypatch.setattr(ac, "candidates", lambda device, case: {"not-causal": wrong})
    out = tmp_path / "attn.json"
    assert ac.main(["--shape", "1,2,1,32,8", "--reps", "1", "--out", str(out)]) == 1
    assert all(r["status"].startswith("MISMATCH") for r in json.loads(out.read_text())["rows"])
