#!/bin/bash
# Run one training command inside a SLURM batch job and requeue the job when it was preempted.
#
#   exec slurm/requeue.sh python train_stroke.py ... --resume-if-exists   # as the batch shell
#   source slurm/requeue.sh; requeueable python train_stroke.py ...        # in the batch shell
#
# SLURM's early warning (#SBATCH --signal=B:USR1@120) reaches the batch shell only, so this must
# run AS the batch shell: `exec` it, or `source` it and call `requeueable` (then the batch shell
# goes on after a successful command). A child batch shell would die of USR1 (exit 138) without
# telling the trainer. The warning (or SIGTERM) is forwarded to the training process as SIGTERM
# (the trainer treats SIGTERM and SIGUSR1 alike; torchrun passes SIGTERM on to its ranks). The
# trainer saves fold_<k>/last.pth at the next step boundary and exits 75 (EX_TEMPFAIL); then
# `scontrol requeue $SLURM_JOB_ID` runs and the batch shell exits 0: the requeued job continues
# from last.pth (--resume-if-exists). torchrun reports failures of its ranks with its own exit
# status, so after a forwarded signal any non-zero status requeues. Otherwise the command's exit
# status is returned (sourced) or is the exit status (executed).
requeueable() {
    local child="" status=0 signalled=0
    trap 'signalled=1; echo "$(date +%T) preemption warning: asking pid ${child:-?} to save and stop"; if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi' USR1 TERM
    "$@" &
    child=$!
    if [ "$signalled" -eq 1 ]; then kill -TERM "$child" 2>/dev/null || true; fi  # warned before the command started
    while :; do  # a trapped signal ends `wait` early (status > 128) while the command still runs: wait again
        wait "$child" && status=0 || status=$?
        if [ "$status" -le 128 ] || ! kill -0 "$child" 2>/dev/null; then break; fi
    done
    trap - USR1 TERM
    if [ "$status" -eq 75 ] || { [ "$signalled" -eq 1 ] && [ "$status" -ne 0 ]; }; then
        echo "$(date +%T) exit status $status: requeueing job ${SLURM_JOB_ID:-?}"
        scontrol requeue "${SLURM_JOB_ID}"
        exit 0
    fi
    return "$status"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # executed, not sourced
    set -u
    requeueable "$@"
fi
