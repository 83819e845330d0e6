# Sourced by the pretrain_*.sh launchers after they set PRESET: environment, rendezvous, launch.
# Every setting below can be overridden from the environment; arguments to the launcher are passed to
# the trainer unchanged (e.g. --train.train_steps 1000 --data.blend /data/corpus).
set -euo pipefail

TIDAR_HOME=${TIDAR_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}   # sbatch copies the script: find the repo this way
cd "$TIDAR_HOME"

# Rendezvous from the allocation: the first node hosts the store; one port per job avoids collisions.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# NCCL / CUDA (H100 nodes):
#  CUDA_DEVICE_MAX_CONNECTIONS=1   orders TP/SP communication kernels before compute (Megatron needs it
#                                  for comm/compute overlap on Hopper)
#  NCCL_NVLS_ENABLE=0              NVLink SHARP off: saves memory, as Megatron-Bridge's H100 recipes do
#  TORCH_NCCL_AVOID_RECORD_STREAMS=1, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True   less fragmentation
#  NCCL_IB_* / NCCL_SOCKET_IFNAME  site specific: set them in the environment you submit from
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export WANDB_MODE=${WANDB_MODE:-offline}

# The 1p5b / 8b presets are the paper's continual-pretraining recipe: they start from an AR checkpoint that
# `tidar-megatron import-hf` converted, given as INIT_FROM; its config.yaml (the checkpoint's architecture
# and mask token, the preset's recipe) becomes the config.  Without INIT_FROM the trainer refuses to start
# (checkpoint.init_required) unless FROM_SCRATCH=1, which selects the <preset>-scratch preset instead.
INIT_FROM=${INIT_FROM:-}
if [ "${FROM_SCRATCH:-0}" = 1 ]; then
  CONFIG=${CONFIG:-$PRESET-scratch}
elif [ -n "$INIT_FROM" ] && [ -f "$INIT_FROM/config.yaml" ]; then
  CONFIG=${CONFIG:-$INIT_FROM/config.yaml}
fi
CONFIG=${CONFIG:-$PRESET}
init=()
[ -n "$INIT_FROM" ] && init=(--checkpoint.init_from "$INIT_FROM")

CKPT_DIR=${CKPT_DIR:-runs/$PRESET}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}   # pyxis image; otherwise the venv below is used
VENV=${VENV:-$TIDAR_HOME/.venv}

container=()
if [ -n "$CONTAINER_IMAGE" ]; then
  container=(--container-image "$CONTAINER_IMAGE" --container-mounts "$TIDAR_HOME:$TIDAR_HOME"
             --container-workdir "$TIDAR_HOME")
else
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi

echo "job $SLURM_JOB_ID: config $CONFIG${INIT_FROM:+ from $INIT_FROM}, $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR:$MASTER_PORT, checkpoints $CKPT_DIR"
# One task per GPU; each task finds its rank in SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.
# The trainer resumes from $CKPT_DIR automatically and saves on SIGTERM / SIGUSR1 (the launchers' --signal).
srun --kill-on-bad-exit=1 "${container[@]}" \
  python -u -m tidar_megatron train --config "$CONFIG" --checkpoint.dir "$CKPT_DIR" "${init[@]}" "$@"
