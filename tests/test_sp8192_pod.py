# sp8192 on the pod's code paths, proven on CPU: python3 -m pytest -q tests/test_sp8192_pod.py
"""Attention within documents through FlexAttention (its forward; CPU has no FlexAttention backward),
the whole run compiled with TTT at the preset's lengths without passing dynamo's recompile limit, and
the evaluation plan the log prints."""
import re

import pytest
import torch

import train_gpt as tg
from conftest import REPO, SAMPLE, TOKENIZER, tiny_hparams, tiny_model


def tokens_with_documents(batch: int, length: int, every: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 1000, (batch, length), generator=g)
    tokens[torch.rand(batch, length, generator=g) < 1 / every] = tg.BOS_ID
    return tokens


@pytest.mark.parametrize("batch,length,every", [(2, 256, 37), (3, 512, 200), (1, 128, 5000), (2, 384, 1)])
def test_the_block_mask_is_torchs_own_and_flex_equals_the_dense_mask(batch, length, every):
    """Our tile construction gives the tiles torch's create_block_mask gives, and FlexAttention over it
    equals SDPA with the dense mask in fp32 (GQA 8/4 heads), including tiles wholly inside a document."""
    from torch.nn.attention.flex_attention import create_block_mask
    tokens = tokens_with_documents(batch, length, every, seed=length)
    document = tg.document_ids(tokens)
    ours = tg.document_block_mask(tokens)
    theirs = create_block_mask(lambda b, h, q, kv: (q >= kv) & (document[b, q] == document[b, kv]),
                               batch, None, length, length, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, heads, length, 64, generator=g) for heads in (8, 4, 4))
    flex = tg.causal_attention(q, k, v, None, ours)
    dense = tg.causal_attention(q, k, v, None, tg.document_mask(tokens))
    assert (flex - dense).abs().max().item() < 1e-5


def test_the_mask_takes_the_dense_form_where_flex_cannot_run():
    tokens = tokens_with_documents(2, 256, 50, seed=0)
    with torch.no_grad():
        assert isinstance(tg.attention_mask(tokens, "flex"), tg.BlockMask)
        assert isinstance(tg.attention_mask(tokens[:, :200], "flex"), torch.Tensor)  # not a multiple of 128
        assert isinstance(tg.attention_mask(tokens, "auto"), torch.Tensor)  # CPU: auto is the dense reference
    assert isinstance(tg.attention_mask(tokens, "flex"), torch.Tensor)  # gradients on CPU: dense


def test_the_kernel_line_names_flex_for_scoring_and_the_dense_mask_for_cpu_training():
    from conftest import cpu_runtime
    h = tiny_hparams(doc_attention=True, attn_backend="flex", train_seq_len=128, train_batch_tokens=8 * 128)
    scoring = tg.attention_kernel_report(tg.dataclasses.replace(h, eval_only="x.ptz"), cpu_runtime())
    assert scoring == "flex (FlexAttention, 128x128 block mask) within documents", scoring
    training = tg.attention_kernel_report(h, cpu_runtime())  # FlexAttention has no backward on CPU
    assert training == "sdpa auto within documents (dense mask)", training
    with pytest.raises(tg.RunError, match="ATTN_BACKEND=flex is the kernel of attention within documents"):
        tiny_hparams(attn_backend="flex")


def test_a_model_with_flex_scores_as_with_the_dense_mask_and_one_document_rows_are_causal():
    h = tiny_hparams(doc_attention=True, train_seq_len=128, train_batch_tokens=8 * 128, attn_backend="flex")
    model = tiny_model(h)
    dense = tiny_model(tiny_hparams(doc_attention=True, train_seq_len=128, train_batch_tokens=8 * 128))
    dense.load_state_dict(model.state_dict())
    tokens = tokens_with_documents(2, 128, 30, seed=3)
    tokens[:, 0] = tg.BOS_ID
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), dense(tokens), rtol=0, atol=2e-5)
        one = tokens.clone()
        one[:, 1:][one[:, 1:] == tg.BOS_ID] = 5  # one document per row: the mask is causality itself
        torch.testing.assert_close(model(one, one_document=True), dense(one), rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_block_mask_is_built_inside_the_compiled_forward(backend):
    """document_block_mask traced by dynamo inside GPT.forward (what the pod compiles; CPU: no
    gradients), scoring as the dense mask does."""
    h = tiny_hparams(doc_attention=True, attn_backend="flex", train_seq_len=256, train_batch_tokens=8 * 256)
    model = tiny_model(h)
    dense = tiny_model(tiny_hparams(doc_attention=True, train_seq_len=256, train_batch_tokens=8 * 256))
    dense.load_state_dict(model.state_dict())
    tokens = tokens_with_documents(2, 256, 100, seed=4)
    tokens[:, 0] = tg.BOS_ID
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), dense(tokens), rtol=0, atol=2e-5)
    torch._dynamo.reset()


