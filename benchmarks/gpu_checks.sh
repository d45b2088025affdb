#!/bin/bash
# The GPU checks of issues #11 (speed) and #12 (cifar stem, full data), as one prepared script for the
# `device` tool's 15 minutes. Parts run in order, cheapest and most important first, each under its own cap,
# so a cut run still leaves the earlier results in $OUT (or OUTDIR):
#   1. smoke: a fast_dev_run of the magnet experiment on the GPU with model.compile=true (fails in a minute if
#      the setup is broken), and the CUDA sync-debug test of tests/test_host_sync.py;
#   2. benchmarks/gpu_speed.py --parts bare loop recluster: bare step eager/compiled for both stems, the magnet
#      loop eager/compiled through Lightning, re-clustering of 49k images;
#   3. 50 full-data magnet epochs, compiled (issue #11's wall-time target), with its test accuracy;
#   4. STAGE=2 only (a later lease): cifar stem, full data, 50 epochs each: softmax, magnet default, faithful K=2,
#      faithful K=8 (issue #12).
#
# Before calling the device (here, once): the machine lacks Hydra, OmegaConf, FAISS and the JPEG copy of CIFAR-10.
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hydra-core==1.3.8 omegaconf==2.3.1 faiss-cpu pytorch-metric-learning
#   python3 -m pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl   # omegaconf's parser: published as source only,
#                                                                          # so --only-binary above cannot fetch it
#   mkdir -p .gpu && cp -r ../shared/data .gpu/shared_data
# and call it with carry [".whl", ".gpu"]:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD;
#   bash benchmarks/gpu_checks.sh "$OUT"
set -u -o pipefail
out=${1:-outputs/gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
py=${PYTHON:-python3}
nvidia-smi -L
[ -f data/cifar-10-batches-py/test_batch ] || $py .gpu/shared_data/build_cifar10.py data || exit 1
common=(trainer.accelerator=gpu callbacks.rich_progress_bar=null +trainer.enable_progress_bar=false data.data_dir=data)
gpu_batch=(model.clusters.M=16 model.clusters.D=32 data.batch_size=512 callbacks.recluster.batch_size=2048)

echo "== 1. smoke" | tee -a "$out/summary.txt"
timeout 240 $py -m src.train experiment=magnet_cifar10 "${common[@]}" model.compile=true debug=fdr \
    hydra.run.dir="$out/smoke" > "$out/smoke.log" 2>&1 || { tail -30 "$out/smoke.log"; exit 1; }
timeout 120 $py -m pytest -q tests/test_host_sync.py -k cuda 2>&1 | tail -3 | tee -a "$out/summary.txt"

echo "== 2. speed" | tee -a "$out/summary.txt"
timeout 300 $py benchmarks/gpu_speed.py --parts bare loop recluster 2>&1 | grep -E "^[0-9]\.|device" | tee -a "$out/summary.txt"

echo "== 3. 50 full-data magnet epochs, compiled" | tee -a "$out/summary.txt"
timeout 420 $py benchmarks/gpu_speed.py --parts full 2>&1 | grep -E "^[0-9]\.|^   |failed" | tee -a "$out/summary.txt"

if [ "${STAGE:-1}" = 2 ]; then
  # the faithful default (K = 2), the same at K = 8, the hybrid and softmax, heaviest last
  for run in "softmax experiment=softmax_cifar10" \
             "hybrid experiment=magnet_cifar10_hybrid" \
             "magnet_k2 experiment=magnet_cifar10" \
             "magnet_k8 experiment=magnet_cifar10 model.clusters.K=8"; do
    set -- $run; name=$1; shift
    echo "== 4. $name, cifar stem, full data, 50 epochs" | tee -a "$out/summary.txt"
    start=$(date +%s)
    timeout 420 $py -m src.train "$@" "${common[@]}" "${gpu_batch[@]}" data.subset_size=null model.net.stem=cifar \
        model.compile=true hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1
    echo "$name exit $? after $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
    $py -c "import json,sys; r=json.load(open('$out/$name/results.json')); print({k: v for k, v in r.items() if k.startswith(('test/magnet', 'test/softmax', 'test/knn', 'test/nmi', 'test/map', 'test/attr_conc@10', 'val/best', 'time/total'))})" \
        2>/dev/null | tee -a "$out/summary.txt"
  done
fi
