#!/bin/bash
# Run one training command inside a SLURM batch job and requeue the job when it was preempted.
#
#   slurm/requeue.sh python train_stroke.py ... --resume-if-exists
#
# SLURM's early warning (#SBATCH --signal=B:USR1@120) reaches this batch shell only; it is
# forwarded to the training process as SIGTERM (the trainer treats SIGTERM and SIGUSR1 alike;
# torchrun passes SIGTERM on to its ranks). The trainer saves fold_<k>/last.pth at the next
# step boundary and exits 75 (EX_TEMPFAIL); this script then runs `scontrol requeue`, and the
# requeued job continues from last.pth (--resume-if-exists). torchrun reports failures of its
# ranks with its own exit status, so after a forwarded signal any non-zero status requeues.
set -u
"$@" &
child=$!
signalled=0
trap 'signalled=1; echo "$(date +%T) preemption warning: asking pid $child to save and stop"; kill -TERM "$child" 2>/dev/null' USR1 TERM
wait "$child"
status=$?
if [ "$signalled" -eq 1 ]; then
    wait "$child"  # the first wait returns as soon as the trap runs; this one gets the exit status
    status=$?
fi
if [ "$status" -eq 75 ] || { [ "$signalled" -eq 1 ] && [ "$status" -ne 0 ]; }; then
    echo "$(date +%T) exit status $status: requeueing job ${SLURM_JOB_ID:-?}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
fi
exit "$status"