def test_one_document_rows_use_the_rope_base_of_the_scored_context():
    """With ROPE_NTK_LEN, a short per-document row uses the base of EVAL_SEQ_LEN (what the model was
    scored and trained at), not the unscaled base a short sequence would get."""
    h = tiny_hparams(rope_ntk_len=32, train_seq_len=128, train_batch_tokens=8 * 128)
    rotary = tg.Rotary(8, 128, 10000.0, ntk_len=32)
    x = torch.randn(1, 2, 64, 8)
    assert torch.equal(rotary(x, 128)[..., :16, :], rotary(torch.cat((x, x), dim=2))[..., :16, :])
    assert not torch.equal(rotary(x, 128), rotary(x))
    model = tiny_model(h)
    tokens = torch.randint(4, 1000, (1, 64))
    with torch.no_grad():
        assert not torch.equal(model(tokens, one_document=True), model(tokens))


# ----------------------------------------------------------------------------- the whole run, compiled

EAGER_COMPILE = """import sys
sys.path.insert(0, {repo!r})
import train_gpt as tg
compile_with = tg.maybe_compile
tg.maybe_compile = lambda h, rt, model, backend="inductor": compile_with(h, rt, model, "eager")
sys.exit(tg.main())
"""

# PRESET=sp8192 at its lengths (2048, TTT rows 64..2048, a phase) on the bundled sample, narrow.
SP8192_TINY = {"PRESET": "sp8192", "DATA_PATH": str(SAMPLE), "TOKENIZER_PATH": str(TOKENIZER), "VOCAB_SIZE": "1024",
               "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_BATCH_TOKENS": str(8 * 2048),
               "ITERATIONS": "4", "WARMUP_STEPS": "1", "MAX_WALLCLOCK_SECONDS": "0", "TRAIN_LOG_EVERY": "2",
               "VAL_TOKENS": "6144", "VAL_BATCH_SIZE": "4096", "GPTQ_CALIB_TOKENS": str(8 * 2048),
               "TTT_BATCH_DOCS": "2", "TTT_LORA_RANK": "4", "TTT_PHASES": "2", "EMA_DECAY": "0.5"}


@pytest.mark.slow
def test_sp8192_compiled_with_ttt_at_2048_builds_every_graph_and_flex_rescores_it(run_script, tmp_path):
    """The run compiled (dynamo's eager backend: it traces as inductor would and compiles nothing) at
    TRAIN_SEQ_LEN = EVAL_SEQ_LEN = 2048: 17 graphs, past dynamo's default limit of 8, none run eagerly
    and none compiled while scoring; then EVAL_ONLY of its artifact with ATTN_BACKEND=flex (FlexAttention
    forward) scores what the dense mask scores."""
    script = tmp_path / "eager_compile.py"
    script.write_text(EAGER_COMPILE.format(repo=str(REPO)))
    run = run_script({**SP8192_TINY, "COMPILE": "1"}, timeout=1500, script=script)
    assert run.returncode == 0, run.explain()
    assert "recompile_limit" not in run.stderr + run.stdout, run.stderr[-3000:]
    assert tg.compiled_graphs(tg.hyperparameters_from_env(SP8192_TINY, False)[0]) == 17
    assert re.search(r"^ttt_warmup: 13 graphs \(rows 64\.\.2048, a phase\)", run.body, re.M), run.body[-3000:]
    assert re.search(r"^final_ttt val_loss:\S+ val_bpb:\S+", run.body, re.M)
    assert "final_sliding" not in run.body and "final_document" not in run.body  # the record's evaluation
    plan = re.search(r"^eval_plan: roundtrip_s:\d+ ttt_s:\d+ ttt_phases_s:\d+ total_s:\d+", run.body, re.M)
    assert plan, run.body[-3000:]
    scores = {}
    for backend in ("auto", "flex"):
        again = run_script({**SP8192_TINY, "EVAL_ONLY": str(run.artifact), "ATTN_BACKEND": backend, "TTT_ENABLED": "0"})
        assert again.returncode == 0, again.explain()
        scores[backend] = float(re.search(r"^final_roundtrip .*val_bpb:(\S+)", again.body, re.M)[1])
        kernel = re.search(r"^attention_backend:(.*)$", again.body, re.M)[1]
        assert kernel.startswith("flex (FlexAttention" if backend == "flex" else "sdpa auto within documents"), kernel
    first = float(re.search(r"^final_roundtrip .*val_bpb:(\S+)", run.body, re.M)[1])
    assert abs(scores["flex"] - scores["auto"]) < 1e-6 and abs(scores["auto"] - first) < 1e-6, (scores, first)


# ----------------------------------------------------------------------------- the evaluation plan


def full_size(**overrides) -> tg.Hyperparameters:
    return tg.hyperparameters_from_env({"PRESET": "sp8192", **overrides}, True)[0]


@pytest.mark.parametrize("targets", [40_540_160, 47_851_520])  # plain SP8192, SP8192-CaseOps
def test_sp8192s_evaluation_plan_fits_and_names_its_rates(targets):
    line = tg.eval_plan(full_size(), targets, 50_000)
    total = int(re.search(r"total_s:(\d+)", line)[1])
    assert line.startswith("eval_plan: roundtrip_s:") and "sliding" not in line and "WARNING" not in line
    assert total < 540 and "PR #1855" in line and "targets/s" in line, line
    with_sliding = tg.eval_plan(full_size(EVAL_STRIDE="64"), targets, 50_000)
    assert "sliding_s:" in with_sliding and "WARNING: over EVAL_BUDGET_SECONDS" in with_sliding
    assert int(re.search(r"total_s:(\d+)", with_sliding)[1]) > 600
