#!/usr/bin/env bash
# GRPO on several nodes under SLURM: one torchrun per node, one process per GPU (an example; adapt
# the #SBATCH lines, the paths and the environment to your cluster). Submit from the repository root:
#
#   sbatch scripts/slurm_grpo.sh                      # configs/grpo.yaml
#   sbatch scripts/slurm_grpo.sh configs/grpo_no_clip.yaml learning_rate=3e-5   # another config, overrides
#
# The world size is nodes x GPUs per node (here 2 x 4 = 8). The config's rollout_batch_size /
# group_size (questions per step, 32 in grpo.yaml) and gradient_accumulation_steps (128) must divide
# by it, else every rank stops at start-up with a one-line error.
#
# A shared filesystem is required: the run directory (CS336_RUNS below) must be the same directory on
# every node, since every rank writes its own shard of each checkpoint into it (rank 0 writes the
# metrics, logs and the rest). The model and data may be node-local copies at the same path.
#
#SBATCH --job-name=grpo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # one torchrun per node; it starts the per-GPU processes
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32             # CPU cores per node: grading workers and data loading
#SBATCH --time=08:00:00
#SBATCH --requeue                      # after a preemption or node failure the job runs again, with --resume
#SBATCH --signal=TERM@600              # SIGTERM 10 minutes before the time limit: the running step ends and is checkpointed
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

GPUS_PER_NODE=4                        # keep equal to --gpus-per-node above
CONFIG=${1:-configs/grpo.yaml}
shift $(( $# > 0 ? 1 : 0 ))            # the rest: key=value overrides

# Environment (placeholders): the project's virtual environment, and where the model, data and runs are.
cd "${SLURM_SUBMIT_DIR:-.}"
# shellcheck disable=SC1091
source .venv/bin/activate              # or: module load ...; conda activate ...
export CS336_MODEL=${CS336_MODEL:-/path/to/Qwen2.5-Math-1.5B}
export CS336_DATA=${CS336_DATA:-/path/to/MATH}
export CS336_RUNS=${CS336_RUNS:-/shared/path/runs}   # on the shared filesystem (see above)
export OMP_NUM_THREADS=1
# export NCCL_SOCKET_IFNAME=ib0        # if NCCL picks the wrong network interface

# A requeued job (SLURM_RESTART_COUNT > 0) continues from the last complete checkpoint. --resume also
# works at another world size (change --nodes or --gpus-per-node and resubmit with RESUME=1).
RESUME_FLAG=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || [ -n "${RESUME:-}" ]; then
  RESUME_FLAG=(--resume)
fi

# The first node of the allocation hosts the rendezvous (torchrun's c10d store on port 29500).
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun --nodes "$SLURM_NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1 \
  torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD:29500" \
    --rdzv-id "$SLURM_JOB_ID" \
    --shutdown-timeout 600 \
    -m cs336_alignment run "$CONFIG" "$@" ${RESUME_FLAG[@]+"${RESUME_FLAG[@]}"} --quiet
