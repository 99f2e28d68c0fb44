# What a rented pod meets first (issue 9), on CPU: python3 -m pytest -q tests/test_pod.py
"""No validation token is read before the clock; the log says how many training tokens the shards
hold against what the run will read, and warns when the stream wraps; the shard reader runs ahead
without changing the token order; attention runs only on fast kernels on CUDA, and says which;
Muon's batched Newton-Schulz and its once-made momentum buffers keep the math; MuonEq-R's rows."""
import threading

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import assert_one_line_error, cpu_runtime, tiny_hparams, write_shard

V = 1024


# ----------------------------------------------------------------------------- no validation before the clock


class TablesOnly:
    """A validation set whose tokens cannot be read: only the tokenizer's byte tables are there."""

    def __init__(self, tables, doc_digests=frozenset()):
        self.tables, self.doc_digests = tables, doc_digests  # the leak check looks up training documents

    def __getattr__(self, name):
        raise AssertionError(f"val.{name} was read during training")


def test_warm_up_and_training_never_read_validation_tokens(monkeypatch):
    h = tiny_hparams(warmup_steps=2, iterations=3, gptq_calib_tokens=1024)
    real_val = tg.load_validation(h, tg.load_tokenizer(h), cpu_runtime())
    built_on = []
    monkeypatch.setattr(tg, "build_eval_graph", lambda h, rt, model, tokens: built_on.append(tokens))
    tg.train_model(h, cpu_runtime(), TablesOnly(real_val.tables))
    [stand_in] = built_on
    train_head = tg.load_shard(tg.find_shards(h, "train")[0], V)[:3 * h.train_batch_tokens]
    assert stand_in.num_targets == h.model_eval_seq_len
    assert stand_in.tables is real_val.tables  # the same byte tables, so score_windows runs unchanged
    window = stand_in.tokens.numpy()
    assert any(np.array_equal(window, train_head[i:i + len(window)]) for i in range(len(train_head) - len(window))), \
        "the warm-up's evaluation batch is not a span of the training stream"


def test_warm_up_evaluation_batch_scores_like_evaluate():
    """The stand-in goes through score_windows with evaluate()'s shapes and gives a finite loss."""
    h = tiny_hparams()
    tables = tg.load_validation(h, tg.load_tokenizer(h), cpu_runtime()).tables
    stream = tg.TokenStream(tg.find_shards(h, "train"), V)
    stand_in = tg.training_tokens_as_eval_set(stream.take(h.model_eval_seq_len + 1), tables)
    model = tg.GPT(h)
    seq = h.model_eval_seq_len
    plan = tg.window_plan(seq, seq, seq)
    sums = tg.score_windows(model, stand_in, seq, plan, 2, torch.autocast("cpu", enabled=False))
    assert sums[1].item() == seq and sums[2].item() == stand_in.num_bytes > 0 and torch.isfinite(sums[0])


# ----------------------------------------------------------------------------- training tokens: budget and wrap


def shards(tmp_path, *sizes: int) -> list[str]:
    for i, size in enumerate(sizes):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.full(size, 5))
    return tg.find_shards(tiny_hparams(data_path=str(tmp_path)), "train")


@pytest.mark.parametrize("cap, iterations, expected", [
    (0.0, 3, None), (0.0, 40, "WARNING: the training stream wraps after step 8"), (600.0, 40, "note: the training")])
def test_train_budget_line_and_wrap_warning(tmp_path, cap, iterations, expected):
    files = shards(tmp_path, 6000, 3000)  # 9,000 tokens; a tiny step reads 1,024 + 8
    h = tiny_hparams(iterations=iterations, max_wallclock_seconds=cap, gptq_calib_tokens=1024)
    lines = []
    tg.log_train_budget(h, cpu_runtime(lines.append), files)
    assert lines[0].startswith(f"train_shards:2 train_tokens:9000 planned_train_tokens:{(iterations + 1) * 1032} ")
    assert ("at most" in lines[0]) == bool(cap)
    assert (lines[1:] == []) if expected is None else lines[1].startswith(expected)


