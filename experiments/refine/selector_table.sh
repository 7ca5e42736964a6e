#!/usr/bin/env bash
# Generate the molecules of the selector table (issue #24 point 3: every built-in selector at two call
# budgets, n = 10,000, seed 0) on a many-core machine, one single-threaded process per try, JOBS at a time;
# score them afterwards where RDKit is (python3 experiments/refine/sweep.py --score OUT/NAME for each NAME).
#
#   bash experiments/refine/selector_table.sh MODEL.onnx OUT [JOBS]
#
# Used on the lent GPU machine's CPU cores beside a training run (experiments/device/specs/2026-12-06g.json):
# it waits until session.py has installed the project into /tmp/site.
set -uo pipefail
model=$1; out=$2; jobs=${3:-12}  # N=20 in the environment for a smoke test
until [ -d /tmp/site/imadarem ] || python3 -c "import imadarem" 2>/dev/null; do sleep 2; done
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
here=$(cd "$(dirname "$0")" && pwd)
cp "$here/sweep.py" "$out/sweep.py"  # the repository copy may change between calls; this one does not
# name|steps|selector and options (slowest first, so the pool ends together)
tries=(
  "l2r-1||l2r"
  "maskgit-28|28|maskgit"
  "uniform-28|28|uniform"
  "gate-0.9-rev8||gate threshold=0.9 revisions=8"
  "gate-0.8-rev8||gate threshold=0.8 revisions=8"
  "maskgit-20|20|maskgit"
  "uniform-20|20|uniform"
  "l2r-2||l2r per_step=2"
  "entropy||entropy"
  "overwrite||overwrite"
)
for t in "${tries[@]}"; do echo "$t"; done | xargs -P "$jobs" -I{} bash -c '
  IFS="|" read -r name steps try <<< "{}"
  [ -f "'"$out"'/$name/try-00.json" ] && exit 0
  python3 "'"$out"'/sweep.py" "'"$model"'" -n "${N:-10000}" --threads 1 --tag gate-acceptance-rc3b-15.5k \
    ${steps:+--steps $steps} --try $try --generate-only "'"$out"'/$name" > "'"$out"'/$name.log" 2>&1
  echo "$name done rc=$?"'
echo all done
