#!/usr/bin/env bash
# On a lent GPU machine: build the extension with the machine's own python3 and torch, then run the phases named in
# PHASES (default: all, in this order):
#   tests     the whole test suite, CUDA tests included (TESTS_ARGS, e.g. "-m cuda", narrows it)
#   kernels   the kernel microbenchmarks (pytest-benchmark; BENCH_ARGS)
#   engine    bench_engine.py: decode ms/step and prefill vs transformers + PEFT (ENGINE_ARGS, e.g.
#             "--only nf4,nf4-staged,nf4-o-shrink-apart", narrows it)
#   host      bench_host.py: host time per step outside the model
#   profile   profile_step.py: where a batch-1 decode step's time goes (PROFILE_SETUPS)
#   serving   bench_serving.py: the LoRAX load test vs transformers + PEFT (SERVING_ARGS)
#   adapters  bench_adapters.py: serving with 1..128 adapters
# SKIP_<PHASE>=1 (SKIP_TESTS, SKIP_KERNEL_BENCH, SKIP_ENGINE_BENCH, SKIP_HOST_BENCH, SKIP_PROFILE,
# SKIP_SERVING_BENCH, SKIP_ADAPTERS_BENCH) also leaves a phase out.
#
# The device tool allows 10 minutes a command and brings back at most 8 files from $OUT. So every file the phases
# write goes to $RES (default /tmp/lorax-gpu), packed into $OUT/results.tgz after each phase, and everything printed
# goes live to $OUT/gpu.log: a call killed at its limit still brings back the log and the finished phases.
# Unpack here with `tar xzf results.tgz`. Build outputs stay on a warm machine, so later calls rebuild little.
# Calls that fit in 10 minutes each (timed on an H100; a phase's start time is logged):
#   PHASES=tests TESTS_ARGS="-m cuda" bash bench/gpu.sh          (2.5 min on 2026-11-24, build included)
#   PHASES=engine,host bash bench/gpu.sh                         (engine + host + profile took 7 min before the
#   PHASES=profile bash bench/gpu.sh                              engine's fusions-off and async-off rows and the
#                                                                 profile's nf4-nopdl and nf4-sync setups: two calls)
#   PHASES=kernels bash bench/gpu.sh                             (2 min on 2026-11-24; more since: the NF4 staged
#                                                                 columns, the decode attention table)
#   PHASES=tests,engine,profile TESTS_ARGS="-m cuda" PROFILE_SETUPS=nf4-nopdl,nf4 bash bench/gpu.sh
#                                                                (6 min on 2026-11-24: a change's whole check;
#                                                                 the engine phase has more engines since: narrow
#                                                                 it with ENGINE_ARGS="--only nf4,...")
#   PHASES=serving SERVING_ARGS="--clients 1,32 --adapters 1,32 --cell-seconds 6" bash bench/gpu.sh   (4 min)
# Missing wheels (bitsandbytes) travel in .whl/ (see bench/RESULTS.md for how to fetch them).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-bench/out}
RES=${RES:-/tmp/lorax-gpu}
mkdir -p "$DEST" "$RES"
export OUT="$RES"  # where the benchmarks write their tables (bench/conftest.py and each script's --out default)
exec > >(tee -a "$DEST/gpu.log") 2>&1
pack() { tar czf "$DEST/results.tgz" -C "$RES" . ; }
want() {  # want PHASE SKIP_VARIABLE
  [[ ",${PHASES:-tests,kernels,engine,host,profile,serving,adapters}," == *",$1,"* ]] && [ -z "${!2:-}" ]
}

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
# The lent machine presets CXX=/opt/gcc/bin/g++, whose builds of the extension crash on any C++ exception (every
# TORCH_CHECK) with its torch; the system compiler's builds do not (seen 2026-11-23). LORAX_CXX overrides.
if [ -x /usr/bin/g++ ]; then export CXX=${LORAX_CXX:-/usr/bin/g++}; fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  } | tee "$RES/device.txt"  # no commit: the device's copy of .git names an older one than the tree it got

start=$(date +%s)
if ! python3 -m pip install -v --no-build-isolation --no-deps -e . > "$RES/build.log" 2>&1; then
  tail -40 "$RES/build.log"; pack; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
pack

status=0
phase() { echo "== $1 ($(date +%T))"; }
if want tests SKIP_TESTS; then
  phase tests
  # the lent machine has no fastapi / openai: the server tests' modules cannot be imported there (CI runs them)
  python3 -m pytest -q --maxfail=30 --continue-on-collection-errors tests ${TESTS_ARGS:-} 2>&1 \
    | tee "$RES/tests.log" | tail -40 || status=1
  pack
fi
if want kernels SKIP_KERNEL_BENCH; then
  phase kernels
  python3 -m pytest -q bench -m bench ${BENCH_ARGS:-} --benchmark-json="$RES/bench.json" 2>&1 \
    | grep -v "^bench/" > "$RES/bench.log" || status=1
  tail -40 "$RES/bench.log"
  pack
fi
if want engine SKIP_ENGINE_BENCH; then
  phase engine
  # each engine's rows go to the log as it finishes: a call cut short at the device's limit keeps them
  python3 bench/bench_engine.py ${ENGINE_ARGS:-} 2>&1 | tee "$RES/engine.log" | grep --line-buffered "^|" || status=1
  pack
fi
if want host SKIP_HOST_BENCH; then  # host time per step outside the model: detokenizing, the step's inputs, sampling
  phase host
  python3 bench/bench_host.py --out "$RES" > "$RES/host.log" 2>&1 || status=1
  tail -20 "$RES/host.log"
  pack
fi
if want profile SKIP_PROFILE; then  # where a batch-1 decode step's time goes (issue #4's 2 ms target)
  phase profile
  python3 bench/profile_step.py --batch 1 --setups ${PROFILE_SETUPS:-nf4,nf4-sync,nf4-nopdl,nf4-eager,bf16-eager,nf4-eager-base} \
    --out "$RES" > "$RES/profile.log" 2>&1 || status=1
  tail -5 "$RES/profile.log"
  pack
fi
if want serving SKIP_SERVING_BENCH; then  # the LoRAX load test vs transformers + PEFT (issue #7); no matplotlib
  # here: redraw the plots from serving.json with `python3 bench/bench_serving.py --plot serving.json`
  phase serving
  python3 bench/bench_serving.py --out "$RES" ${SERVING_ARGS:-} > "$RES/serving.log" 2>&1 || status=1
  tail -5 "$RES/serving.log"
  pack
fi
if want adapters SKIP_ADAPTERS_BENCH; then
  phase adapters
  python3 bench/bench_adapters.py --out "$RES" 2>&1 | tail -30 | tee "$RES/adapters.log" || status=1
  pack
fi
echo "== done, status $status"
exit $status
