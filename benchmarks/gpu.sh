#!/usr/bin/env bash
# Issue 15's GPU checks in one device call (results/gpu.md): the CUDA tests, the eager D=512
# TRM frontier, and the compiled D=512 TRM (uncompressed, torch checkpoint, laser_fx default,
# linear, region); every timed step counts its host synchronisations
# (torch.cuda.set_sync_debug_mode "warn").
#   bash benchmarks/gpu.sh OUT      # PYTHON: the interpreter (default python3)
# Each step has its own time limit; the compiled one builds no configuration after 200 s.
set -u
out=${1:?usage: gpu.sh OUT}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout 100 "$py" -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py \
    > "$out/tests.txt" 2>&1  # (the whole log: a failure's message is not cut off)
grep -v "^DEBUG" "$out/tests.txt" | tail -n 15
timeout 140 "$py" benchmarks/frontier.py --device cuda --models trm-attn trm-mlp_t \
    --d 512 --n 6 --T 3 --batch 256 --reps 10 --out "$out/frontier_d512.jsonl" --plot ''
timeout 330 "$py" benchmarks/compiled.py --device cuda --d 512 --batch 256 --steps 10 \
    --warmup 2 --lr 1e-3 --threads 4 --max-cold-s 200 \
    --configs unc ckpt laser linear region --out "$out/compiled_d512.md"