def test_stream_reports_its_first_wrap_once(tmp_path):
    files = shards(tmp_path, 30, 20)
    wraps = []
    stream = tg.TokenStream(files, V, on_wrap=lambda: wraps.append(stream.file_index))
    stream.take(50)
    assert wraps == [], "a stream that has not started over reported a wrap"
    stream.take(1)
    assert wraps == [0]
    stream.take(200)  # four more passes
    assert wraps == [0]


def test_a_run_that_wraps_warns_before_and_when_it_does(tmp_path):
    shards(tmp_path, 3000, 3000)  # 5 steps of 1,032 tokens
    h = tiny_hparams(data_path=str(tmp_path), iterations=8, warmup_steps=1, gptq_calib_tokens=0,
                     max_wallclock_seconds=0.0)
    tables = tuple(torch.from_numpy(t) for t in tg.byte_tables(tg.load_tokenizer(h)))
    lines = []
    tg.train_model(h, cpu_runtime(lines.append), TablesOnly(tables))
    assert any(line.startswith("WARNING: the training stream wraps after step 5") for line in lines)
    assert sum(line.startswith("WARNING: the training stream wrapped") for line in lines) == 1
    first = {key: next(i for i, line in enumerate(lines) if key in line) for key in ("step:5/", "stream wrapped")}
    assert first["stream wrapped"] > first["step:5/"], "the wrap was reported before it happened"


def test_next_shard_is_read_by_the_background_thread(tmp_path, monkeypatch):
    files = shards(tmp_path, 10, 10, 10)
    readers = {}
    real_load = tg.load_shard

    def spy(path, vocab_size):
        readers.setdefault(path, threading.current_thread().name)
        return real_load(path, vocab_size)

    monkeypatch.setattr(tg, "load_shard", spy)
    stream = tg.TokenStream(files, V)
    stream.take(25)
    assert readers[files[0]] == threading.current_thread().name
    assert readers[files[1]].startswith("shard-prefetch") and readers[files[2]].startswith("shard-prefetch")


# ----------------------------------------------------------------------------- attention backend


def test_causal_attention_is_causal_gqa_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    k_full, v_full = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k_full.mT) / 8 ** 0.5 + torch.full((16, 16), float("-inf")).triu(1)
    assert torch.allclose(tg.causal_attention(q, k, v), scores.softmax(-1) @ v_full, atol=1e-5)


@pytest.fixture
def attn_backend():
    """Sets ATTN_BACKEND's SDPA switches for one test and restores `auto` (they are process-wide)."""
    yield tg.select_sdpa_kernels
    tg.select_sdpa_kernels("auto")


@pytest.mark.parametrize("name", ["auto", "flash", "efficient", "cudnn", "math"])
def test_log_names_the_sdpa_kernels_the_setting_allows(attn_backend, name):
    """What runs is measured by bench/attn_check.py (tests/test_attn_check.py); the run logs what it asked for."""
    attn_backend(name)
    assert tg.attention_kernel_report(tiny_hparams(attn_backend=name), cpu_runtime()) == f"sdpa {name}"


@pytest.mark.parametrize("name", ["efficient", "cudnn"])
def test_a_pinned_kernel_this_machine_lacks_stops_the_run_at_start_in_one_line(run_script, name):
    run = run_script({"ATTN_BACKEND": name})
    assert_one_line_error(run, f"ATTN_BACKEND={name}: no kernel it allows runs attention on cpu", "ATTN_BACKEND=auto")


def test_unknown_attn_backend_is_rejected_naming_the_variable():
    with pytest.raises(tg.RunError, match=r"ATTN_BACKEND='flash3': expected one of auto, flash, efficient, cudnn"):
        tg.hyperparameters_from_env({"PRESET": "smoke", "ATTN_BACKEND": "flash3"}, False)


def test_absent_optional_kernel_falls_back_to_sdpa_and_says_so(attn_backend, monkeypatch):
    monkeypatch.setitem(tg.OPTIONAL_KERNELS, "fa3", "no_such_module_for_this_test")
    tg.optional_kernel.cache_clear()
    try:
        attn_backend("fa3")
        h = tiny_hparams(attn_backend="fa3")
        assert tg.GPT(h).blocks[0].attn.kernel is None  # the model runs SDPA
        report = tg.attention_kernel_report(h, cpu_runtime())
        assert report == "sdpa auto; ATTN_BACKEND=fa3: no_such_module_for_this_test does not import, SDPA auto runs instead"
    finally:
        tg.optional_kernel.cache_clear()


