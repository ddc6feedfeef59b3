#!/usr/bin/env bash
# One short GPU run (issue: "one GPU script"): the whole default test suite on a CUDA machine
# (every CUDA-only test runs there instead of skipping), then the GPU half of each benchmark.
# Every benchmark writes its JSON to benchmarks/results/ (named by device). Each step has its
# own time limit so one slow part cannot eat the device budget; the script goes on after a
# failure and exits non-zero if any step failed.
#
#   bash benchmarks/run_gpu.sh            # ~8 minutes on one modern GPU (not yet measured)
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh needs CUDA')" || exit 1
export PYTHONUNBUFFERED=1
status=0
step() {  # step SECONDS COMMAND...
    local limit=$1; shift
    echo "== $*"
    timeout "$limit" "$@" || { echo "!! failed ($?): $*"; status=1; }
}
step 240 python -m pytest -q -rs -p no:cacheprovider
step 120 python benchmarks/bench_doei.py --device cuda
step 60 python benchmarks/bench_prototypes.py --device cuda
step 60 python benchmarks/bench_prototypes.py --device cuda --dim 768 --skip-loop --out benchmarks/results/prototypes_d768_cuda.json  # target < 50 ms
step 90 python benchmarks/bench_pcm.py --device cuda
step 90 python benchmarks/bench_cpal.py --device cuda
step 90 python benchmarks/bench_refine.py           # CPU and CUDA halves
step 180 python benchmarks/bench_swtformer.py         # CPU and CUDA halves
step 150 python benchmarks/bench_step.py --device cuda  # every recipe's training step, ViT-B/16 448, B=4
exit $status
