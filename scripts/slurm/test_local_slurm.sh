#!/usr/bin/env bash
# The Slurm launch tested for real: a one-node Slurm cluster on this machine runs
# scripts/slurm/pretrain_40b.sbatch with tiny sizes on CPU processes (gloo).
#
#   sudo bash scripts/slurm/test_local_slurm.sh        # .ci/run calls it; a few minutes on 2 cores
#
# 1. installs Debian's slurmctld, slurmd and slurm-client when missing (munge comes with them; the
#    test cluster uses auth/none, so munged is not started),
# 2. writes a one-node slurm.conf under a temporary directory and starts slurmctld and slurmd in the
#    foreground as our own child processes (no systemd), on free ports,
# 3. submits, each through `sbatch --wait` (which returns the job's exit code):
#      a job without DATA_PATH: it must fail with exit code 2 and one "error: DATA_PATH ..." line;
#      a job whose world (3 ranks) TP 2 cannot divide: the same, from the preflight dry run;
#      the 40B script at tiny sizes (TP 2 x EP 2 on 4 CPU ranks, the recipe's fp16, capacity factor,
#      top-1, aux loss, recompute and distributed-optimizer flags): it must exit 0, log every
#      iteration with a falling loss and leave a checkpoint (16 iterations);
#      the same job resubmitted with TRAIN_ITERS=20: it must resume from that checkpoint,
# 4. always stops the daemons it started (by their pids) and removes its directory (KEEP_WORK=1 keeps it).
# Any failure — apt, a daemon, a job — ends the script non-zero with a "SLURM TEST FAILED" line and
# the tails of the daemon and job logs. Nothing is skipped silently.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
JOB_TIMEOUT=${JOB_TIMEOUT:-600}          # seconds per sbatch --wait

fail() { echo "SLURM TEST FAILED: $*" >&2; exit 1; }
step() { echo "== slurm test: $*"; }

if [ "$(id -u)" != 0 ]; then  # root installs the packages and runs the daemons; sudo when it asks no password
  command -v sudo >/dev/null && sudo -n true 2>/dev/null \
    || fail "must run as root (it installs packages and starts slurmctld/slurmd), and sudo -n is not available"
  exec sudo -n env PATH="$PATH" PYTHON="$(command -v "$PYTHON")" JOB_TIMEOUT="$JOB_TIMEOUT" bash "$0" "$@"
fi

# ---- 1. install ---------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  step "installing slurmctld slurmd slurm-client"
  export DEBIAN_FRONTEND=noninteractive
  APT_LOG=$(mktemp)
  timeout 300 apt-get update -q >"$APT_LOG" 2>&1 \
    || { tail -20 "$APT_LOG" >&2; fail "apt-get update failed (log above)"; }
  timeout 600 apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client >>"$APT_LOG" 2>&1 \
    || { tail -20 "$APT_LOG" >&2; fail "apt-get install slurmctld slurmd slurm-client failed (log above)"; }
  rm -f "$APT_LOG"
  for tool in slurmctld slurmd sbatch sinfo scontrol scancel; do
    command -v "$tool" >/dev/null || fail "$tool is missing after installing the slurm packages"
  done
fi
step "$(slurmctld -V)"

