#!/usr/bin/env bash
# One call on a GPU machine: build jaxdnn in place against what is installed there (no
# network), run the GPU tests (plain and inside CUDA graphs) and the benchmarks, and write
# every log to a folder.
#
#   scripts/gpu_check.sh [LOG_DIR]      LOG_DIR defaults to $OUT, else ./gpu-logs
#
# Python wheels the machine lacks (the cudnn-frontend headers) may be put in ./.whl;
# they are installed from there without network (scripts/device_inputs.sh puts them there
# and, for the baseline stage, an older commit's tree in ./.baseline). STAGES (default "build info tests
# graphs fuzz sharding bench rnnbench flaxbench inprogram percall scaling examples") picks which
# stages run (RNN_PEERS_ARGS: options of the rnnbench stage; "rnnlarge", not a default,
# times the RNN peers at H1024 and at T512);
# "alltests" runs the whole suite on the GPU too (the CPU tests then exercise jaxdnn's
# default path there).
# TESTS (default "tests") names the test files or folders the test stages run (TEST_JOBS:
# how many pytest processes share them, below); BENCH_OPS
# (default: all) the ops of the bench stage, INPROGRAM_OPS (default conv pool) those of
# the inprogram stage, KERNEL_TIMES_ARGS the options of the kerneltimes stage.
# "peers" (not a default stage) runs `jaxdnn bench --peers` (PEERS_ARGS: its options);
# "routes" (not a default stage) times convolutions on each layout route (ROUTES_ARGS).
# "inmodel" (not a default stage; estimated 5-10 minutes, 2-3 with INMODEL_ARGS=--quick)
# times softmax and batch norm where models use them (attention, a classifier head,
# ReLU(batch norm) in every dtype, layout and mode; inside one program and per call),
# jaxdnn on 'auto' and forced onto cuDNN beside XLA (benchmarks/in_model.py, the figures
# 'auto' routes those ops from); INMODEL_ARGS passes it options (--quick, --match ...).
# "wheel" (not a default stage; see wheel() below) builds the pure wheel and the CUDA 13
# plugin wheel, installs them into a venv and runs WHEEL_TESTS' GPU tests from there.
# BASELINE_DIR (the baseline stage, not in the defaults): another source tree of jaxdnn,
# e.g. an older commit's `git archive`, built and benchmarked first (in_program.py and
# per_call.py into LOG_DIR/baseline) so that this tree's figures compare on one card;
# "abtest" (not a default stage) times both trees in alternation, AB_ROUNDS rounds, and
# writes the comparison to LOG_DIR/abtest.md.
# "reliability" (not a default stage; about 6 minutes) runs the soak, the arrays past
# 2**31 elements and the fuzz run, and writes RELIABILITY.md's GPU section into
# LOG_DIR/RELIABILITY.md; SOAK_SECONDS (45), SOAK_THREADS (8), SOAK_ARGS (more options of
# benchmarks/soak.py, e.g. --models lstm), FUZZ_RUN_SECONDS (180),
# FUZZ_RUN_CONFIGS (12000), FUZZ_RUN_GROUP (8 configurations per program),
# FUZZ_RUN_XLA_EVERY (1: every configuration also against the XLA path) and
# FUZZ_RUN_WORKERS (cores less one, at most 12) bound it. "soakbisect" (not a default
# stage, about 5 minutes) runs three soaks that narrow down a concurrency failure;
# "soakcrash" (not a default stage, about 4 minutes) reruns the one left with variants.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-${OUT:-gpu-logs}}
mkdir -p "$LOG_DIR"
STAGES=${STAGES:-"build info tests graphs fuzz sharding bench rnnbench flaxbench inprogram percall scaling examples"}
PYTHON=${PYTHON:-python3}
read -r -a TESTS <<<"${TESTS:-tests}"
export PYTHONUNBUFFERED=1
status=0

run_stage() {  # name, command...: run, log to $LOG_DIR/name.log, remember failures
  local name=$1; shift
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" >"$LOG_DIR/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  tail -n 25 "$LOG_DIR/$name.log"
  [ $rc -eq 0 ] || status=1
}

build() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install --no-index --no-deps --no-cache-dir .whl/*.whl || return 1
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . \
    -Ccmake.define.JAXDNN_REQUIRE_CUDA=ON || return 1
}

# "wheel" (not a default stage): the pure jaxdnn wheel and the CUDA 13 plugin wheel (CUDA=12
# for the other), built with what is installed (no network), installed into a venv that sees
# the machine's packages, and the GPU tests of WHEEL_TESTS (default tests/test_softmax.py
# tests/test_pooling.py) run from outside the checkout, so that `import jaxdnn` is the
# installed wheel's. The venv gets the machine's sys.path through a .pth file rather than
# --system-site-packages, which would also run the machine's .pth files, among them the
# build stage's editable install, whose import hook would shadow the installed wheel.
wheel() {
  local dir major=${CUDA:-13} here=$PWD
  dir=$(cd "$LOG_DIR" && pwd)/wheel
  rm -rf "$dir" && mkdir -p "$dir/dist" "$dir/run" || return 1
  "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$dir/dist" . || return 1
  "$PYTHON" -m pip wheel --no-build-isolation --no-deps -v -w "$dir/dist" ./plugin \
    -Ccuda="$major" || return 1
  "$PYTHON" -m venv "$dir/venv" || return 1
  local site
  site=$("$dir/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  (cd "$dir/run" && "$PYTHON" -P -c "import os, sys; print('\n'.join(p for p in sys.path
    if p and os.path.isdir(p) and not os.path.samefile(p, '$here')))") >"$site/machine.pth" || return 1
  "$dir/venv/bin/python" -m pip install --no-index --no-deps \
    "$dir"/dist/*.whl || return 1
  ls -l "$dir/dist"
  cd "$dir/run" || return 1
  "$dir/venv/bin/python" -P -c "import jaxdnn, sys; from jaxdnn import _extension as e
src = e.extension_source()
print('jaxdnn', jaxdnn.__version__, 'from', jaxdnn.__file__)
print('plugin', src['plugin'], 'from', src['path'], '| skipped:', src['skipped'])
print('cuDNN path:', jaxdnn.unavailable_reason() or 'yes')
sys.exit(src['plugin'] != 'jaxdnn_cuda${major}_plugin' or not jaxdnn.__file__.startswith('$dir/venv'))" &&
    "$dir/venv/bin/python" -P -m jaxdnn info &&
    "$dir/venv/bin/python" -P -m pytest -m "gpu and not slow" -v -rs -p no:cacheprovider \
      --rootdir "$here" $(for t in ${WHEEL_TESTS:-tests/test_softmax.py tests/test_pooling.py}; do echo "$here/$t"; done)
  local rc=$?
  cd "$here" && return $rc
}

# Convolution algorithms timed once per configuration, in every pass: the benchmarks' flags.
TIME_ONCE="dnn.conv.algo_fwd=time_once,dnn.conv.algo_bwd=time_once"

# Installs the jaxdnn source tree $1 (editable; its build folder is kept, so a reinstall
# only relinks), logging to $2, and fails where its cuDNN path cannot run: its benchmarks
# would time the XLA path, on the small cases. A tree older than be152ab does not link
# NVRTC, which the frontend's headers from 1.19 on call, so its extension does not import
# until its CMakeLists.txt links CUDA::nvrtc.
install_tree() {
  (cd "$1" && "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
    -Ccmake.define.JAXDNN_REQUIRE_CUDA=ON >"$2" 2>&1 &&
    "$PYTHON" -c "import sys, jaxdnn
reason = jaxdnn.unavailable_reason()
print('$1: cuDNN path', reason or 'yes')
sys.exit(reason is not None)")
}

# The baseline's extension is replaced by this tree's when the build stage runs next.
baseline() {
  local dir=$LOG_DIR/baseline
  mkdir -p "$dir" && install_tree "$BASELINE_DIR" "$dir/build.log" &&
    (cd "$BASELINE_DIR" && JAXDNN_FLAGS=$TIME_ONCE \
      "$PYTHON" benchmarks/in_program.py "$dir" ${INPROGRAM_OPS:+--ops $INPROGRAM_OPS}) &&
    "$PYTHON" benchmarks/per_call.py "$dir"
}
run_stage baseline baseline
# "abtest" (not a default stage): BASELINE_DIR's build and this tree's, each installed in
# turn, timed by in_program.py (INPROGRAM_OPS; default conv and pool) AB_ROUNDS times
# (default 2) in alternation, before, after, before, after, so that a drift of the card
# falls on both; benchmarks/compare_in_program.py reduces the runs to LOG_DIR/abtest.md
# and abtest.json. Leaves this tree installed.
abtest() {
  local runs here=$PWD round side tree rc=0
  runs=$(mktemp -d) || return 1
  for ((round = 1; round <= ${AB_ROUNDS:-2}; round++)); do
    for side in before after; do
      tree=$here
      [ $side = before ] && tree=$BASELINE_DIR
      (install_tree "$tree" "$runs/install.log" && cd "$tree" && JAXDNN_FLAGS=$TIME_ONCE \
        "$PYTHON" benchmarks/in_program.py "$runs/$side.$round" \
          ${INPROGRAM_OPS:+--ops $INPROGRAM_OPS} >"$runs/run.log" 2>&1) ||
        { echo "abtest: the $side build, round $round, failed"; tail -n 20 "$runs/install.log" \
          "$runs/run.log"; rc=1; break 2; }
      echo "abtest: $side, round $round: $(tail -n 1 "$runs/run.log")"
    done
  done
  [ $rc -eq 0 ] && "$PYTHON" benchmarks/compare_in_program.py --before "$runs"/before.* \
    --after "$runs"/after.* --out "$LOG_DIR/abtest.md" --json "$LOG_DIR/abtest.json" || rc=1
  rm -rf "$runs"
  return $rc
}
run_stage abtest abtest
run_stage build build
run_stage wheel wheel
run_stage info "$PYTHON" -m jaxdnn info
# (The slow GPU tests, the arrays past 2**31 elements, run in the reliability stage.)
# TEST_JOBS (default 1) > 1 splits the test files over that many pytest processes at once
# (the largest files first, each to the job with the fewest lines so far), each allocating
# device memory as it goes. Each job logs to NAME.jobK.log while it runs; at the end the
# stage's log takes their whole text and the job files go (a call's results come back as
# few files). A job whose files hold no GPU test (pytest's exit 5, nothing collected)
# counts as passed, as long as some job ran tests.
gpu_tests() {  # name, pytest options...
  local name=$1; shift
  local jobs=${TEST_JOBS:-1}
  if [ "$jobs" -le 1 ]; then
    "$PYTHON" -m pytest -m "gpu and not slow" -rs -p no:cacheprovider "$@" "${TESTS[@]}"
    return
  fi
  local groups=() sizes=() file k best pids=() rc=0
  for ((k = 0; k < jobs; k++)); do groups[k]="" sizes[k]=0; done
  while read -r _ file; do
    best=0
    for ((k = 1; k < jobs; k++)); do ((sizes[k] < sizes[best])) && best=$k; done
    groups[best]+=" $file" sizes[best]=$((sizes[best] + $(wc -l <"$file")))
  done < <(find "${TESTS[@]}" -name 'test_*.py' -exec wc -l {} + | grep -v ' total$' | sort -rn)
  for ((k = 0; k < jobs; k++)); do
    [ -n "${groups[k]}" ] || continue
    # shellcheck disable=SC2086 # the group's files word-split
    XLA_PYTHON_CLIENT_PREALLOCATE=false "$PYTHON" -m pytest -m "gpu and not slow" -rs \
      -p no:cacheprovider "$@" ${groups[k]} >"$LOG_DIR/$name.job$k.log" 2>&1 &
    pids+=($!)
  done
  local job_rc ran=0
  for pid in "${pids[@]}"; do
    wait "$pid"
    job_rc=$?
    [ $job_rc -eq 0 ] && ran=1
    [ $job_rc -eq 0 ] || [ $job_rc -eq 5 ] || rc=1
  done
  local job_log summary=""
  for ((k = 0; k < jobs; k++)); do
    job_log=$LOG_DIR/$name.job$k.log
    [ -f "$job_log" ] || continue
    echo "=== job $k:${groups[k]}"
    cat "$job_log"
    summary+="job $k: $(grep -E "^(FAILED|ERROR) |^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)" "$job_log")"$'\n'
    rm -f "$job_log"
  done
  # Each job's failures and counts, last, where the stage's summary shows them.
  printf '%s' "$summary"
  # A stage in which no job ran a test (no GPU test among TESTS, or none selected) fails.
  [ $ran -eq 1 ] || { echo "no job ran a GPU test"; rc=1; }
  return $rc
}
run_stage tests gpu_tests tests -v
# The same GPU tests with XLA running the custom calls inside CUDA graphs.
graph_tests() {
  XLA_FLAGS="--xla_gpu_enable_command_buffer=CUSTOM_CALL --xla_gpu_graph_min_graph_size=1" \
    gpu_tests graphs -q
}
run_stage graphs graph_tests
# Differential fuzzing on cuDNN (tests/test_fuzz.py): FUZZ_CASES random configurations of
# each op family, each against the float64 oracles and the XLA path.
run_stage fuzz env JAXDNN_FUZZ_CASES="${FUZZ_CASES:-200}" \
  "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_fuzz.py
# The sharding tests on 8 forced host devices (CPU), beside the GPU: the partitioned
# programs and sharded numbers, on the machine's own jax.
run_stage sharding env XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_sharding.py
# Reliability figures (RELIABILITY.md): benchmarks/soak.py (mixed training steps from
# several threads, flags flipping, injected failures, memory tracked), tests/test_huge.py
# (arrays past 2**31 elements) and benchmarks/fuzz_run.py (cuDNN vs XLA vs float64 on
# thousands of random configurations), each capped in time, then the report.
# RELIABILITY_PARTS (default "soak huge fuzz") picks the parts: on an H100 the fuzz run
# checks about 25-35 configurations a second, so 10,000 take a device call of their own
# (RELIABILITY_PARTS=fuzz FUZZ_RUN_SECONDS=420); the report reads whatever parts LOG_DIR holds.
reliability() {
  local rc=0 soak_seconds=${SOAK_SECONDS:-45} parts=" ${RELIABILITY_PARTS:-soak huge fuzz} "
  # the warm-up (compilations, one round of injections) comes before the soak's clock
  if [[ $parts == *" soak "* ]]; then
    timeout $((soak_seconds + 300)) "$PYTHON" benchmarks/soak.py "$LOG_DIR" \
      --seconds "$soak_seconds" --threads "${SOAK_THREADS:-8}" ${SOAK_ARGS:-} || rc=1
  fi
  # most of the card for the arrays (4-8 GiB each, XLA's temporaries beside them)
  if [[ $parts == *" huge "* ]]; then
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 JAXDNN_HUGE_JSON="$LOG_DIR/huge.json" \
      timeout "${HUGE_TIMEOUT:-300}" \
      "$PYTHON" -m pytest -m gpu -v -rs -p no:cacheprovider --junitxml "$LOG_DIR/huge.xml" \
      tests/test_huge.py || rc=1
  fi
  if [[ $parts == *" fuzz "* ]]; then
    "$PYTHON" benchmarks/fuzz_run.py "$LOG_DIR" --configs "${FUZZ_RUN_CONFIGS:-12000}" \
      --seconds "${FUZZ_RUN_SECONDS:-180}" --group "${FUZZ_RUN_GROUP:-8}" \
      --xla-every "${FUZZ_RUN_XLA_EVERY:-1}" \
      ${FUZZ_RUN_WORKERS:+--workers $FUZZ_RUN_WORKERS} || rc=1
  fi
  cp RELIABILITY.md "$LOG_DIR/RELIABILITY.md"
  "$PYTHON" scripts/reliability_report.py "$LOG_DIR" --markdown "$LOG_DIR/RELIABILITY.md"
  return $rc
}
run_stage reliability reliability
# Soaks at once, each a process of its own that allocates device memory as it goes, its
# output (a crash's PYTHONFAULTHANDLER stacks too) in LOG_DIR/NAME.out.
# start_soak NAME SECONDS [VAR=VALUE...] -- [soak.py options...] starts one (under
# SOAK_WRAP, a command prefix, when set); wait_soaks waits for all and prints each one's
# exit status (139: a segmentation fault) and summary line; it fails if any failed.
SOAK_PIDS=() SOAK_NAMES=() SOAK_WRAP=()
start_soak() {
  local name=$1 seconds=$2 vars=()
  shift 2
  while [ $# -gt 0 ] && [ "$1" != -- ]; do vars+=("$1"); shift; done
  shift
  env "${vars[@]}" PYTHONFAULTHANDLER=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout $((seconds + 400)) "${SOAK_WRAP[@]}" "$SOAK_PYTHON" benchmarks/soak.py \
    "$LOG_DIR/$name" --seconds "$seconds" "$@" >"$LOG_DIR/$name.out" 2>&1 &
  SOAK_PIDS+=($!) SOAK_NAMES+=("$name")
}
wait_soaks() {
  local k status rc=0
  for k in "${!SOAK_PIDS[@]}"; do
    wait "${SOAK_PIDS[k]}"
    status=$?
    [ $status -eq 0 ] || rc=1
    echo "${SOAK_NAMES[k]}: exit $status; $(grep -m1 -E "^soak \(|SIGSEGV|Fatal Python error" \
      "$LOG_DIR/${SOAK_NAMES[k]}.out")"
  done
  SOAK_PIDS=() SOAK_NAMES=()
  return $rc
}
# The interpreter itself (gdb cannot run a launcher script such as a pyenv shim).
SOAK_PYTHON=$("$PYTHON" -c "import sys; print(sys.executable)" 2>/dev/null || echo "$PYTHON")

# Not a default stage: three soaks with SOAK_THREADS (8) threads that tell apart what the
# 8-thread crash of RELIABILITY.md comes from: each model alone long enough for every
# injection to run beside the workers, and both models with no injections, all at once.
soakbisect() {
  local threads=${SOAK_THREADS:-8} seconds=${SOAK_SECONDS:-45} models
  for models in cnn lstm; do
    start_soak "soak_$models" "$seconds" -- --threads "$threads" --models $models \
      --inject-every 2
  done
  start_soak soak_no_inject "$seconds" -- --threads "$threads" --no-inject
  wait_soaks
}
run_stage soakbisect soakbisect
# Not a default stage: the crash of both models at once (RELIABILITY.md), made likely and
# told apart. Per variant of SOAKCRASH_VARIANTS ("default default_gdb cuda_graph_off
# command_buffers_off": as is; as is under a debugger; jaxdnn's own RNN graphs off; XLA's
# command buffers off), SOAKCRASH_RUNS (1) soaks of both models for
# SOAKCRASH_SECONDS (140) with the soak options SOAKCRASH_SOAK_ARGS (default --no-inject),
# all at once. A *_gdb variant runs under gdb, or cuda-gdb where the machine has no gdb (it
# debugs host code too), which prints a native backtrace of every thread at the fault in
# soakcrash_VARIANT_K.out; the others leave there PYTHONFAULTHANDLER's Python stacks and the
# faulting thread's native stack (scripts/native_backtrace.c, preloaded where a C compiler
# is).
soakcrash() {
  local variant k vars debugger preload=()
  debugger=$(command -v gdb || command -v cuda-gdb || true)
  cc -shared -fPIC -O1 -o "$LOG_DIR/native_backtrace.so" scripts/native_backtrace.c &&
    preload=(LD_PRELOAD="$LOG_DIR/native_backtrace.so")
  for variant in ${SOAKCRASH_VARIANTS:-default default_gdb cuda_graph_off command_buffers_off}; do
    case $variant in
      cuda_graph_off) vars=(JAXDNN_FLAGS=dnn.rnn.cuda_graph=False) ;;
      command_buffers_off) vars=(XLA_FLAGS=--xla_gpu_enable_command_buffer=) ;;
      *) vars=() ;;
    esac
    SOAK_WRAP=()
    if [[ $variant == *_gdb && -n $debugger ]]; then
      SOAK_WRAP=("$debugger" -q -batch -ex "handle SIGPIPE SIGUSR1 SIGUSR2 nostop noprint pass"
        -ex run -ex "thread apply all bt 40" --args)
    else
      vars+=("${preload[@]}")
    fi
    for ((k = 0; k < ${SOAKCRASH_RUNS:-1}; k++)); do
      start_soak "soakcrash_${variant}_$k" "${SOAKCRASH_SECONDS:-140}" "${vars[@]}" -- \
        --threads 8 ${SOAKCRASH_SOAK_ARGS:---no-inject}
    done
  done
  SOAK_WRAP=()
  wait_soaks
}
run_stage soakcrash soakcrash
run_stage alltests "$PYTHON" -m pytest -m "not gpu" -q -rs -p no:cacheprovider "${TESTS[@]}"
run_stage bench "$PYTHON" benchmarks/run.py "$LOG_DIR" ${BENCH_OPS:+--ops $BENCH_OPS}
# Recurrent networks beside jax.experimental.rnn, Flax and PyTorch; Flax training steps.
run_stage rnnbench "$PYTHON" benchmarks/rnn_peers.py "$LOG_DIR" ${RNN_PEERS_ARGS:-}
# Not a default stage: the same at a wider (H1024) and a longer (T512) network.
rnnlarge() {
  "$PYTHON" benchmarks/rnn_peers.py "$LOG_DIR" --repeats 3 --shape 128 64 1024 1024 \
    --name rnn_peers_h1024 &&
    "$PYTHON" benchmarks/rnn_peers.py "$LOG_DIR" --repeats 3 --shape 512 64 512 512 \
      --name rnn_peers_t512
}
run_stage rnnlarge rnnlarge
run_stage flaxbench "$PYTHON" benchmarks/flax_training.py "$LOG_DIR"
# Convolutions and pooling timed inside one program (no per-call dispatch), beside XLA and
# PyTorch; convolutions with time_once on all three passes.
run_stage inprogram env JAXDNN_FLAGS="$TIME_ONCE" \
  "$PYTHON" benchmarks/in_program.py "$LOG_DIR" ${INPROGRAM_OPS:+--ops $INPROGRAM_OPS}
# Not a default stage: the convolutions ROUTES_ARGS picks (in_program.py's options; default
# the float32 NCHW stem, whose backward passes 'auto' runs in the image's layout) inside one
# program, on 'auto' (its "other route" column: the image's layout in every pass) and with
# dnn.conv.layout_route=channels_last (the route in every pass), into LOG_DIR/routes_*.
routes() {
  local route rc=0
  for route in auto channels_last; do
    JAXDNN_FLAGS="$TIME_ONCE,dnn.conv.layout_route=$route" \
      "$PYTHON" benchmarks/in_program.py "$LOG_DIR/routes_$route" \
      ${ROUTES_ARGS:---ops conv --match stem --dtype float32 --layout NCHW} || rc=1
  done
  return $rc
}
run_stage routes routes
# Softmax and batch norm inside the programs models compile (not a default stage).
run_stage inmodel "$PYTHON" benchmarks/in_model.py "$LOG_DIR" ${INMODEL_ARGS:-}
# Not a default stage (73 of its 98 cases took 400 s on an H100): `jaxdnn bench --peers`,
# each case per call and in one program beside XLA and PyTorch, as a user reruns it
# (PEERS_ARGS: its options, e.g. ops or --compare FILE); the rows go to peers.md and
# peers.json, also those timed before a SIGTERM.
run_stage peers "$PYTHON" -m jaxdnn bench --peers --out "$LOG_DIR/peers.md" \
  --save "$LOG_DIR/peers.json" ${PEERS_ARGS:-}
# Host time per call: the smallest case of each op, jitted single calls beside XLA's.
run_stage percall "$PYTHON" benchmarks/per_call.py "$LOG_DIR"
# Not in the default stages, a diagnosis: every kernel of jaxdnn, XLA and PyTorch per
# application of the cases KERNEL_TIMES_ARGS picks (benchmarks/kernel_times.py options).
run_stage kerneltimes env JAXDNN_FLAGS="$TIME_ONCE" \
  "$PYTHON" benchmarks/kernel_times.py "$LOG_DIR" ${KERNEL_TIMES_ARGS:-}
# The worked examples, in full, on the GPU.
run_stage scaling "$PYTHON" benchmarks/scaling.py --json "$LOG_DIR/scaling.json"
examples() {
  time "$PYTHON" examples/stn_digits.py && time "$PYTHON" examples/sequence_model.py &&
    time "$PYTHON" examples/data_parallel.py
}
run_stage examples examples
exit $status
