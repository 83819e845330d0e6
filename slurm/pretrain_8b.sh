#!/usr/bin/env bash
#SBATCH --job-name=tidar-8b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --output=logs/%x-%j.out
# TiDAR pretraining, the 8b preset (configs/8b.yaml: the paper's continual-pretraining recipe), one task
# per GPU on 8-GPU H100 nodes.  From the converted AR checkpoint (INIT_FROM, required by the recipe; any family
# of the README's table: Llama 2 / 3.x, Mistral, Qwen2 / 2.5 / 3, SmolLM):
#   tidar-megatron import-hf --hf Qwen3-8B/ --output runs/init-8b
#   mkdir -p logs && INIT_FROM=runs/init-8b sbatch slurm/pretrain_8b.sh --data.blend /data/corpus \
#       --data.tokenizer Qwen3-8B/
# From scratch (the 8b-scratch preset, your tokenizer's vocabulary):
#   FROM_SCRATCH=1 sbatch slurm/pretrain_8b.sh --data.blend /data/corpus --data.tokenizer /data/tok.model
# Submit from the repository root (or set TIDAR_HOME). Override anything: sbatch options on the command
# line, PRESET / CONFIG / INIT_FROM / FROM_SCRATCH / CKPT_DIR / CONTAINER_IMAGE / VENV / NCCL_* in the
# environment, trainer fields as arguments.
# USR1 arrives 5 minutes before the time limit: the trainer saves and exits 0; --requeue lets Slurm
# restart the job, which resumes from the checkpoint.
# 8B: TP=2 + sequence parallelism inside a node (NVLink), DP over the rest with the distributed
# optimizer; PP=1 (36 layers fit at TP=2 with a 2x4096 doubled sequence). 4 nodes = DP 16.
PRESET=${PRESET:-8b}
source "${TIDAR_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
