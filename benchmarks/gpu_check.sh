#!/usr/bin/env bash
# The GPU checks, as one command for a machine that is lent for a few minutes only: the CUDA
# tests, then the speed suite eager and compiled. Results land in benchmarks/results/<gpu>/;
# with $OUT set, speed.json and speed.png are copied there with the logs (at most 8 files come
# back from the device tool); `longrange bench report` then regenerates the README here.
#
# It uses the machine's own python3 and torch, and puts src/ on the path instead of
# installing (no package index there). Packages that machine lacks (faiss-cpu) travel as
# wheels in .whl/, fetched beforehand with `pip download --no-deps --only-binary=:all:` for
# its Python (README, "Benchmarks").
#
# Sized by the environment: MODELS (default all), LENGTHS (eager, default 1024,8192,65536),
# COMPILE_LENGTHS (default 8192), REPEATS (default 3), DEVICE (default cuda). Each step has its
# own time limit, so that one that hangs leaves the others their time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-all}
LENGTHS=${LENGTHS:-1024,8192,65536}
COMPILE_LENGTHS=${COMPILE_LENGTHS:-8192}
REPEATS=${REPEATS:-3}
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_check_site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" | tail -25
    echo "== $name: exit ${PIPESTATUS[0]}"
}

$PY -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
# tests/test_cuda.py, and the CUDA cases kept beside their CPU tests (named for it)
step cuda_tests 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/ops/test_local.py \
    tests/ops/test_shared_kv.py tests/modules/test_reversible.py -k cuda
step speed 300 $PY -m longrange.cli bench speed --device "$DEVICE" --models "$MODELS" \
    --lengths "$LENGTHS" --repeats "$REPEATS"
step compiled 300 $PY -m longrange.cli bench speed --device "$DEVICE" --models "$MODELS" \
    --lengths "$COMPILE_LENGTHS" --repeats "$REPEATS" --compile --no-memory

folder=$($PY -c "from longrange.bench.device import device_slug; print(device_slug('$DEVICE'))")
if [ -n "${OUT:-}" ]; then
    $PY -m longrange.cli bench report --readme /tmp/gpu_check_README.md >/dev/null 2>&1  # draws speed.png
    cp benchmarks/results/"$folder"/speed.json benchmarks/results/"$folder"/speed.png "$OUT"/ &&
        echo "copied benchmarks/results/$folder/speed.{json,png} to \$OUT"
fi
