#!/usr/bin/env bash
# One prepared check of everything in this project that has never run on a CUDA GPU, for a lent
# GPU machine (one H100 or H200, 16 CPU cores, no network), in under 8 minutes:
#   1. the CUDA tests (tests/ files marked `gpu` or skipped without CUDA), with pytest;
#   2. a tiny study (studies/gpu-check.yaml: two trials, `trials_per_device: 2`) and evidence
#      that both trials trained at once on the one GPU;
#   3. DiT-B throughput and MFU in bf16 (bench/train_throughput.py) without and with the
#      trainer's torch.compile (and with only the backbone compiled, if that one recompiles);
#   4. a REPA run and a distillation run (its teacher: a finished study trial) on CUDA;
#   5. figures to $OUT/gpu_check.json and $OUT/gpu_check.md (+ logs in gpu_check_logs.tar.gz).
# Every step runs under `timeout`; a failed or timed-out step is recorded with its log's tail and
# the others go on. The script exits 0 when every step passed, 1 otherwise.
#
# On the device machine (the `run` tool; `.whl/` from `bash bench/gpu_wheels.sh` here first):
#   command:   set -o pipefail; bash bench/gpu_check.sh 2>&1 | tee "$OUT/gpu_check_console.log"
#   carry:     [".whl"]
#   timeout_s: 540        (the script holds itself to GPU_CHECK_BUDGET_S=450 s)
# It installs .whl/*.whl with pip into /tmp/site (PYTHONPATH, plus a .pth file so that
# subprocesses that reset PYTHONPATH, like the tests' trainers, see them too).
#
# Here, without a GPU, the same steps at toy sizes on the CPU through `uv run` (no wheels):
#   bash bench/gpu_check.sh --smoke        # or GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh
#
# Environment: OUT (default ./gpu_check_out), GPU_CHECK_BUDGET_S (default 450; smoke 420),
# GPU_CHECK_WORK (default a new /tmp/gpu_check.XXXXXX; kept), GPU_CHECK_ONLY (comma list of
# tests,study,distill,repa,throughput: run only those groups, e.g. to rerun a failed one),
# GPU_CHECK_DISTILL_METHOD (default consistency), GPU_CHECK_BOX_PCT (scales each step's time
# box; default 100), GPU_CHECK_COMPILE_DENOISER (auto: time the backbone compiled alone only if
# the trainer's compile hit its recompile limit; 1: always; 0: never).
set -uo pipefail # no -e: a failing step is recorded and the next one runs

if [[ -z ${EPOCHREALTIME:-} ]]; then
    echo "bench/gpu_check.sh needs bash >= 5 (EPOCHREALTIME)" >&2
    exit 2
fi
SMOKE=0
[[ "${GPU_CHECK_DEVICE:-}" == cpu ]] && SMOKE=1
for arg in "$@"; do
    case $arg in
    --smoke) SMOKE=1 ;;
    -h | --help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        exit 0
        ;;
    *)
        echo "unknown argument: $arg (use --smoke or --help)" >&2
        exit 2
        ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK/logs" "$WORK/configs" && WORK=$(cd "$WORK" && pwd)
: >"$WORK/steps.tsv"
ONLY=${GPU_CHECK_ONLY:-tests,study,distill,repa,throughput}
METHOD=${GPU_CHECK_DISTILL_METHOD:-consistency}
BOX_PCT=${GPU_CHECK_BOX_PCT:-100} # scales every time box (a small value tests the timeouts)
COMPILE_DENOISER=${GPU_CHECK_COMPILE_DENOISER:-auto}
if ((SMOKE)); then
    MODE=smoke
    BUDGET=${GPU_CHECK_BUDGET_S:-420}
    PHASE2_S=270 # the parallel phase: tests, study -> distill, REPA
    PY=(uv run --quiet python)
else
    MODE=gpu
    BUDGET=${GPU_CHECK_BUDGET_S:-450}
    PHASE2_S=240
    PY=(python3)
