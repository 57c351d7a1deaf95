"""Running trained networks on whole volumes: the one inferer of validation, evaluation and
prediction (``inferer``: window rule, brain crop, settings), its precision policy (``precision``),
sliding-window inference with blending, mirror TTA and fold ensembles (``sliding_window``), and
prediction on new NIfTI data behind ``predict.py`` (``prediction``: lesion masks on the native
grid, volumes, lesion tables).
"""
