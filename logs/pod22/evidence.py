"""Issue 22's CPU evidence figures (run from the repository root): FlexAttention's forward against
the dense-mask SDPA, the TTT budget rule on 50,000 lognormal document lengths, sp8192's eval_plan."""
import sys, warnings
import numpy as np
import torch
sys.path.insert(0, ".")
sys.path.insert(0, "tests")
import train_gpt as tg
from test_ttt import lognormal_documents, simulate
from conftest import tiny_hparams

warnings.simplefilter("ignore")
print(f"torch {torch.__version__}, CPU, fp32")
for batch, length, every in ((2, 256, 37), (3, 512, 200), (4, 2048, 800), (1, 2048, 10_000)):
    g = torch.Generator().manual_seed(length)
    tokens = torch.randint(4, 1000, (batch, length), generator=g)
    tokens[torch.rand(batch, length, generator=g) < 1 / every] = tg.BOS_ID
    q, k, v = (torch.randn(batch, heads, length, 64, generator=g) for heads in (8, 4, 4))
    flex = tg.causal_attention(q, k, v, None, tg.document_block_mask(tokens))
    dense = tg.causal_attention(q, k, v, None, tg.document_mask(tokens))
    print(f"flex vs dense mask: {batch} x 8/4 heads x {length} x 64, a BOS every ~{every}: "
          f"max abs diff {(flex - dense).abs().max().item():.2e}")

h = tiny_hparams(ttt_batch_docs=64, ttt_chunk_tokens=48, eval_seq_len=2048, train_seq_len=2048, train_batch_tokens=8 * 2048)
docs = lognormal_documents()
batches = [docs.order[i:i + 64] for i in range(0, len(docs.order), 64)]
work = tg.batch_work(docs, batches, h)
flat = np.array([p for chunks in work for p in chunks], dtype=np.float64)
print(f"budget simulation: {len(docs.start)} documents, mean {docs.num_targets.mean():.0f} targets, {len(batches)} batches, "
      f"{len(flat)} chunks, {flat.sum():.3e} positions; 1e-6 s per position adapted, a third of that plain")
adapted_s = flat.sum() * 1e-6
for factor in (0.5, 1.5):
    budget = adapted_s / factor
    seconds, adapted = simulate(work, budget)
    share = flat[np.array(adapted)].sum() / flat.sum()
    print(f"  planned adapted work {factor}x the budget ({budget:.1f} s): adapted chunks {sum(adapted)} of {len(flat)}, "
          f"{share:.4%} of positions; finished at {seconds:.3f} s")
for targets, split in ((40_540_160, "plain SP8192"), (47_851_520, "SP8192-CaseOps")):
    print(f"{split}: " + tg.eval_plan(tg.hyperparameters_from_env({"PRESET": "sp8192"}, True)[0], targets, 50_000))
# evidence_cpu.txt's last line was printed with TTT_PLAIN_SCORE=1 too, a setting removed since (its document_s pass)
print("with EVAL_STRIDE=64: " + tg.eval_plan(
    tg.hyperparameters_from_env({"PRESET": "sp8192", "EVAL_STRIDE": "64"}, True)[0], 47_851_520, 50_000))
