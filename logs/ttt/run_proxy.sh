#!/bin/bash
# Score-first TTT on the CPU proxy, TTT on against off within one trained model (the logs beside this file).
#   bash logs/ttt/run_proxy.sh SEED [DATA_PATH TOKENIZER_PATH VOCAB_SIZE]     (from the repository root)
# Defaults: the sp1024 proxy unpacked by `python3 ../shared/data/unpack.py /tmp/proxy`. The model is the
# frontier at the proxy lab's shape (bench/sweeps/frontier_vs_pr76.json: 11 x 128, 120 steps of 4,096
# tokens); TTT with rank 20 (80 x 128/512, scaled with the width), 16 documents a batch, a phase after 16.
seed=${1:?seed}
data=${2:-/tmp/proxy/datasets/proxy_sp1024}
tokenizer=${3:-/tmp/proxy/tokenizers/proxy_1024_bpe.model}
vocab=${4:-1024}
env OMP_NUM_THREADS=1 PRESET=frontier NUM_LAYERS=11 MODEL_DIM=128 NUM_HEADS=2 NUM_KV_HEADS=1 TRAIN_SEQ_LEN=256 \
  TRAIN_BATCH_TOKENS=4096 ITERATIONS=120 WARMDOWN_ITERS=67 MUON_MOMENTUM_WARMUP_STEPS=29 SWA_INTERVAL=0 \
  EMA_DECAY=0.84 COMPILE=0 MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=0 TRAIN_LOG_EVERY=40 VAL_TOKENS=65536 \
  VAL_BATCH_SIZE=32768 GPTQ_CALIB_TOKENS=8192 DATA_PATH=$data TOKENIZER_PATH=$tokenizer VOCAB_SIZE=$vocab \
  TTT_ENABLED=1 TTT_LORA_RANK=20 TTT_BATCH_DOCS=16 TTT_PHASES=16 EVAL_BUDGET_SECONDS=100000 SEED=$seed \
  python3 train_gpt.py
