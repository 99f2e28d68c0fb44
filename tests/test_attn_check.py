# The attention check's CPU-testable parts: python3 -m pytest -q tests/test_attn_check.py
"""bench/attn_check.py: its fp32 reference (causal, and within documents checked against attention
computed one document at a time), the document rows (a BOS starts each document, a row's start starts a
piece, lognormal lengths with the stated mean), the varlen packing, the causal baseline checked against
the causal reference, a toy run on CPU (the kernels CPU has match, the ones it lacks are rows that say
so, not a crash), and a wrong kernel reported as a mismatch with a failing exit code; the dispatched-kernel probe (the speed bench's
attention line) naming the aten op torch ran, and a pinned kernel that cannot run as a one-line error."""
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, cpu_runtime, tiny_hparams
import train_gpt as tg

_spec = importlib.util.spec_from_file_location("attn_check", REPO / "bench" / "attn_check.py")
ac = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ac)


def test_document_reference_equals_attention_one_document_at_a_time():
    torch.manual_seed(0)
    B, H, Hkv, T, hd = 2, 4, 2, 64, 8
    q, k, v = torch.randn(B, H, T, hd), torch.randn(B, Hkv, T, hd), torch.randn(B, Hkv, T, hd)
    tokens = ac.document_tokens(B, T, "cpu", "uniform")
    docs = ac.document_ids(tokens)
    assert docs.unique().numel() > 2, "the toy rows must hold several documents each"
    out = ac.reference(q, k, v, tokens)
    for b in range(B):
        for d in docs[b].unique():
            span = (docs[b] == d).nonzero().flatten()
            lo, hi = int(span[0]), int(span[-1]) + 1
            alone = ac.reference(q[b:b + 1, :, lo:hi], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi])
            assert torch.allclose(out[b:b + 1, :, lo:hi], alone, atol=1e-6)
    assert not torch.allclose(out, ac.reference(q, k, v)), "documents must change the result"


def test_documents_are_packed_back_to_back_and_cut_into_pieces_at_bos_and_row_starts():
    tokens = torch.tensor([[1, 4, 4, 1, 4], [4, 4, 1, 4, 4]])
    assert ac.piece_lengths(tokens).tolist() == [3, 2, 2, 3]  # the second row starts mid-document
    docs = ac.document_ids(tokens)  # numbered as train_gpt's dense mask numbers them
    same = (docs[:, :, None] == docs[:, None, :]) & torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(same, tg.document_mask(tokens)[:, 0])
    lengths = ac.document_lengths(2_000_000, 2048, "lognormal")
    assert sum(lengths) == 2_000_000 and min(lengths) >= 1
    assert abs(sum(lengths) / len(lengths) - ac.DOC_MEAN_TOKENS) < 0.05 * ac.DOC_MEAN_TOKENS
    rows = ac.document_tokens(4, 2048, "cpu", "lognormal")
    starts = torch.cumsum(torch.tensor(ac.document_lengths(4 * 2048, 2048, "lognormal")), 0)[:-1]
    assert rows.flatten()[starts].eq(tg.BOS_ID).all() and int((rows == tg.BOS_ID).sum()) == len(starts) + 1


def test_attention_flops_count_the_pairs_within_pieces():
    tokens = torch.tensor([[1, 4, 4, 1, 4], [4, 4, 1, 4, 4]])
    shape = (2, 3, 1, 5, 2)  # B, H, Hkv, T, hd
    assert ac.attention_flops(shape) == 4 * 2 * 15 * 3 * 2  # causal: T(T+1)/2 = 15 pairs a row
    assert ac.attention_flops(shape, tokens) == 4 * (6 + 3 + 3 + 6) * 3 * 2
    summary = ac.documents_summary(tokens, "uniform")
    assert summary["pieces"] == 4 and summary["work_vs_causal"] == pytest.approx(18 / 30)


