"""Shared library of the stroke lesion segmentation pipeline.

Importing does nothing: no I/O, seeding or printing at module level. Stage scripts at the
repository root are thin front ends over these modules.

Layout: ``core/`` (I/O, the per-case runner, geometry, the checkpoint data contract),
``datasets/`` (the dataset registry, each dataset's preprocessing, splits, synthetic data),
``training/`` (the training engine, data pipeline, augmentation, losses, patches),
``inference/`` (sliding-window inference, prediction on new data) and ``evaluation/``
(scoring, metrics, statistics, reports); ``demo``, ``ablation`` and ``export`` stay here so
that ``python -m strokeseg.demo`` (``.ablation``, ``.export``) runs them.
"""