fi
HELPER=("${PY[@]}" bench/gpu_check.py)
RESERVE=25 # kept back for the report
T0=${EPOCHREALTIME//[!0-9]/}
T0_S=${T0:0:-6}
DEADLINE=$((T0_S + BUDGET))
STEP_DEADLINE=$DEADLINE
export HARNESS_CACHE=$WORK/cache PYTHONUNBUFFERED=1 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

now_s() { local t=${EPOCHREALTIME//[!0-9]/}; echo "${t:0:-6}"; }
elapsed() { # seconds since the start, one decimal
    local t=${EPOCHREALTIME//[!0-9]/} d
    d=$(((t - T0) / 100000))
    echo "$((d / 10)).$((d % 10))"
}
log() { printf '[gpu_check +%6ss] %s\n' "$(elapsed)" "$*"; }
wants() { [[ ",$ONLY," == *",$1,"* ]]; }
record() { # name status rc elapsed timeout
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(elapsed)" >>"$WORK/steps.tsv"
}
reap() { "${HELPER[@]}" reap --pattern "$1" >>"$WORK/logs/reap.log" 2>&1; }

# run_step NAME BOX_S TAG CMD...: CMD under `timeout`, at most BOX_S seconds and never past
# the phase's deadline; output to $WORK/logs/NAME.log; one line in $WORK/steps.tsv. TAG: a path
# that every process of the step names on its command line (to end the leftovers of a timeout).
run_step() {
    local name=$1 box=$(($2 * BOX_PCT / 100)) tag=$3 left limit rc t1 t2 d status
    shift 3
    left=$((STEP_DEADLINE - $(now_s)))
    limit=$((box < left ? box : left))
    if ((limit < 10)); then
        skip "$name" "${left}s left before the deadline"
        return 3
    fi
    log "$name: start (time box ${limit}s)"
    t1=${EPOCHREALTIME//[!0-9]/}
    timeout --kill-after=10 "$limit" "$@" </dev/null >"$WORK/logs/$name.log" 2>&1
    rc=$?
    t2=${EPOCHREALTIME//[!0-9]/}
    d=$(((t2 - t1) / 100000))
    case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
    esac
    # Trainers run in their own sessions, beyond timeout's reach: end what this step left.
    [[ $status != ok ]] && reap "$tag"
    record "$name" "$status" "$rc" "$((d / 10)).$((d % 10))" "$limit"
    log "$name: $status (rc $rc) in $((d / 10)).$((d % 10))s"
    [[ $status != ok ]] && tail -n 5 "$WORK/logs/$name.log" | sed "s/^/    $name| /"
    return "$rc"
}

skip() { # name reason
    log "$1: skipped ($2)"
    echo "skipped: $2" >"$WORK/logs/$1.log"
    record "$1" skipped -1 0 0
}

log "mode $MODE, budget ${BUDGET}s, work $WORK, out $OUT"

# -- 0. set-up: wheels, configs, what the machine has -----------------------------------------
if ((!SMOKE)) && compgen -G ".whl/*.whl" >/dev/null; then
    run_step install 90 /tmp/site python3 -m pip install -q --no-index --no-deps --no-cache-dir \
        --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    site_dir=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
    pth="import sys; '/tmp/site' in sys.path or sys.path.insert(0, '/tmp/site')"
    if [[ -n $site_dir ]] && echo "$pth" >"$site_dir/zz_gpu_check_site.pth" 2>/dev/null; then
        log "install: /tmp/site also on sys.path of every python3 ($site_dir/zz_gpu_check_site.pth)"
    else
        log "install: could not write a .pth into site-packages; only PYTHONPATH has /tmp/site"
    fi
elif ((!SMOKE)); then
    skip install "no .whl/ folder: run bench/gpu_wheels.sh here and carry .whl"
fi
((SMOKE)) && env_args=() || env_args=(--require-cuda)
run_step env 60 "$WORK/env.json" "${HELPER[@]}" env --out "$WORK/env.json" "${env_args[@]}"
"${HELPER[@]}" configs --mode "$MODE" --dir "$WORK/configs" >>"$WORK/logs/configs.log" 2>&1
mapfile -t CUDA_TESTS < <(grep -rlE --include='test_*.py' \
    'mark\.gpu|cuda\.is_available\(\)|device_count\(\)' tests | sort)
tests_json=$(printf '"%s",' "${CUDA_TESTS[@]}")
printf '{"mode": "%s", "started": "%s", "t0": %s, "budget_s": %s, "cuda_tests": [%s]}\n' \
    "$MODE" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$T0_S" "$BUDGET" "${tests_json%,}" >"$WORK/meta.json"
if ((SMOKE)); then
    STUDY=$WORK/configs/gpu-check-smoke.yaml
    export OMP_NUM_THREADS=1 # a 2-core machine, several trainers at once
else
    STUDY=studies/gpu-check.yaml
    export OMP_NUM_THREADS=4 # 16 cores shared by up to ~6 processes in the parallel phase
fi

# -- 1. the parallel phase: tests | study -> distillation | REPA; cached CPU networks warmed ---
STEP_DEADLINE=$(($(now_s) + PHASE2_S))
((STEP_DEADLINE > DEADLINE - RESERVE)) && STEP_DEADLINE=$((DEADLINE - RESERVE))

tests_group() {
    if ((${#CUDA_TESTS[@]} == 0)); then
        skip tests "no test file mentions mark.gpu or cuda.is_available()"
        return
    fi
    # Two workers, one test each (--dist load); a per-test limit keeps the junit report.
    run_step tests 220 "$WORK/pytest" "${PY[@]}" -m pytest -n 2 --dist load --timeout 190 -rA \
        --junitxml "$WORK/junit.xml" --basetemp "$WORK/pytest" "${CUDA_TESTS[@]}"
}

# The cached CPU networks (the evaluator's attribute net, REPA's encoder) are trained first, each
# in its own chain, so that the trainers after them do not wait on the cache's lock inside their
# own time boxes.
study_group() {
    local smi_pid=""
    run_step warm_attribute_net 150 "$WORK/warm/attr" "${HELPER[@]}" warm-cache \
        attribute-net --work "$WORK/warm/attr"
    if wants study; then
        if command -v nvidia-smi >/dev/null; then
            while :; do
                printf '%s %s\n' "$(now_s)" "$(nvidia-smi --query-compute-apps=pid \
                    --format=csv,noheader 2>/dev/null | grep -c .)"
                sleep 1
            done >"$WORK/smi.log" 2>/dev/null &
            smi_pid=$!
        fi
        run_step study 150 "$WORK/study" "${PY[@]}" -m harness.cli study run "$STUDY" \
            --workdir "$WORK/study"
        [[ -n $smi_pid ]] && kill "$smi_pid" 2>/dev/null
    fi
    wants distill || return 0
    local teacher="" d
    for d in "$WORK"/study/runs/gpu-check/*/s0; do
        if grep -qs '"status": "ok"' "$d/status.json" && [[ -d $d/final ]]; then
            teacher=$d
            echo "study trial run $d" >"$WORK/teacher_source.txt"
            break
        fi
    done
    if [[ -z $teacher ]]; then # no finished study trial: train a teacher of the same kind
        echo "standalone teacher run (no finished study trial)" >"$WORK/teacher_source.txt"
        run_step teacher 90 "$WORK/teacher" "${PY[@]}" -m trainers.flow \
            --config "$WORK/configs/teacher.json" --run-dir "$WORK/teacher" && teacher=$WORK/teacher
    fi
    if [[ -z $teacher ]]; then
        skip distill "no teacher run"
        return
    fi
    "${HELPER[@]}" distill-config --mode "$MODE" --teacher "$teacher" \
        --method "$METHOD" --out "$WORK/configs/distill.json" >>"$WORK/logs/configs.log" 2>&1
    run_step distill 120 "$WORK/distill" "${PY[@]}" -m trainers.distill \
        --config "$WORK/configs/distill.json" --run-dir "$WORK/distill"
}

repa_group() {
    run_step warm_repa_encoder 150 "$WORK/warm/enc" "${HELPER[@]}" warm-cache \
        repa-encoder --work "$WORK/warm/enc"
    run_step repa 120 "$WORK/repa" "${PY[@]}" -m trainers.flow \
        --config "$WORK/configs/repa.json" --run-dir "$WORK/repa"
}

pids=()
if wants tests; then
    tests_group &
    pids+=($!)
fi
if wants study || wants distill; then
    study_group &
    pids+=($!)
fi
if wants repa; then
    repa_group &
    pids+=($!)
fi
((${#pids[@]})) && wait "${pids[@]}"
reap "$WORK" # nothing of this phase may run on into the timings

# -- 2. throughput, alone on the device: eager, then with the trainer's torch.compile ---------
unset OMP_NUM_THREADS
STEP_DEADLINE=$((DEADLINE - RESERVE))
if wants throughput; then
    if ((SMOKE)); then
        TP=(--preset micro --resolution 16 --batch-size 8 --steps 3 --warmup 2 --device cpu
            --precision fp32 --threads 1)
        CB=(--compile-backend eager) # dynamo without inductor's code generation: quick
    else
        # bench/BENCHMARKS.md's command: DiT-B in pixel space at 256 px, patch 8 (1024 tokens).
        TP=(--preset dit-b --resolution 256 --patch-size 8 --batch-size 64 --steps 30 --warmup 5
            --device cuda --precision bf16)
        CB=()
    fi
    run_step tp_eager 90 "$WORK/tp_eager" "${HELPER[@]}" throughput \
        --out "$WORK/tp_eager.json" --label eager -- "${TP[@]}"
    # The trainer's own torch.compile (train.compile). A recompile limit of 2 bounds the time
    # lost if dynamo's guards fail at every step (they did while the whole FlowNet was compiled:
    # its forward tokenizes the captions, Python strings that dynamo guards on); guard failures
    # are counted and the first one's cause kept.
    run_step tp_compile 170 "$WORK/tp_compile." "${HELPER[@]}" throughput \
        --out "$WORK/tp_compile.json" --label compile --compile-target trainer --recompile-limit 2 \
        "${CB[@]}" -- "${TP[@]}" --compile
    # Only the backbone compiled (nn.Module.compile in place), when the trainer's compile hit
    # its recompile limit (GPU_CHECK_COMPILE_DENOISER=1: always; 0: never).
    if [[ $COMPILE_DENOISER == 1 ]] || { [[ $COMPILE_DENOISER == auto ]] &&
        grep -qs '"recompile_limit_reached": true' "$WORK/tp_compile.json"; }; then
        run_step tp_compile_denoiser 150 "$WORK/tp_compile_denoiser" "${HELPER[@]}" throughput \
            --out "$WORK/tp_compile_denoiser.json" --label compile_denoiser \
            --compile-target denoiser "${CB[@]}" -- "${TP[@]}" --compile
    else
        log "tp_compile_denoiser: not run (the trainer's compile kept its compiled code)"
    fi
fi

# -- 3. the report ------------------------------------------------------------------------------
log "report"
"${HELPER[@]}" report --work "$WORK" --out "$OUT" >"$WORK/logs/report.log" 2>&1 ||
    log "report: FAILED (see $WORK/logs/report.log)"
tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" \
    --exclude='checkpoints' --exclude='final' --exclude='samples' --exclude='evals' \
    --exclude='cache' --exclude='*.pt' --exclude='*.duckdb*' --exclude='optuna.db*' \
    --exclude='*.html' --exclude='pytest' . 2>/dev/null
cat "$OUT/gpu_check.md" 2>/dev/null || tail -n 30 "$WORK/logs/report.log"
not_ok=$(awk -F'\t' '$2 != "ok"' "$WORK/steps.tsv" | cut -f1 | paste -sd, -)
log "done: $(awk -F'\t' '$2 == "ok"' "$WORK/steps.tsv" | wc -l) steps ok, not ok: ${not_ok:-none}"
log "report: $OUT/gpu_check.json, $OUT/gpu_check.md; work kept in $WORK"
[[ -z $not_ok ]]
