#!/usr/bin/env bash
# The recipe of the bundled default model: Imadarem V on MOSES (SELFIES), trained on one GPU.
#
#   bash training/recipes/moses.sh [RUN_DIR] [extra `imadarem train` flags, e.g. --time-limit 540]
#
# Run it again with the same RUN_DIR to resume (it passes --resume when RUN_DIR holds a run); the run
# is chunked that way on machines that only lend a GPU for minutes at a time. Data: MOSES train split
# from molsets==0.3.1 (wheel sha256 checked by `imadarem data moses`); train.csv.gz sha256
# 786f0313aa6b9ba5514df685f885742a70ea8d86f1a4fa48115f7f80a634265c is recorded in run.json too.
set -euo pipefail
run=${1:-runs/moses}
shift || true
data=${MOSES_TRAIN:-$(imadarem data moses | awk '$1=="train"{print $2}')}
if [ -f "$run/latest" ]; then
  exec imadarem train --resume --out-dir "$run" --data "$data" "$@"
fi
exec imadarem train --data "$data" --out-dir "$run" \
  --seed 0 --steps 24000 --batch-size 512 --lr 1e-3 --warmup-steps 1000 --weight-decay 0.01 \
  --hidden-size 256 --layers 6 --heads 8 --dropout 0.1 --max-seq-len 64 --refine-steps 12 \
  --set ema_decay=0.9995 --eval-interval 1000 --checkpoint-interval 1000 --log-interval 100 \
  --val-fraction 0.01 "$@"
