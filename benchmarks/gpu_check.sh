#!/usr/bin/env bash
# The GPU check: run it, in the repository root, whenever a machine with a CUDA GPU is at
# hand. In under 8 minutes on one GPU it
#   1. runs the GPU tests (tests/experiments/test_gpu.py: a run on the GPU follows the CPU
#      run, its checkpoint resumes on the CPU, MC sampling agrees across devices);
#   2. times the step-time matrix on CUDA (MNIST autoencoder, cuda-convnet, ResNet-18 on
#      CIFAR-shaped random data; SGD, KFAC, EKFAC, two-level, and ASDL when installed) with
#      torch.cuda.synchronize timing, and each method's peak CUDA memory;
#   3. takes bf16-autocast steps with every optimizer class;
# and writes OUT/gpu.{json,md} (OUT defaults to docs/benchmarks) and OUT/gpu_tests.log.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu --out D  # the dry run (tiny problems, CPU;
#                                                      # make test runs it as a smoke test)
#
# Options: --device cuda|cpu (default cuda), --out DIR, --python PY (default: .venv's python
# when present, else python3). The package is used from src/ (PYTHONPATH), so the machine
# needs torch, numpy and tqdm only; the GPU tests also need pydantic and PyYAML, and the
# ASDL rows asdfghjkl. On a machine without a network, carry their wheels in .whl/ (see
# docs/benchmarks/README.md, "GPU check"): on a CUDA device the script installs
# .whl/*.whl into a temporary folder first (the CPU dry run uses the local environment).
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
out=docs/benchmarks
python=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$device" in
    cuda|cuda:*|cpu) ;;
    *) echo "gpu_check.sh: --device must be cuda, cuda:K or cpu; got $device" >&2; exit 2 ;;
esac
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [[ "$device" != cpu ]] && compgen -G ".whl/*.whl" >/dev/null; then  # the GPU machine's
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
fi

start=$SECONDS
echo "== GPU check on $device ($("$python" -c 'import torch; print(torch.__version__)'))"
if [[ "$device" != cpu ]]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
    "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else
        "torch sees no CUDA device: run with --device cpu for the dry run")'
fi

echo "== 1/2 GPU tests"
tests_status=0
"$python" -m pytest -q -p no:cacheprovider -rs tests/experiments/test_gpu.py \
    2>&1 | tee "$out/gpu_tests.log" || tests_status=$?

echo "== 2/2 step times on $device and bf16 autocast (tlkfac bench gpu)"
quick=()
[[ "$device" == cpu ]] && quick=(--quick)
"$python" -c 'import sys; from twolevel_kfac.cli import main; sys.exit(main(sys.argv[1:]))' \
    bench gpu --device "$device" --out "$out" "${quick[@]}"

echo "== done in $((SECONDS - start)) s: $out/gpu.md, $out/gpu_tests.log"
if [[ $tests_status -ne 0 ]]; then
    echo "the GPU tests failed (exit $tests_status): $out/gpu_tests.log" >&2
    exit "$tests_status"
fi
