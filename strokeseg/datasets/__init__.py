"""The datasets: the registry of one ``DatasetSpec`` per dataset, looked up by name
(``registry``); each release's discovery and preprocessing into .npz files, where its spec
is registered (``isles``: ISLES 2022, ``foundation``: ATLAS v2.0 and UOA, ``brats``: BraTS
2024); the preprocessing stages, each declared once on the one stage skeleton (``stages``);
the cross-validation split files (``splits``); and synthetic datasets in the real on-disk
layouts for the tests and the demo (``synthetic``).
"""
