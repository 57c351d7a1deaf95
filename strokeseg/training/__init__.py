"""What the training scripts run. The loop (``engine``: :func:`~strokeseg.training.engine.fit`,
its phases and ``run_guarded``) and the concerns around it, one module each: ``settings``
(``TrainSettings``, ``InitSpec``), ``arguments`` (the flags the three training scripts share),
``optimization`` (optimiser, learning-rate schedule, one optimiser step), ``distributed`` (DDP
set-up), ``preemption`` (signals, exit status 75 for requeueing), ``fold_folder`` (one run per
fold folder, resume or fresh start), ``state`` (progress, RNG states, the exact-resume check),
``checkpointing`` (last.pth, best_model.pth, run_args.json), ``history`` (history.csv,
curves.png, TensorBoard) and ``validation`` (the whole-volume validation pass). Besides:
deterministic patch sampling and loading (``data``), augmentation (``augment``), losses on
logits (``losses``) and patch sampling and extraction on full volumes (``patches``), declared
as the stage behind ``extract_patches_96x96x96.py`` with its folder name and default patch size
(``patch_stage``).
"""
