#!/usr/bin/env bash
# Issue 15's GPU checks (results/gpu.md), in two phases that each fit one device call:
#   eager:    the CUDA tests, the eager D=512 TRM frontier (attention and mlp_t) and the
#             trackers' share of an eager D=512 step (tracker_share.py: CUDA events around
#             every tracker call, refinements by call, time per tracker);
#   compiled: the compiled D=512 TRM (uncompressed, torch checkpoint, laser_fx default,
#             linear, region).
# Every timed step counts its host synchronisations (torch.cuda.set_sync_debug_mode "warn").
#   bash benchmarks/gpu.sh OUT [eager|compiled|all]   # PYTHON: the interpreter (python3)
# Each step has its own time limit (eager ~340 s, compiled ~330 s at most); the compiled one
# builds no configuration after 200 s. Results are written as each step ends.
set -u
out=${1:?usage: gpu.sh OUT [eager|compiled|all]}
phase=${2:-all}
case "$phase" in eager|compiled|all) ;; *) echo "unknown phase: $phase" >&2; exit 2 ;; esac
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
if [ "$phase" != compiled ]; then
    timeout 100 "$py" -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py \
        > "$out/tests.txt" 2>&1  # (the whole log: a failure's message is not cut off)
    grep -v "^DEBUG" "$out/tests.txt" | tail -n 15
    timeout 140 "$py" benchmarks/frontier.py --device cuda --models trm-attn trm-mlp_t \
        --d 512 --n 6 --T 3 --batch 256 --reps 10 --out "$out/frontier_d512.jsonl" --plot ''
    timeout 100 "$py" benchmarks/tracker_share.py --device cuda --d 512 --batch 256 \
        --steps 5 --warmup 3 --ideal-reps 5 --per-site --out "$out/tracker_share_d512.md"
fi
if [ "$phase" != eager ]; then
    timeout 330 "$py" benchmarks/compiled.py --device cuda --d 512 --batch 256 --steps 10 \
        --warmup 2 --lr 1e-3 --threads 4 --max-cold-s 200 \
        --configs unc ckpt laser linear region --out "$out/compiled_d512.md"
fi
