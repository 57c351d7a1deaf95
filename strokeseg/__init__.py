"""Shared library of the stroke lesion segmentation pipeline.

Importing does nothing: no I/O, seeding or printing at module level. Stage scripts at the
repository root are thin front ends over these modules.
"""
