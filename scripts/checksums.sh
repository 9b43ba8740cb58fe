#!/usr/bin/env bash
# usage: scripts/checksums.sh REPO OUTFILE: the param_checksum, steps and final loss of 19
# deterministic CLI runs (every strategy and codec); a change that keeps the arithmetic keeps them all.
REPO=$1; OUT=$2; : > $OUT
cd $REPO
run() { name=$1; shift; s=$(PYTHONPATH=$REPO OMP_NUM_THREADS=1 timeout 600 python -m paratrain.cli train --json --no-progress --log-interval 100000 "$@" 2>/dev/null | tail -1 | python -c "import json,sys; d=json.loads(sys.stdin.read()); print(d['param_checksum'], d['steps'], round(d['final_loss'],6))" 2>&1); echo "$name $s" >> $OUT; }
run main
run local --strategy local --workers 1 --epochs 2
run allreduce4 --workers 4 --epochs 2
run mlp --model mlp --epochs 2
run dist_sync --strategy dist_sync --servers 2 --workers 2 --epochs 2
run dist_sync_local_opt --strategy dist_sync --servers 1 --workers 2 --epochs 2 --max-restarts 1
run local_sgd --strategy local_sgd --workers 2 --epochs 2
run pipeline --strategy pipeline --stages 2 --epochs 2
run pipeline_gpipe --strategy pipeline --stages 2 --schedule gpipe --epochs 2
run hybrid --strategy hybrid --stages 2 --replicas 2 --epochs 2
run fp16 --compression fp16 --epochs 2
run bf16 --compression bf16 --epochs 2
run 2bit --compression 2bit:0.5 --epochs 2
run topk --compression topk:0.01 --epochs 2
run powersgd --compression powersgd:2 --epochs 2
run accumulate --accumulate 2 --epochs 2
run amp --amp bf16 --epochs 2
run adam --optimizer adam --lr 0.001 --epochs 2
run synthetic --dataset synthetic --model mlp --epochs 1
