#!/bin/bash
# Full-data runs on one GPU (issues #3 and #4), side by side on one card:
#   1. magnet_cifar10 on all 49,000 training images (1,000 held out for validation), 50 epochs;
#   2. continual_5x2 on full data (10,000 training images per increment), 500 exemplars, magnet_memory.
# Both start with a fast_dev_run-style smoke run (SMOKE=0 skips it), so a broken setup fails in seconds.
# MAGNET_EXTRA / CONTINUAL_EXTRA append Hydra overrides, e.g. a shorter budget:
#   MAGNET_EXTRA="trainer.max_epochs=15"
# Measured on one H200 (two runs sharing it): ~9 s per magnet epoch on 49k images (2 s of it re-clustering),
# ~100 s per 30-epoch increment of the continual run; the step is launch-bound (~40 ms), not FLOP-bound.
#
#   bash benchmarks/gpu_full_data.sh [OUTDIR] [BUILD_SCRIPT]
#
# Bigger batches than the CPU default (D images per cluster): at 32 px GoogLeNet is launch-bound on a GPU,
# so the CPU's 60-image batches would leave the card idle. Everything else is the default configuration.
set -u -o pipefail
out=${1:-outputs/gpu}
build=${2:-../shared/data/build_cifar10.py}
budget=${GPU_RUN_SECONDS:-480}   # each full run is cut here so its partial logs still come back
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
py=${PYTHON:-python3}

nvidia-smi -L
$py -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, torch.cuda.get_device_name())"
[ -f data/cifar-10-batches-py/test_batch ] || $py "$build" data || exit 1

common=(trainer.accelerator=gpu callbacks.rich_progress_bar=null +trainer.enable_progress_bar=false data.data_dir=data)
magnet=(experiment=magnet_cifar10 data.subset_size=null model.clusters.M=10 model.clusters.D=24 data.batch_size=256 ${MAGNET_EXTRA:-})
continual=(experiment=continual_5x2 data.subset_size=null trainer.max_epochs=30
           model.clusters.D=32 data.batch_size=256 ${CONTINUAL_EXTRA:-})

if [ "${SMOKE:-1}" = 1 ]; then
echo "== smoke"
# warm-up, the K split, validation and test, on a few batches each
smoke=(trainer.max_epochs=3 trainer.limit_train_batches=5
       trainer.limit_val_batches=2 trainer.limit_test_batches=2 model.evaluation.tsne_per_class=10)
$py -m src.train "${magnet[@]}" "${common[@]}" data.subset_size=2000 "${smoke[@]}" \
    hydra.run.dir="$out/smoke_magnet" > "$out/smoke_magnet.log" 2>&1 || { tail -40 "$out/smoke_magnet.log"; exit 1; }
$py -m src.train "${continual[@]}" "${common[@]}" data.subset_size=2000 debug=fdr \
    hydra.run.dir="$out/smoke_continual" > "$out/smoke_continual.log" 2>&1 || { tail -40 "$out/smoke_continual.log"; exit 1; }
echo "smoke passed"
fi

echo "== full data (both runs at once, ${budget}s cap each)"
start=$(date +%s)
( /usr/bin/time -f "WALL %e s" timeout "$budget" $py -m src.train "${magnet[@]}" "${common[@]}" \
    hydra.run.dir="$out/magnet_full" > "$out/magnet_full.log" 2>&1; echo "magnet exit $? after $(( $(date +%s) - start ))s" ) &
( /usr/bin/time -f "WALL %e s" timeout "$budget" $py -m src.train "${continual[@]}" "${common[@]}" \
    hydra.run.dir="$out/continual_full" > "$out/continual_full.log" 2>&1; echo "continual exit $? after $(( $(date +%s) - start ))s" ) &
wait
for f in magnet_full continual_full; do echo "== $f"; grep -E "WALL|increment .*Class-IL|results written|Error|error" "$out/$f.log" | tail -15; done
$py - "$out" <<'EOF'
import json, sys, pathlib
for name in ("magnet_full", "continual_full"):
    p = pathlib.Path(sys.argv[1]) / name / "results.json"
    if not p.is_file():
        print(name, "no results.json"); continue
    r = json.loads(p.read_text())
    keep = {k: v for k, v in r.items() if k.startswith(("test/", "time/", "final_", "val/")) or k in ("table",)}
    print(name, json.dumps(keep, indent=1, default=str)[:3000])
EOF