def test_an_importable_optional_kernel_gets_bthd_tensors_on_cuda_only(monkeypatch):
    """A stand-in flash_attn_func: on CPU tensors SDPA runs; the layout it would get is (B, T, H, hd)."""
    calls = []

    def fake_flash_attn_func(q, k, v, causal):
        calls.append((q.shape, k.shape, causal))
        return q, None

    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    assert torch.equal(tg.causal_attention(q, k, v, fake_flash_attn_func), tg.causal_attention(q, k, v))
    assert calls == []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert torch.equal(tg.causal_attention(q, k, v, fake_flash_attn_func), q)
    assert calls == [((2, 16, 4, 8), (2, 16, 2, 8), True)]


# ----------------------------------------------------------------------------- Muon


def reference_muon_update(grad: torch.Tensor, momentum: float, steps: int) -> torch.Tensor:
    """The per-matrix update as written before batching (first step: the buffer is the gradient)."""
    update = tg.orthogonalize(grad.add(grad, alpha=momentum), steps)
    return update * max(1.0, grad.size(0) / grad.size(1)) ** 0.5


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    g = torch.randn(3, 48, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tg.orthogonalize(g, 5), torch.stack([tg.orthogonalize(m, 5) for m in g]))


def make_muon(shapes, row_norm=False, momentum=0.9):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    return params, tg.Muon(params, lr=0.1, momentum=momentum, backend_steps=5, weight_decay=0.0, row_norm=row_norm)


def test_muon_step_equals_the_per_matrix_update():
    shapes = [(32, 16), (16, 32), (32, 16), (24, 24), (32, 16)]
    params, opt = make_muon(shapes)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, p0 in zip(params, before):
        expected = p0.add(reference_muon_update(p.grad, 0.9, 5).float(), alpha=-0.1)
        assert torch.equal(p.detach(), expected)


def test_momentum_buffers_are_made_once_and_reused():
    params, opt = make_muon([(16, 16), (16, 16)])
    buffers = [opt.state[p]["momentum_buffer"] for p in params]
    assert all(torch.count_nonzero(b) == 0 for b in buffers)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(opt.state[p]["momentum_buffer"] is b for p, b in zip(params, buffers))
    assert torch.allclose(buffers[0], torch.full((16, 16), 1 + 0.9 + 0.81))


def test_muon_rank_only_keeps_buffers_for_the_matrices_it_owns():
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(5)]
    opt = tg.Muon(params, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.0, rank=1, world_size=2)
    assert [p in opt.state for p in params] == [False, True, False, True, False]


def test_muoneq_r_makes_the_update_blind_to_row_scales():
    """Dividing each row by its norm first: scaling a gradient's rows by positive factors leaves the
    update unchanged (without it, the large rows dominate Newton-Schulz's input)."""
    grad = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    rows = torch.linspace(0.1, 10.0, 32)[:, None]
    deltas = {}
    for row_norm in (False, True):
        for scaled in (False, True):
            [p], opt = make_muon([(32, 16)], row_norm=row_norm)
            p0 = p.detach().clone()
            p.grad = grad * rows if scaled else grad.clone()
            opt.step()
            deltas[row_norm, scaled] = p.detach() - p0
    assert torch.allclose(deltas[True, False], deltas[True, True], atol=1e-6)
    assert not torch.allclose(deltas[False, False], deltas[False, True], atol=1e-3)
    normalized = tg.normalize_rows(grad * rows)
    assert torch.allclose(normalized.norm(dim=1), torch.ones(32))


def test_muon_row_norm_is_an_env_knob():
    h, _ = tg.hyperparameters_from_env({"MUON_ROW_NORM": "1", "PRESET": "smoke"}, cuda_available=False)
    assert h.muon_row_norm and not tg.Hyperparameters().muon_row_norm
    opt = tg.build_optimizers(h, cpu_runtime(), tg.GPT(h))[0]
    assert opt.param_groups[0]["row_norm"] is True
    with pytest.raises(tg.RunError, match="MUON_ROW_NORM"):
        tg.hyperparameters_from_env({"MUON_ROW_NORM": "yes"}, cuda_available=False)
