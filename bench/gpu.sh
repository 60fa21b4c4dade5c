#!/usr/bin/env bash
# One call on a lent GPU machine: build the extension with the machine's own python3 and torch, run the whole
# test suite (CUDA tests included) and the benchmarks, and write logs and tables under $OUT.
# Missing wheels (bitsandbytes) travel in .whl/ (see bench/RESULTS.md for how to fetch them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
# The lent machine presets CXX=/opt/gcc/bin/g++, whose builds of the extension crash on any C++ exception (every
# TORCH_CHECK) with its torch; the system compiler's builds do not (seen 2026-11-23). LORAX_CXX overrides.
if [ -x /usr/bin/g++ ]; then export CXX=${LORAX_CXX:-/usr/bin/g++}; fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"; } | tee "$OUT/device.txt"

start=$(date +%s)
if ! python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q --maxfail=30 tests ${TESTS_ARGS:-} 2>&1 | tee "$OUT/tests.log" || status=1
fi
if [ -z "${SKIP_KERNEL_BENCH:-}" ]; then
  python3 -m pytest -q bench -m bench ${BENCH_ARGS:-} --benchmark-json="$OUT/bench.json" 2>&1 \
    | grep -v "^bench/" > "$OUT/bench.log" || status=1
  tail -40 "$OUT/bench.log"
fi
if [ -z "${SKIP_ENGINE_BENCH:-}" ]; then
  python3 bench/bench_engine.py 2>&1 | tail -30 | tee "$OUT/engine.log" || status=1
fi
if [ -z "${SKIP_HOST_BENCH:-}" ]; then  # host time per step outside the model: detokenizing, the step's inputs
  python3 bench/bench_host.py --out "$OUT" > "$OUT/host.log" 2>&1 || status=1
  tail -12 "$OUT/host.log"
fi
if [ -z "${SKIP_PROFILE:-}" ]; then  # where a batch-1 decode step's time goes (issue #4's 2 ms target)
  python3 bench/profile_step.py --batch 1 --setups ${PROFILE_SETUPS:-nf4,nf4-eager,bf16-eager,nf4-eager-base} \
    --out "$OUT" > "$OUT/profile.log" 2>&1 || status=1
fi
if [ -z "${SKIP_SERVING_BENCH:-}" ]; then  # the LoRAX load test vs transformers + PEFT (issue #7); no matplotlib
  # here: redraw the plots from serving.json with `python3 bench/bench_serving.py --plot serving.json`
  python3 bench/bench_serving.py --out "$OUT" ${SERVING_ARGS:-} > "$OUT/serving.log" 2>&1 || status=1
  tail -5 "$OUT/serving.log"
fi
if [ -z "${SKIP_ADAPTERS_BENCH:-}" ]; then
  python3 bench/bench_adapters.py --out "$OUT" 2>&1 | tail -30 | tee "$OUT/adapters.log" || status=1
fi
exit $status
