#!/bin/bash
# smollm on N nodes x 8 GPUs under SLURM: one task per GPU, started by srun; Lightning's
# SLURMEnvironment reads the ranks and the head node from SLURM, and smollm.fit takes
# --trainer.devices and --trainer.num_nodes from it. Any options go after the script:
#
#   sbatch --nodes 4 scripts/slurm_train.sh --config configs/135m.yaml --data.batch_size 1
#   sbatch --nodes 4 scripts/slurm_train.sh --config configs/135m.yaml --data.batch_size 1 --ckpt_path last
#
# The global batch (--data.global_batch_size, 32 windows = 65,536 tokens per step in the configs)
# stays what it is: each of the N x 8 processes takes global / (8 N) windows a step, in
# micro-batches of --data.batch_size (4 nodes: 32 / 32 = 1 each). A run resumes with the same
# tokens per step and the same samples on any number of nodes (or on one GPU, without srun).
#
# Run it from the project folder, which every node must see (checkpoints and logs go there).
# Put the token cache on a file system that every node sees (--data.cache_dir, or SMOLLM_CACHE),
# with working locks: the first task tokenizes and the others wait. Or build it beforehand (see
# docs/data.md, "Tokenizing on several GPUs or machines", or docs/object-storage.md).
#
#SBATCH --job-name=smollm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@180
#SBATCH --output=slurm-%j.out
#
# --signal=TERM@180: three minutes before the time limit every task gets SIGTERM; smollm saves a
# checkpoint of the last finished step and exits with 143. Submit again with --ckpt_path last.

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-8}"
exec srun --kill-on-bad-exit=1 python -m smollm.fit "$@"
