#!/bin/bash
# Train a BigGAN-128 inverter of a ResNet-50 on ImageNet across SLURM nodes with torchrun.
#
#   sbatch examples/slurm_train.sh /data/imagenet /weights/resnet50.pth runs/r50-128
#
# One torchrun per node (srun --ntasks-per-node=1) starts one process per GPU; the first
# node of the allocation is the rendezvous host. Batch 256 per GPU is the imagenet-128 preset
# (set --batch_size / --accumulate to fit smaller GPUs). Resubmitting the same command resumes
# from the newest checkpoint in the run directory (SIGTERM at preemption saves one first).
#SBATCH --job-name=fastinv-128
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail

DATA=${1:?usage: slurm_train.sh IMAGENET_ROOT CLASSIFIER_WEIGHTS RUN_DIR}
WEIGHTS=${2:?classifier weights (a local torchvision resnet50 state dict)}
RUN_DIR=${3:-runs/imagenet-128-$SLURM_JOB_ID}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

RESUME=false
if compgen -G "$RUN_DIR/checkpoints/step_*.pt" > /dev/null; then RESUME=true; fi

export OMP_NUM_THREADS=8
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:29500" \
    -m fastinv train imagenet-128 \
    --data.root="$DATA" \
    --classifier.spec=torchvision:resnet50 --classifier.weights="$WEIGHTS" \
    --run.out_dir="$RUN_DIR" --run.resume="$RESUME"
