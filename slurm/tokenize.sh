#!/usr/bin/env bash
#SBATCH --job-name=tidar-tokenize
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
# Data prep as a job array, one array task per input shard (a line of $INPUTS):
#   INPUTS=shards.txt OUTPUT=data/corpus TOKENIZER=tok.model \
#     sbatch --array=0-$(($(wc -l < shards.txt) - 1)) slurm/tokenize.sh [tokenize.py options]
# Each task writes ${OUTPUT}_NNNNN.bin/.idx; train on all of them with --data.blend '[prefix_00000, ...]'.
# A rerun of a failed array task resumes where it stopped (tokenize.py is restartable).
set -euo pipefail
cd "${TIDAR_HOME:-${SLURM_SUBMIT_DIR:-.}}"
source "${VENV:-.venv}/bin/activate"
input=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$INPUTS")
python data_prep/tokenize.py --input "$input" --tokenizer "$TOKENIZER" \
  --output-prefix "$(printf '%s_%05d' "$OUTPUT" "$SLURM_ARRAY_TASK_ID")" --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
