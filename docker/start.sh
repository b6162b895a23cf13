#!/usr/bin/env bash
# The image's start script (tini runs it as PID 1's child): sets defaults on the persistent volume, checks for
# a GPU, launches one training process per visible GPU, and does ON_FINISH when training ends.
# Every variable it reads is listed in docker/README.md.
#
#   start.sh [train] [section.key=value ...]      train (the default command)
#   start.sh check|eval|transcribe|compare-padding|plot [...]   run that command of the CLI as is
#   start.sh --help                               the CLI's help (every environment variable)
set -euo pipefail

APP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
ENTRYPOINT="$APP_DIR/entrypoint.py"

log() { echo "start: $*" >&2; }
die() { echo "start: $*" >&2; exit 2; }
is_positive() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 )); }

# What a run costs counts from the container's start (model downloads included), as RunPod's bill does.
export TINY_AUDIO_STARTED_AT="${TINY_AUDIO_STARTED_AT:-$(date +%s)}"

# Caches, trackers and outputs go to the persistent volume RunPod mounts at /workspace, so a restarted pod
# neither downloads the models again nor loses its checkpoints. A value the user set always wins.
if [[ -d /workspace ]]; then
  export HF_HOME="${HF_HOME:-/workspace/.cache/huggingface}"
  export WANDB_DIR="${WANDB_DIR:-/workspace}"
  # torch.compile's kernels (training.compile): compiled once per volume, reused by every restart
  export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/workspace/.cache/torchinductor}"
  export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/workspace/.cache/triton}"
fi

case "${1:-}" in
  train) shift ;;
  check | eval | transcribe | compare-padding | plot) exec "$PYTHON" "$ENTRYPOINT" "$@" ;;
  -*) exec "$PYTHON" "$ENTRYPOINT" "$@" ;;  # --help, --version: nothing to launch
  *) ;;  # no command, or overrides only: train
esac

# Validate EXP, its overrides, ON_FINISH, the budget and the GPUs before launching anything: a mistake ends here
# in one line (exit 2), not after the models have loaded or hours of training. Prints "ON_FINISH GPUS"; on RunPod
# ON_FINISH defaults to stop when the pod can stop itself, and a line on stderr says whether the pod will.
plan="$("$PYTHON" -m tiny_audio.runpod plan "$@")"
read -r on_finish gpus <<< "$plan"

# --- How many processes, on how many machines ------------------------------------------------------------------
processes="${NUM_PROCESSES:-$(( gpus > 0 ? gpus : 1 ))}"
# A RunPod Instant Cluster sets NUM_NODES, NODE_RANK, PRIMARY_ADDR and PRIMARY_PORT on every node: they are the
# defaults, so the same template trains on one pod or on a cluster. The variables below override them.
machines="${NUM_MACHINES:-${NUM_NODES:-1}}"
machine_rank="${MACHINE_RANK:-${NODE_RANK:-0}}"
main_ip="${MAIN_PROCESS_IP:-${PRIMARY_ADDR:-}}"
main_port="${MAIN_PROCESS_PORT:-${PRIMARY_PORT:-29500}}"
is_positive "$processes" || die "NUM_PROCESSES must be a whole number >= 1, got '$processes'"
is_positive "$machines" || die "NUM_MACHINES must be a whole number >= 1, got '$machines'"

if (( processes == 1 && machines == 1 )); then
  launch=("$PYTHON" "$ENTRYPOINT" train "$@")
else
  # accelerate's --num_processes counts every process of every machine. Run as a module of $PYTHON, so the
  # launcher is the one of the trainer's environment whether or not its bin/ is on PATH (`make train`).
  launch=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$(( processes * machines ))"
    --num_machines "$machines" --dynamo_backend no)
  if (( machines > 1 )); then
    [[ -n "$main_ip" ]] || die "NUM_MACHINES=$machines needs MAIN_PROCESS_IP (the address of machine 0)"
    launch+=(--machine_rank "$machine_rank" --main_process_ip "$main_ip")
  fi
  launch+=(--main_process_port "$main_port")
  launch+=("$ENTRYPOINT" train "$@")
  # Without this, `--multi_gpu` on a machine with no GPU silently runs every process as rank 0 of 1.
  (( gpus > 0 )) || launch=(env ACCELERATE_USE_CPU=true "${launch[@]}")
fi

# The trainer compares this with the processes that joined: a launch that silently collapsed to one process
# (a wrong backend, a missing GPU) is an error, not a run at a fraction of the asked speed.
export TINY_AUDIO_WORLD_SIZE="$(( processes * machines ))"

if [[ "${START_DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${launch[@]}"
  echo
  exit 0
fi

# --- Train ------------------------------------------------------------------------------------------------------
if [[ "$on_finish" == "exit" ]]; then
  exec "${launch[@]}"  # the trainer takes this process's place: tini's SIGTERM reaches it directly
fi

# Something must happen after training, so the trainer runs as a child and signals are forwarded to it.
signalled=0
child=""
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
  signalled=1
  [[ -z "$child" ]] || kill -s "$1" "$child" 2> /dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT
"${launch[@]}" &
child=$!
if (( signalled )); then kill -s TERM "$child" 2> /dev/null || true; fi  # a stop that came before the start
while :; do
  status=0
  wait "$child" || status=$?
  # A trapped signal interrupts `wait` (status > 128) while the trainer is still saving: keep waiting.
  if (( status > 128 )) && kill -0 "$child" 2> /dev/null; then continue; fi
  break
done
trap - TERM INT

if (( signalled )); then
  exit "$status"  # the container is being stopped from outside: nothing more to do
fi

log "training ended with exit code $status; ON_FINISH=$on_finish"
case "$on_finish" in
  sleep)
    log "sleeping so the pod stays up for inspection (stop it when done)"
    exec sleep infinity
    ;;
  stop | terminate)
    # Exiting would let RunPod restart the container; on a failed call sleeping keeps the pod, and the error,
    # visible. `finish` says why in one line (exit 2); anything else (a crash) is said here.
    finished=0
    "$PYTHON" -m tiny_audio.runpod finish || finished=$?
    if (( finished != 0 && finished != 2 )); then
      log "could not $on_finish the pod (exit code $finished); sleeping instead of exiting, so RunPod does not restart the container"
    fi
    exec sleep infinity  # after a stop, RunPod ends the container shortly
    ;;
esac
exit "$status"