def test_varlen_packing_equals_the_reference_within_documents():
    """The varlen wrapper with a stand-in kernel (causal SDPA on each piece of the packed tensors)."""
    def per_piece(q, k, v, cu, longest):
        out = torch.empty_like(q)
        for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
            part = [x[lo:hi].transpose(0, 1)[None] for x in (q, k, v)]  # (1, heads, n, hd)
            out[lo:hi] = F.scaled_dot_product_attention(*part, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        assert longest == int((cu[1:] - cu[:-1]).max())
        return out

    torch.manual_seed(0)
    tokens = ac.document_tokens(2, 64, "cpu", "uniform")
    q, k, v = torch.randn(2, 4, 64, 8), torch.randn(2, 2, 64, 8), torch.randn(2, 2, 64, 8)
    assert torch.allclose(ac.varlen(per_piece)(q, k, v, tokens), ac.reference(q, k, v, tokens), atol=1e-5)


def test_the_causal_baseline_is_checked_against_the_causal_reference():
    causal = lambda q, k, v, tokens: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    shape, tokens = (2, 4, 2, 64, 8), ac.document_tokens(2, 64, "cpu", "uniform")
    assert max(ac.check(causal, shape, torch.float32, "cpu", tokens, seed=0)["errors"].values()) > 1e-2
    causal.documents = False
    assert max(ac.check(causal, shape, torch.float32, "cpu", tokens, seed=0)["errors"].values()) < 1e-5


def test_toy_run_on_cpu_matches_what_cpu_has_and_lists_the_rest(tmp_path, capsys):
    out = tmp_path / "attn.json"
    assert ac.main(["--shape", "2,4,2,64,16", "--reps", "1", "--documents", "uniform", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["case"], r["kernel"]): r for r in result["rows"]}
    assert rows[("causal", "sdpa-auto")]["status"] == "match"
    assert rows[("causal", "sdpa-auto")]["aten_op"] == "_scaled_dot_product_flash_attention_for_cpu"
    assert rows[("documents", "sdpa-math-mask")]["status"] == "match"
    assert rows[("causal", "fa3")]["status"] == "n/a: needs CUDA"
    assert rows[("documents", "torch-varlen")]["status"] == "n/a: needs CUDA"
    assert rows[("causal", "sdpa-cudnn")]["status"].startswith("error: RuntimeError")
    assert rows[("documents", "flex")]["status"].startswith("error")  # no FlexAttention backward on CPU
    assert rows[("documents", "sdpa-cudnn-causal")]["note"].startswith("no documents")
    assert rows[("causal", "sdpa-flash")]["fwd_ms"] > 0 and rows[("causal", "sdpa-flash")]["fwd_bwd_ms"] > 0
    assert result["documents"]["kind"] == "uniform" and 0 < result["documents"]["work_vs_causal"] < 1
    assert "kernels match, 0 mismatch" in capsys.readouterr().out


def test_the_device_calls_case_runs_documents_only():
    args = ac.parse_args(["--presets", "sp8192", "--cases", "documents"])
    assert args.cases == "documents" and args.documents == "lognormal"
    with pytest.raises(SystemExit):
        ac.parse_args(["--cases", "documents,sliding"])


def test_a_wrong_kernel_is_a_mismatch_and_fails_the_check(monkeypatch, tmp_path):
    wrong = lambda q, k, v, tokens: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # not causal
    monkeypatch.setattr(ac, "candidates", lambda device, case: {"not-causal": wrong})
    out = tmp_path / "attn.json"
    assert ac.main(["--shape", "1,2,1,32,8", "--reps", "1", "--out", str(out)]) == 1
    assert all(r["status"].startswith("MISMATCH") for r in json.loads(out.read_text())["rows"])


@pytest.fixture
def attn_backend():
    """Sets ATTN_BACKEND's SDPA switches for one test and restores `auto` (they are process-wide)."""
    yield tg.select_sdpa_kernels
    tg.select_sdpa_kernels("auto")


@pytest.mark.parametrize("name, kernel", [("auto", "flash-cpu"), ("flash", "flash-cpu"), ("math", "math")])
def test_the_probe_names_the_kernel_torch_dispatched_on_cpu(attn_backend, name, kernel):
    attn_backend(name)
    report = ac.dispatched_kernel_report(tiny_hparams(attn_backend=name), cpu_runtime())
    assert report.startswith(f"{kernel} (") and "for 1x4/2 heads x 64 x 8 float32" in report
    assert ("flash_attention_for_cpu" in report) == (kernel == "flash-cpu")


@pytest.mark.parametrize("name", ["efficient", "cudnn"])
def test_a_pinned_kernel_cpu_lacks_is_a_one_line_error_naming_the_setting(attn_backend, name):
    attn_backend(name)
    with pytest.raises(tg.RunError, match=rf"ATTN_BACKEND={name}: no kernel it allows runs attention of "
                                          rf"1x4/2 heads x 64 x 8 float32 on cpu") as err:
        ac.dispatched_kernel_report(tiny_hparams(attn_backend=name), cpu_runtime())
    assert "\n" not in str(err.value)


def test_the_probe_runs_the_models_document_mask():
    h = tiny_hparams(doc_attention=True, attn_backend="flex", train_seq_len=128, train_batch_tokens=8 * 128)
    scoring = ac.dispatched_kernel_report(tg.dataclasses.replace(h, eval_only="x.ptz"), cpu_runtime())
    assert scoring == "flex (FlexAttention, 128x128 block mask) for 1x4/2 heads x 128 x 8 float32 within documents"
    assert ac.dispatched_kernel_report(h, cpu_runtime()).endswith("within documents (dense mask)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_runs_a_fused_kernel_that_matches_math():
    device = torch.device("cuda")
    rt = tg.Runtime(0, 1, device, False, bf16=True)
    tg.select_sdpa_kernels("auto")
    report = ac.dispatched_kernel_report(tg.Hyperparameters(), rt)
    assert report.split()[0] in ("flash", "efficient", "cudnn"), report
    q = torch.randn(2, 8, 256, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, 256, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(tg.causal_attention(q, k, v).float(), reference.float(), atol=2e-2)
