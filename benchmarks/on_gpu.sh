#!/usr/bin/env bash
# The GPU checks in one go, for a lent GPU machine whose python3 has torch with CUDA; run from the repository
# root. Logs under $OUT (default /tmp/nnvitals-gpu): the GPU tests with the torch-op path alone, the compiled
# parts built against that machine's torch, the GPU tests again with them, then profile_step.py and peers.py on
# the GPU. Each part has its own time limit, so one that hangs leaves the others their time.
#
#     bash benchmarks/on_gpu.sh [peers.py's --models ...]        (default: mlp; a transformer round on a GPU
#                                                                  takes minutes, mostly TensorBoard's)
set -u
OUT=${OUT:-/tmp/nnvitals-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
limit() { local s=$1; shift; timeout "$s" "$@"; echo "[exit $? at ${SECONDS}s: $*]"; }
{
    nvidia-smi -L
    $py -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
    rm -f src/nnvitals/_kernel.*.so src/nnvitals/_autograd.*.so
    limit 120 $py -m pytest -p no:cacheprovider tests/doctor/test_cuda.py
    limit 180 $py setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
    tail -3 "$OUT/build.log"
    $py -c "import torch, nnvitals._kernel, nnvitals._autograd; print('compiled parts built')"
    limit 120 $py -m pytest -p no:cacheprovider tests/doctor/test_cuda.py
    limit 90 $py benchmarks/profile_step.py --device cuda --steps 20
    limit 240 $py benchmarks/peers.py --device cuda --models "${@:-mlp}" --rounds 5 --mlp-steps 100
} 2>&1 | grep -v '^USDT:' | tee "$OUT/log.txt"