# ---- 2. configure and start ---------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/slurm-test.XXXXXX")
HOST=$(hostname -s)
CPUS=$(nproc)
read -r CTLD_PORT SLURMD_PORT < <("$PYTHON" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
mkdir -p "$WORK/state" "$WORK/spool" "$WORK/ckpt"
export SLURM_CONF=$WORK/slurm.conf
cat > "$SLURM_CONF" <<EOF
ClusterName=citest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
EnforcePartLimits=ALL
ReturnToService=2
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

CTLD_PID=""; SLURMD_PID=""; SUBMIT_PID=""; JOB_OUT=""
stop() {  # stop one daemon we started: TERM, up to 10 s, then KILL
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" != 0 ]; then
    for f in "$WORK/slurmctld.log" "$WORK/slurmd.log" ${JOB_OUT:+"$JOB_OUT"}; do
      [ -f "$f" ] && { echo "---- tail of $f" >&2; tail -25 "$f" >&2; }
    done
  fi
  [ -n "$SUBMIT_PID" ] && kill -TERM "$SUBMIT_PID" 2>/dev/null
  if [ -n "$CTLD_PID" ] && kill -0 "$CTLD_PID" 2>/dev/null; then
    timeout 10 scancel --full --quiet --partition ci 2>/dev/null || true   # jobs of this test cluster only
  fi
  stop "$SLURMD_PID"
  stop "$CTLD_PID"
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "starting slurmctld and slurmd (host $HOST, $CPUS CPUs, ports $CTLD_PORT/$SLURMD_PORT, $WORK)"
slurmctld -D -c -i -f "$SLURM_CONF" >"$WORK/slurmctld.out" 2>&1 &
CTLD_PID=$!
slurmd -D -f "$SLURM_CONF" >"$WORK/slurmd.out" 2>&1 &
SLURMD_PID=$!
for i in $(seq 60); do
  kill -0 "$CTLD_PID" 2>/dev/null || { cat "$WORK/slurmctld.out" >&2; fail "slurmctld exited"; }
  kill -0 "$SLURMD_PID" 2>/dev/null || { cat "$WORK/slurmd.out" >&2; fail "slurmd exited"; }
  state=$(timeout 5 sinfo -h -N -o %t 2>/dev/null || true)
  [ "$state" = idle ] && break
  [ "$i" = 60 ] && fail "the node is not idle after 60 s (sinfo: '${state}')"
  sleep 1
done
step "node $HOST idle after ${i}s"

submit() {  # submit NAME [env VAR=value ...]: run the 40B script through sbatch --wait, return its exit code
  local name=$1; shift
  JOB_OUT="$WORK/$name.out"
  local rc=0
  # in the background and waited for, so that a TERM from CI's timeout runs the cleanup at once
  env "$@" timeout "$JOB_TIMEOUT" sbatch --wait --job-name "$name" --nodes 1 --gpus-per-node 0 --time 20 \
    --output "$JOB_OUT" scripts/slurm/pretrain_40b.sbatch >"$WORK/$name.sbatch" 2>&1 &
  SUBMIT_PID=$!
  wait "$SUBMIT_PID" || rc=$?
  SUBMIT_PID=""
  [ "$rc" = 124 ] && fail "job $name did not finish within ${JOB_TIMEOUT}s"
  return "$rc"
}

# ---- 3a. a job without DATA_PATH fails in the script with one line -------------------------------------
step "job without DATA_PATH"
rc=0; submit nodata CHECKPOINT_DIR="$WORK/ckpt" || rc=$?
[ "$rc" = 2 ] || { cat "$WORK/nodata.sbatch" >&2; fail "the job without DATA_PATH exited $rc, expected 2"; }
[ "$(grep -c . "$JOB_OUT")" = 1 ] && grep -q "^error: DATA_PATH is not set" "$JOB_OUT" \
  || fail "the job without DATA_PATH did not print exactly one 'error: DATA_PATH ...' line"
step "ok: exit 2, '$(cat "$JOB_OUT")'"

# ---- the tiny job: the 40B script's flags at tiny sizes, TP 2 x EP 2 on 4 CPU ranks --------------------------
# The job's rendezvous host is the node's name (scontrol show hostnames); where that name does not
# resolve, use the node's address instead.
RDZV=()
getent hosts "$HOST" >/dev/null || { RDZV=(RDZV_HOST=127.0.0.1); step "note: $HOST does not resolve, rendezvous on 127.0.0.1"; }
TINY=("${RDZV[@]}" MEGATRON_TED_DIR="$ROOT" CPU=1 NNODES=1 GPUS_PER_NODE=4 MOCK_DATA=1 CHECKPOINT_DIR="$WORK/ckpt"
      NUM_LAYERS=2 HIDDEN=64 HEADS=4 SEQ_LEN=64 NUM_EXPERTS=4 TP=2 EP=2 MICRO_BATCH=4 GLOBAL_BATCH=16
      VOCAB_SIZE=250 LR=3e-3 MIN_LR=3e-4 LR_WARMUP_ITERS=0 LR_DECAY_ITERS=40 INIT_STD=0.02 DROPOUT=0
      SAVE_INTERVAL=8 LOG_INTERVAL=1 TENSORBOARD=0 PYTHON="$PYTHON")

# ---- 3b. a world the layout cannot use fails in the preflight, before srun --------------------------------
step "job with 3 ranks at TP 2"
rc=0; submit badlayout "${TINY[@]}" GPUS_PER_NODE=3 TRAIN_ITERS=1 || rc=$?
[ "$rc" = 2 ] || fail "the job with 3 ranks at TP 2 exited $rc, expected 2"
[ "$(grep -c . "$JOB_OUT")" = 1 ] && grep -q "^error: --tensor-model-parallel-size 2 does not divide the world size 3" "$JOB_OUT" \
  || fail "the job with 3 ranks at TP 2 did not print exactly one 'error: --tensor-model-parallel-size ...' line"
step "ok: exit 2, '$(cat "$JOB_OUT")'"

# ---- 3c. the 40B script at tiny sizes trains ----------------------------------------------------------------
check_losses() {  # check_losses LOG FIRST LAST: iterations FIRST..LAST logged, loss falling
  "$PYTHON" - "$@" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
first, last = int(sys.argv[2]), int(sys.argv[3])
found = {int(i): float(l) for i, l in re.findall(r"iteration +(\d+)/ *\d+ .*?lm loss: ([0-9.E+-]+)", text)}
missing = [i for i in range(first, last + 1) if i not in found]
if missing:
    sys.exit(f"iterations {missing} are not in the log")
losses = [found[i] for i in range(first, last + 1)]
head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
print(f"lm loss {losses[0]:.3f} -> {losses[-1]:.3f} over iterations {first}..{last}")
if not tail < head - 0.2:
    sys.exit(f"the loss did not fall: {losses}")
EOF
}

step "40B script, tiny sizes: 16 iterations, TP 2 x EP 2 on 4 CPU ranks"
start=$SECONDS
rc=0; submit tiny "${TINY[@]}" TRAIN_ITERS=16 || rc=$?
[ "$rc" = 0 ] || fail "the tiny 40B job exited $rc"
LOG=$(ls "$WORK"/ckpt/logs/train-*.log | head -n 1)
check_losses "$LOG" 1 16 || fail "the tiny 40B job's log ($LOG) does not show training"
grep -q "world 4: TP 2, DP 2, EP 2, expert-DP 1" "$JOB_OUT" || fail "the job did not print its layout"
[ "$(cat "$WORK/ckpt/latest_checkpointed_iteration.txt")" = 16 ] || fail "no checkpoint at iteration 16"
step "ok: exit 0 in $((SECONDS - start))s, checkpoint at iteration 16"

# ---- 3d. resubmitted, it resumes ---------------------------------------------------------------------------
step "the same job resubmitted with TRAIN_ITERS=20 resumes"
start=$SECONDS
rc=0; submit resume "${TINY[@]}" TRAIN_ITERS=20 || rc=$?
[ "$rc" = 0 ] || fail "the resumed job exited $rc"
grep -q "loaded checkpoint .* at iteration 16" "$JOB_OUT" || fail "the resubmitted job did not load the checkpoint"
grep -qE "iteration +1/" "$JOB_OUT" && fail "the resubmitted job started again from iteration 1"
"$PYTHON" - "$JOB_OUT" <<'EOF' || fail "the resumed job did not log iterations 17..20"
import re, sys
its = [int(i) for i in re.findall(r"iteration +(\d+)/ +20", open(sys.argv[1]).read())]
sys.exit(0 if its == list(range(17, 21)) else f"iterations logged: {its}")
EOF
[ "$(cat "$WORK/ckpt/latest_checkpointed_iteration.txt")" = 20 ] || fail "no checkpoint at iteration 20"
step "ok: exit 0 in $((SECONDS - start))s, iterations 17..20 after loading iteration 16"
echo "SLURM TEST PASSED"
