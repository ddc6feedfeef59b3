#!/usr/bin/env bash
# One short GPU run: the whole default test suite on a CUDA machine (every CUDA-only test runs
# there instead of skipping), then the GPU half of each benchmark, most important first. Every
# benchmark writes its JSON to benchmarks/results/ (named by device).
#
#   bash benchmarks/run_gpu.sh 2>&1 | tee run_gpu.log
#
# Budget: the steps share BUDGET seconds (default 480, so that the run and the machine's start-up
# fit in 10 minutes); each step also has its own limit, is cut to what is left,
# and is skipped when under 15 s are left. The script goes on after a failure and exits non-zero
# if any step failed or was skipped. Needs no install: it runs from the checkout with
# PYTHONPATH set (torch, timm, einops, numpy and opt_einsum must be importable by $PYTHON,
# default python3). When $OUT is set (an output folder collected after the run), every JSON
# written by the run is packed into $OUT/gpu_results.tar.gz; unpack it at the repository root and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh needs CUDA')" || exit 1
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
marker=$(mktemp)
deadline=$((SECONDS + ${BUDGET:-480}))
status=0
step() {  # step SECONDS COMMAND...
    local limit=$1 left=$((deadline - SECONDS)); shift
    if ((left < 15)); then echo "!! skipped (budget spent): $*"; status=1; return; fi
    ((limit > left)) && limit=$left
    echo "== [${SECONDS}s, limit ${limit}s] $*"
    timeout "$limit" "$@" || { echo "!! failed ($?): $*"; status=1; }
}
step 150 "$PY" -m pytest -q -rs -p no:cacheprovider
step 45 "$PY" benchmarks/bench_prototypes.py --device cuda --dim 768 --skip-loop --repeats 5 \
    --out benchmarks/results/prototypes_d768_cuda.json  # target < 50 ms
step 120 "$PY" benchmarks/bench_step.py --device cuda  # every recipe's training step, ViT-B/16 448, B=4
step 40 "$PY" benchmarks/bench_prototypes.py --device cuda --repeats 5
step 60 "$PY" benchmarks/bench_doei.py --device cuda
step 45 "$PY" benchmarks/bench_cpal.py --device cuda
step 45 "$PY" benchmarks/bench_pcm.py --device cuda
step 60 "$PY" benchmarks/bench_refine.py           # CPU and CUDA halves
step 90 "$PY" benchmarks/bench_swtformer.py         # CPU and CUDA halves
if [ -n "${OUT:-}" ]; then
    find benchmarks/results -name '*.json' -newer "$marker" -print0 \
        | tar czf "$OUT/gpu_results.tar.gz" --null -T - && echo "packed into $OUT/gpu_results.tar.gz"
fi
rm -f "$marker"
echo "== done in ${SECONDS}s, status $status"
exit $status
