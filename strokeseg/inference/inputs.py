"""Which files are one case, and which modality each is: folder and single-file input of ``predict.py``.

A folder's files are paired into cases by the first of these that applies:

1. ``--modality KEY=GLOB`` (repeatable; KEY an input key of the model or ``mask``): the case id
   is what the glob's ``*`` matched (``*_DWI.nii.gz``: ``patient01``), or the file's folder
   when the file name holds no ``*`` (``*/DWI.nii.gz``, ``**/DWI.nii.gz``: ``patient01``);
2. the ISLES 2022 layouts A and B (:func:`strokeseg.datasets.isles.discover_isles_cases`, as the
   preprocessing stage finds them), or any other BIDS naming: ``sub-X[_ses-Y][_acq-..][_run-..]
   [_rec-..]_<suffix>.nii[.gz]``, each distinct entity set its own case (``ses-`` left out of the
   id when the subject has one session), the dataset spec's suffixes for each key
   (:attr:`strokeseg.datasets.registry.DatasetSpec.bids_suffixes`), letter case ignored;
3. nnU-Net's channel suffix: ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` in the contract's input
   order (reference masks ``CASE.nii.gz`` in a ``labels*`` folder).

T1w models also take the config's or ``--pattern`` globs (before 2). Case ids never depend on
letter case. Two files of one modality for one case id make that case fail naming both; a
file whose name says another modality (``sub-1_dwi.nii.gz`` given to a T1w model) makes it
fail naming the file. Nothing found is one line listing what was looked for and the first files
that were there.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from ..core.io import CaseError, glob_regex, walk_files
from ..core.case import LABEL, Case
from ..datasets.foundation import ID_MARKERS, case_id_from_filename, read_t1w_root, t1w_case
from ..datasets.isles import discover_isles_cases
from ..datasets.registry import DatasetSpec, dataset_names, dataset_spec
from .diffusion import diffusion_case

if TYPE_CHECKING:
    from .prediction import InputSpec

__all__ = [
    "ACQUISITION_ENTITIES",
    "parse_modalities",
    "role_problem",
    "single_case_id",
    "glob_cases",
    "bids_cases",
    "nnunet_cases",
    "diffusion_items",
    "t1w_items",
]

# BIDS entities that tell acquisitions apart (a case each); others (space-, desc-, label-) describe derivatives.
ACQUISITION_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part", "inv")
# MRI suffixes of no registered dataset that still name a modality (a file with one is no DWI, ADC or T1w).
OTHER_SUFFIXES = ("t2w", "flair", "pd", "pdw", "t2star", "swi", "bold", "angio", "cbf", "asl", "ct")
# Names that say which modality a file is but not whose it is: the case id comes from the folder.
GENERIC_NAMES = ("dwi", "adc", "t1", "t1w", "trace", "image", "img", "scan", "b1000", "diffusion", "isotropic", "mask", "lesion")
_NII = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_BIDS = re.compile(r"^(sub-[a-z0-9]+(?:_[a-z0-9]+-[a-z0-9]+)*)_([a-z0-9]+)\.nii(?:\.gz)?$", re.IGNORECASE)
_NNUNET = re.compile(r"^(.+)_(\d{4})\.nii(?:\.gz)?$", re.IGNORECASE)
_SHOWN_FILES = 5  # files listed when nothing is found

# case id in lower case -> (the id as first spelled, key -> files)
Found = dict[str, tuple[str, dict[str, list[Path]]]]


def _stem(name: str) -> str:
    return _NII.sub("", name)


def parse_modalities(values: Sequence[str], keys: Sequence[str]) -> dict[str, str]:
    """``["dwi=*_DWI.nii.gz", ...]`` -> {"dwi": "*_DWI.nii.gz"}; each KEY one of ``keys`` or
    "mask", given once. Raises ValueError naming the bad value."""
    globs: dict[str, str] = {}
    for value in values:
        key, sep, pattern = value.partition("=")
        key = key.strip().lower()
        if not sep or not pattern:
            raise ValueError(f"--modality {value!r}: expected KEY=GLOB, e.g. dwi='*_DWI.nii.gz'")
        if key not in (*keys, "mask"):
            raise ValueError(f"--modality {value!r}: this model reads {', '.join(keys)} (and an optional reference 'mask'), not {key!r}")
        if key in globs:
            raise ValueError(f"--modality {key} given twice ({globs[key]!r}, {pattern!r})")
        globs[key] = pattern
    return globs


def _named_suffixes() -> dict[str, str]:
    """Every modality suffix (lower case) -> what it names ("dwi of ISLES2022", "image of
    ATLAS, UOA_Private", "flair")."""
    users: dict[str, dict[str, list[str]]] = {}
    for name in dataset_names():
        for key, suffixes in dataset_spec(name).bids_suffixes:
            for suffix in suffixes if key != "mask" else ():
                users.setdefault(suffix, {}).setdefault(key, []).append(name)
    named = {suffix: suffix for suffix in OTHER_SUFFIXES}
    named.update({suffix: "; ".join(f"{key} of {', '.join(names)}" for key, names in keys.items()) for suffix, keys in users.items()})
    return named


def role_problem(path: Path, key: str, spec: DatasetSpec) -> str:
    """"" when ``path`` may be the ``key`` input of a ``spec`` model; else one line saying its
    name's suffix (the last ``_`` part, any letter case) names another modality."""
    suffix = _stem(path.name).rsplit("_", 1)[-1].lower()
    expected = dict(spec.bids_suffixes).get(key, ())
    named = _named_suffixes().get(suffix)
    if suffix in expected or named is None:
        return ""
    wanted = "/".join(expected) or key
    return f"{path}: its name says {suffix!r} ({named}), but this {spec.name} model reads it as {key} (*_{wanted} files): wrong modality?"


def single_case_id(path: Path, key: str, spec: DatasetSpec) -> str:
    """The case id of a single input file: the name without ``.nii[.gz]`` and a trailing
    ``_<suffix>`` of ``key`` (``sub-01_dwi`` -> ``sub-01``; T1w names by
    :func:`strokeseg.datasets.foundation.case_id_from_filename`), or the folder's name when
    the file name is generic (``patient07/DWI.nii.gz`` -> ``patient07``)."""
    stem = case_id_from_filename(path.name, spec.id_markers) if spec.id_markers else _stem(path.name)
    for suffix in dict(spec.bids_suffixes).get(key, ()):
        if stem.lower().endswith(f"_{suffix}") and len(stem) > len(suffix) + 1:
            stem = stem[: -len(suffix) - 1]
    generic = re.sub(r"[^a-z0-9]", "", stem.lower()) in (*GENERIC_NAMES, *_named_suffixes(), "")
    return path.resolve().parent.name if generic else stem


def _add(found: Found, case_id: str, key: str, path: Path) -> None:
    found.setdefault(case_id.lower(), (case_id, {}))[1].setdefault(key, []).append(path)


def glob_cases(root: Path, globs: Mapping[str, str]) -> Found:
    """Files under ``root`` matching each key's glob (letter case ignored), by case id: the
    distinct non-empty parts the glob's ``*`` matched, joined by "_"; else the file's folder."""
    found: Found = {}
    regexes = {key: glob_regex(pattern, capture=True, ignore_case=True) for key, pattern in globs.items()}
    for path in walk_files(root):
        relative = path.relative_to(root).as_posix()
        for key, regex in regexes.items():
            match = regex.match(relative)
            if match:
                parts = [part for part in dict.fromkeys(match.groups()) if part]
                _add(found, "_".join(parts) if parts else (path.parent.name if path.parent != root else _stem(path.name)), key, path)
    return found


def bids_cases(root: Path, spec: DatasetSpec, keys: Sequence[str]) -> tuple[Found, bool]:
    """BIDS-named files under ``root`` whose suffix is one of ``spec``'s for ``keys`` or "mask"
    (images outside ``derivatives/``, masks anywhere), by case id (:data:`ACQUISITION_ENTITIES`
    joined; ``ses-`` left out when the subject has one session), and whether every one is named
    as the ISLES 2022 release names its files (``sub-X_ses-Y_<suffix>``)."""
    by_suffix = {suffix: key for key, suffixes in spec.bids_suffixes if key in (*keys, "mask") for suffix in suffixes}
    files: list[tuple[dict[str, str], str, Path]] = []
    for path in walk_files(root):
        match = _BIDS.match(path.name)
        key = by_suffix.get(match.group(2).lower()) if match else None
        in_derivatives = any(part.lower() == "derivatives" for part in path.relative_to(root).parts)
        if key is None or (key != "mask" and in_derivatives):
            continue
        entities = {k.lower(): v for k, v in (pair.split("-", 1) for pair in match.group(1).split("_"))}  # type: ignore[union-attr]
        if entities.get("desc", "").lower() == "lesion":  # predict.py's own masks (an output folder inside the input) are no reference
            continue
        files.append((entities, key, path))
    sessions: dict[str, set[str]] = {}
    for entities, _, _ in files:
        sessions.setdefault(entities["sub"].lower(), set()).add(entities.get("ses", "").lower())
    found: Found = {}
    for entities, key, path in files:
        kept = [e for e in ACQUISITION_ENTITIES if e in entities and (e != "ses" or len(sessions[entities["sub"].lower()]) > 1)]
        _add(found, "_".join(f"{e}-{entities[e]}" for e in kept), key, path)
    standard = bool(files) and all(sorted(entities) == ["ses", "sub"] for entities, _, _ in files)
    return found, standard


def nnunet_cases(root: Path, keys: Sequence[str]) -> Found:
    """nnU-Net files under ``root``: ``CASE_000k.nii[.gz]`` is ``keys[k]`` (channels beyond the
    model's inputs are not read); ``CASE.nii[.gz]`` in a ``labels*`` folder its mask."""
    files = walk_files(root)
    found: Found = {}
    for path in files:
        match = _NNUNET.match(path.name)
        if match and int(match.group(2)) < len(keys) and not path.parent.name.lower().startswith("labels"):
            _add(found, match.group(1), keys[int(match.group(2))], path)
    for path in files:
        if path.parent.name.lower().startswith("labels") and _stem(path.name).lower() in found:
            _add(found, _stem(path.name), "mask", path)
    return found


def _problem(case_id: str, files: Mapping[str, list[Path]], required: Sequence[str], spec: DatasetSpec, how: str) -> str:
    """One line for a case that cannot run: a required key missing, two files of one key (both
    named), or a file whose name says another modality."""
    for key in required:
        if not files.get(key):
            other = next(paths[0] for paths in files.values())
            return f"{case_id}: no {key} file ({how}) beside {other}"
    for key, paths in files.items():
        if len(paths) > 1:
            return f"{case_id}: {len(paths)} {key} files give this one case id: {', '.join(map(str, paths))}"
    return next((p for key, paths in files.items() for p in [role_problem(paths[0], key, spec)] if p), "")


def _nothing_found(root: Path, spec: DatasetSpec, keys: Sequence[str], looked_for: Sequence[str]) -> CaseError:
    files = [p.relative_to(root).as_posix() for p in walk_files(root)]
    shown = ", ".join(files[:_SHOWN_FILES]) + (f" ... ({len(files)} files)" if len(files) > _SHOWN_FILES else "")
    return CaseError(f"{root}: no input for this {spec.name} model ({', '.join(keys)}) found; looked for {'; '.join(looked_for)}; "
                     f"files there: {shown or 'none'}")


def _looked_for(spec: DatasetSpec, keys: Sequence[str]) -> list[str]:
    suffixes = dict(spec.bids_suffixes)
    names = ", ".join(f"*_{'/'.join(suffixes.get(key, (key,)))}" for key in keys)
    channels = ", ".join(f"CASE_{k:04d} ({key})" for k, key in enumerate(keys))
    return [f"BIDS sub-*[_ses-*][_acq-*|_run-*|_rec-*] {names} .nii[.gz] (any letter case)", f"nnU-Net {channels}", "or name them with --modality KEY=GLOB"]


def _folder_cases(root: Path, spec: DatasetSpec, keys: Sequence[str], globs: Mapping[str, str]) -> tuple[Found, str]:
    """The folder's files by case id (--modality globs, else BIDS, else nnU-Net) and how they were found."""
    if not root.is_dir():
        raise CaseError(f"{root}: input folder not found")
    if globs:
        found, how = glob_cases(root, globs), " and ".join(f"--modality {k}={g}" for k, g in globs.items())
        if not found:
            raise _nothing_found(root, spec, keys, [how])
        return found, how
    found, _ = bids_cases(root, spec, keys)
    if found:
        return found, "BIDS suffix"
    found = nnunet_cases(root, keys)
    if found:
        return found, "nnU-Net channel"
    raise _nothing_found(root, spec, keys, _looked_for(spec, keys))


def diffusion_items(inputs: InputSpec, spec: DatasetSpec) -> dict[str, Case]:
    """Case id -> case (:func:`strokeseg.inference.diffusion.diffusion_case`) for a DWI model reading ``inputs.input_keys`` (the
    contract's; empty: the spec's). A folder in the ISLES 2022 layouts is found as the
    preprocessing stage finds it; an ADC map is looked for only when the model reads one."""
    keys = tuple(inputs.input_keys) or spec.input_keys
    wanted = lambda path: path if "adc" in keys else None  # noqa: E731
    if inputs.input_dir is None:
        if inputs.dwi is None:
            raise CaseError(f"this model reads {' and '.join(k.upper() for k in keys)}: give --input DIR or --dwi FILE{' --adc FILE' if 'adc' in keys else ''}")
        case_id = inputs.case_id or single_case_id(inputs.dwi, "dwi", spec)
        given = {"dwi": [inputs.dwi], **({"adc": [inputs.adc]} if inputs.adc is not None and "adc" in keys else {})}
        problem = _problem(case_id, given, ("dwi",), spec, "--dwi")
        return {case_id: diffusion_case(case_id, inputs.dwi, wanted(inputs.adc), inputs.mask, problem, dwi_volume=inputs.dwi_volume)}
    root, globs = Path(inputs.input_dir), dict(inputs.modalities)
    if not globs and Path(root).is_dir() and bids_cases(root, spec, keys)[1]:
        return {case.case_id: diffusion_case(case.case_id, case.source("dwi"), wanted(case.source("adc")), case.source(LABEL), case.problem,
                                             case.meta.get("root"), case.meta.get("stem", ""), inputs.dwi_volume)
                for case in discover_isles_cases(root)}
    found, how = _folder_cases(root, spec, keys, globs)
    items = {}
    for case_id, files in sorted(found.values()):
        first = {key: paths[0] if paths else None for key, paths in files.items()}
        items[case_id] = diffusion_case(case_id, first.get("dwi"), wanted(first.get("adc")), first.get("mask"),
                                       _problem(case_id, files, ("dwi",), spec, how), dwi_volume=inputs.dwi_volume)
    return items


def t1w_items(inputs: InputSpec, spec: DatasetSpec) -> dict[str, Case]:
    """Case id -> case (:func:`strokeseg.datasets.foundation.t1w_case`) for a T1w model: a folder
    by --modality globs, else by the config's or --pattern globs (:func:`strokeseg.datasets.foundation.read_t1w_root`),
    else BIDS or nnU-Net names; or the single ``--image``."""
    keys = tuple(inputs.input_keys) or spec.input_keys
    if inputs.input_dir is None:
        if inputs.image is None:
            raise CaseError(f"this model reads one T1w image ({spec.name}): give --input DIR or --image FILE")
        case_id = inputs.case_id or single_case_id(inputs.image, "image", spec)
        problem = _problem(case_id, {"image": [inputs.image]}, ("image",), spec, "--image")
        return {case_id: t1w_case(case_id, spec.name, inputs.image, inputs.mask, problem)}
    if inputs.image_pattern and not inputs.modalities:
        markers = spec.id_markers or ID_MARKERS
        return {case.case_id: case for case in read_t1w_root(Path(inputs.input_dir), spec.name, inputs.image_pattern, inputs.mask_pattern, markers)}
    found, how = _folder_cases(Path(inputs.input_dir), spec, keys, dict(inputs.modalities))
    items = {}
    for case_id, files in sorted(found.values()):
        image, mask = (files.get(key, [None])[0] for key in ("image", "mask"))
        items[case_id] = t1w_case(case_id, spec.name, image, mask, _problem(case_id, files, ("image",), spec, how))
    return items
