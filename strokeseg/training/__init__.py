"""What the training scripts run: the training engine (``engine``: one loop, one checkpoint
format, resume and preemption), deterministic patch sampling and loading (``data``),
augmentation (``augment``), losses on logits (``losses``) and patch sampling and
extraction on full volumes (``patches``), declared as the stage behind
``extract_patches_96x96x96.py``, with its folder name and default patch size (``patch_stage``).
"""
