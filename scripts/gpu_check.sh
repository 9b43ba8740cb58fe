#!/usr/bin/env bash
# Every strategy briefly on the GPUs of this machine: one PASS/FAIL line each.
#   scripts/gpu_check.sh            (from the repository root, paratrain installed)
# Workers bind cuda:LOCAL_RANK; with fewer GPUs than workers they share them over gloo.
set -u
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print('GPUs:', torch.cuda.device_count(), \
torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1
pass=0; fail=0
check() {   # check NAME ARGS...: one short run; PASS if it exits 0 with a summary
    local name=$1; shift
    local out; out=$(timeout 300 python -m paratrain.cli train --epochs 1 --no-progress --log-interval 100000 --json "$@" 2>&1)
    local code=$?
    local summary; summary=$(printf '%s\n' "$out" | tail -1)
    if [ $code -eq 0 ] && [[ $summary == \{*param_checksum* ]]; then
        pass=$((pass + 1)); echo "PASS $name $(printf '%s' "$summary" | python -c \
            'import json,sys; d=json.load(sys.stdin); print("acc=%s loss=%.4f samples/s=%.0f" % (d["accuracy"], d["final_loss"], d["samples_per_sec"]))')"
    else
        fail=$((fail + 1)); echo "FAIL $name (exit $code): $(printf '%s\n' "$out" | grep -v '^\s*$' | tail -1 | cut -c1-200)"
    fi
}
check local --strategy local --workers 1
check local-amp-bf16 --strategy local --workers 1 --amp bf16
check local-amp-fp16 --strategy local --workers 1 --amp fp16
check allreduce --strategy allreduce --workers 2
check allreduce-clip-cosine --strategy allreduce --workers 2 --max-grad-norm 1 --lr-schedule cosine
for codec in fp16 bf16 2bit topk powersgd; do check "allreduce-$codec" --strategy allreduce --workers 2 --compression $codec; done
check dist_sync --strategy dist_sync --workers 2 --servers 1
check dist_async --strategy dist_async --workers 2 --servers 1
check dist_ssp --strategy dist_ssp --workers 2 --servers 1
check local_sgd --strategy local_sgd --workers 2
check pipeline --strategy pipeline --stages 2
check hybrid --strategy hybrid --stages 2 --replicas 2
echo "gpu_check: $pass passed, $fail failed"
[ $fail -eq 0 ]
