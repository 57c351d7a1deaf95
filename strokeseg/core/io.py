"""File I/O shared by every stage: atomic writes, pickle-free .npz/JSON, validated NIfTI.

Every writer goes through :func:`atomic_path`, so a crash or ``kill -9`` leaves either the old
file or the complete new one, never a half-written file. Readers refuse pickled content.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import os
import math
import re
import socket
import struct
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np

from .case import Image

__all__ = [
    "write_csv",
    "CaseError",
    "atomic_path",
    "remove_stale_partials",
    "save_npz",
    "load_npz",
    "load_npz_mmap",
    "NotMemoryMappable",
    "check_finite",
    "write_json",
    "strict_json",
    "write_text",
    "read_json",
    "load_nifti",
    "load_image",
    "check_image_content",
    "npz_shapes",
    "npz_member_crcs",
    "walk_files",
    "glob_regex",
    "glob_files",
    "save_nifti",
    "affines_match",
    "check_same_grid",
    "one_line",
    "file_digest",
    "file_fingerprints",
    "changed_inputs",
]


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest zip timestamp: fixed, so outputs are reproducible


class CaseError(ValueError):
    """Bad input for one case; the message is one line naming the file and the problem."""


class NotMemoryMappable(CaseError):
    """An .npz member that :func:`load_npz_mmap` cannot map (stored compressed): decode it instead."""


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
# The middle of a temporary name: "<host>-<pid>.<mkstemp's random part>".
_PARTIAL_OWNER = re.compile(r"^(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+$")
STALE_PARTIAL_SECONDS = 24 * 3600  # a leftover of another host (or an older version) is stale after this
_SWEPT: set[str] = set()  # folders this process has cleared of stale leftovers


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name is ``.<name>.<host>-<pid>.<random>.partial``: hidden and without the
    output's suffix, so a file left behind by ``kill -9`` never matches a later stage's ``*.npz``
    or ``*.json`` glob, and naming its writer, so the first write of a later process into that
    folder removes it (:func:`remove_stale_partials`). Writers must therefore not infer the
    format from the name (pass it explicitly).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if str(path.parent.resolve()) not in _SWEPT:
            remove_stale_partials(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".partial", dir=path.parent)
    except OSError as err:
        raise _write_error(err, path) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from a shared group
            yield tmp_path
            os.replace(tmp_path, path)
        except OSError as err:  # full disk, quota, read-only folder: name the output, not the temporary
            raise _write_error(err, path) from err
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` in ``folder`` whose writer is gone (a
    ``kill -9`` between write and rename): those of a process of this host that no longer runs,
    and any older than :data:`STALE_PARTIAL_SECONDS` (another host's, or an older version's
    unnamed ones). A live writer's file is kept. Returns the paths removed, sorted."""
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".partial") and entry.is_file(follow_symlinks=False) and _stale(entry):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    _SWEPT.add(str(Path(folder).resolve()))
    return sorted(removed)


def _stale(entry: os.DirEntry) -> bool:
    """Whether a ``.partial`` file's writer is gone (see :func:`remove_stale_partials`)."""
    try:
        if time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_PARTIAL_SECONDS:
            return True
    except FileNotFoundError:
        return False  # renamed or removed meanwhile by its writer
    middle = entry.name[:-len(".partial")].rsplit(".", 2)
    owner = _PARTIAL_OWNER.match(".".join(middle[-2:])) if len(middle) == 3 else None
    if owner is None or owner.group("host") != _HOST:
        return False
    try:
        os.kill(int(owner.group("pid")), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _write_error(err: OSError, path: Path) -> OSError:
    """``err`` as an OSError of the same errno (so ``PermissionError`` stays one) naming ``path``."""
    if err.errno is None:
        return OSError(f"cannot write {path}: {one_line(err)}")
    return OSError(err.errno, f"cannot write {path}: {err.strerror or one_line(err)}")


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], compress: bool = True) -> None:
    """Write ``arrays`` to ``path`` (.npz, readable by ``np.load``) atomically.

    Unlike ``np.savez`` the zip entries carry a fixed timestamp, so identical arrays give
    byte-identical files (checksums of two seeded runs agree). ``compress=False`` stores the
    members uncompressed so :func:`load_npz_mmap` can map them. Object arrays are refused.
    """
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise TypeError(f"{path}: array {key!r} has dtype object, which would need pickle")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, mode="w", compression=method, allowZip64=True) as archive:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                info.compress_type = method
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


def load_npz(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Read an .npz into a dict of arrays (never unpickling).

    ``keys`` restricts what is decompressed and checks that those keys exist.
    Raises :class:`CaseError` naming the file when it is unreadable or a key is missing.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            wanted = data.files if keys is None else keys
            missing = [k for k in wanted if k not in data.files]
            if missing:
                raise CaseError(f"{path}: missing key(s) {missing}; has {sorted(data.files)}")
            return {k: data[k] for k in wanted}
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        if isinstance(err, CaseError):
            raise
        raise CaseError(f"{path}: unreadable .npz ({one_line(err)})") from err


def check_finite(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`CaseError` naming ``path`` and the member when a floating-point array of
    ``arrays`` holds NaN or Inf (other dtypes are not checked)."""
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.inexact):
            finite = np.isfinite(value)
            if not finite.all():
                raise CaseError(f"{path}: member {key!r} holds {finite.size - int(np.count_nonzero(finite))} NaN/Inf value(s)")


# (resolved path, mtime_ns, size, member) of members this process found intact and finite.
_VERIFIED: set[tuple[str, int, int, str]] = set()
_CRC_CHUNK = 1 << 24  # bytes per zlib.crc32 call (16 MiB)


def _verify_member(path: str | os.PathLike, key: str, info: zipfile.ZipInfo, data_offset: int, array: np.memmap) -> None:
    """Check a stored member once per process: the CRC-32 of its bytes (npy header and data)
    against the zip directory's, and that a floating-point array is finite. Raises CaseError."""
    stat = os.stat(path)
    stamp = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, key)
    if stamp in _VERIFIED:
        return
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_offset, shape=(info.file_size,)) if info.file_size else np.zeros(0, np.uint8)
    crc = 0
    for start in range(0, info.file_size, _CRC_CHUNK):
        crc = zlib.crc32(raw[start : start + _CRC_CHUNK], crc)
    del raw
    if crc != info.CRC:
        raise CaseError(f"{path}: member {key!r} is corrupt (CRC-32 {crc:08x}, the archive records {info.CRC:08x}); re-create the file")
    check_finite(path, {key: array})
    _VERIFIED.add(stamp)


def _read_npy_header(stream: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy array starting at ``stream``'s position."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def npz_shapes(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of members of an .npz, read from the array headers only (cheap even when compressed).

    Raises :class:`CaseError` naming the file when it is unreadable or a key is missing.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            shapes = {}
            for key in keys:
                if f"{key}.npy" not in archive.namelist():
                    raise CaseError(f"{path}: missing key {key!r}")
                with archive.open(f"{key}.npy") as member:
                    shape, _, _ = _read_npy_header(member)
                shapes[key] = tuple(int(n) for n in shape)
            return shapes
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        if isinstance(err, CaseError):
            raise
        raise CaseError(f"{path}: unreadable .npz ({one_line(err)})") from err


def npz_member_crcs(path: str | os.PathLike) -> dict[str, int]:
    """CRC-32 of every member of an .npz, read from its zip directory (no data is read): a cheap
    fingerprint of its content. Raises :class:`CaseError` naming the file when it is unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {info.filename: info.CRC for info in archive.infolist()}
    except (OSError, zipfile.BadZipFile) as err:
        raise CaseError(f"{path}: unreadable .npz ({one_line(err)})") from err


def load_npz_mmap(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.memmap]:
    """Memory-map members of an uncompressed .npz (written with ``compress=False``).

    ``np.load`` cannot map .npz members, so this finds each stored member's byte offset and maps
    it read-only: a patch read touches only its own pages, not the whole volume. The first time
    a process maps a member of a given (file, mtime, size), its CRC-32 is checked (bit rot) and a
    floating-point member must be finite (:func:`check_finite`); later calls skip both. Raises
    :class:`NotMemoryMappable` for compressed members and :class:`CaseError` for missing keys,
    corrupt, non-finite or unreadable files.
    """
    out: dict[str, np.memmap] = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for key in keys:
                try:
                    info = archive.getinfo(f"{key}.npy")
                except KeyError:
                    raise CaseError(f"{path}: missing key {key!r}") from None
                if info.compress_type != zipfile.ZIP_STORED:
                    raise NotMemoryMappable(f"{path}: member {key!r} is compressed and cannot be memory-mapped")
                raw.seek(info.header_offset + 26)  # local file header: name and extra-field lengths
                name_len, extra_len = struct.unpack("<HH", raw.read(4))
                data_offset = info.header_offset + 30 + name_len + extra_len
                raw.seek(data_offset)
                shape, fortran, dtype = _read_npy_header(raw)
                if dtype.hasobject:
                    raise CaseError(f"{path}: member {key!r} holds objects (pickle), refused")
                order = "F" if fortran else "C"
                out[key] = np.memmap(path, dtype=dtype, mode="r", shape=shape, order=order, offset=raw.tell())
                _verify_member(path, key, info, data_offset, out[key])
    except (OSError, zipfile.BadZipFile, ValueError, struct.error) as err:
        if isinstance(err, CaseError):
            raise
        raise CaseError(f"{path}: unreadable .npz ({one_line(err)})") from err
    return out


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def strict_json(obj: Any) -> Any:
    """``obj`` (dicts, lists, tuples, scalars, numpy values, paths) as strict-JSON-able values:
    numpy values and paths converted, every NaN or ±Inf float made None (JSON ``null``), which
    readers take as "undefined"."""
    if isinstance(obj, Mapping):
        return {key: strict_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(value) for value in obj]
    if isinstance(obj, (np.ndarray, np.generic, Path)):
        return strict_json(_to_jsonable(obj))
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (RFC 8259: no bare NaN or Infinity) atomically,
    after :func:`strict_json` (NaN/Inf -> null; numpy values and paths converted)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(strict_json(obj), indent=2, default=_to_jsonable, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, raising :class:`CaseError` naming the file when it is missing or malformed."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise CaseError(f"{path}: file not found") from err
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CaseError(f"{path}: unreadable JSON ({one_line(err)})") from err


def load_nifti(path: str | os.PathLike, dtype: type | None = np.float32) -> Image:
    """Load a 3-D NIfTI, checking it is readable, 3-D and finite.

    A trailing singleton 4th axis is dropped; a real 4-D series is an error. The data is cast
    to ``dtype`` (float32 for images); ``None`` keeps the stored type (after nibabel's scaling),
    cheapest for masks, whose labels :func:`strokeseg.core.geometry.as_binary_mask` then checks.
    The array is in nibabel's memory order (Fortran for most files). Raises :class:`CaseError`
    naming the file.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError as err:
        raise CaseError(f"{path}: file not found") from err
    except Exception as err:  # nibabel raises many types for corrupt/truncated files
        raise CaseError(f"{path}: unreadable NIfTI ({one_line(err)})") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(f"{path}: expected a 3-D volume, got shape {tuple(data.shape)}")
    if min(data.shape) < 2:
        raise CaseError(f"{path}: shape {tuple(data.shape)} is not a volume (fewer than 2 voxels along an axis)")
    if data.dtype.fields is not None or data.dtype.kind not in "biuf":
        kind = "RGB" if data.dtype.fields is not None else "complex" if data.dtype.kind == "c" else "non-numeric"
        raise CaseError(f"{path}: {kind} voxel type {data.dtype}; expected one scalar intensity per voxel")
    data = np.asarray(data, dtype=dtype)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int(np.size(data) - np.isfinite(data).sum())
        raise CaseError(f"{path}: {bad} NaN/Inf voxel(s)")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Image(data=data, affine=np.asarray(img.affine, dtype=np.float64), zooms=zooms, path=path)


# An image whose non-zero voxels are fewer than this fraction of the volume holds no usable anatomy.
MIN_IMAGE_FOREGROUND = 0.001


def check_image_content(volume: Image) -> Image:
    """Refuse an intensity image without content: constant (all zero included) or with fewer
    non-zero voxels than ``MIN_IMAGE_FOREGROUND`` of the volume. Returns ``volume``; raises
    :class:`CaseError` naming the file."""
    data = volume.data
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise CaseError(f"{volume.path}: constant image (every voxel is {low:g}): no image content")
    nonzero = int(np.count_nonzero(data))
    if nonzero < MIN_IMAGE_FOREGROUND * data.size:
        raise CaseError(f"{volume.path}: near-empty image ({nonzero} non-zero of {data.size} voxels)")
    return volume


def load_image(path: str | os.PathLike) -> Image:
    """:func:`load_nifti` as float32, then :func:`check_image_content` (for intensity images,
    never masks: a lesion mask may be empty)."""
    return check_image_content(load_nifti(path))


def walk_files(root: str | os.PathLike) -> list[Path]:
    """Every regular file under ``root``, following symbolic links to folders (each real folder
    is visited once, so a link loop ends), sorted; names starting with "." are skipped (the
    temporary files of atomic writes, hidden files)."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, subdirs, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            subdirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(Path(folder, name) for name in files if not name.startswith(".") and os.path.isfile(os.path.join(folder, name)))
    return sorted(found)


def glob_regex(pattern: str, capture: bool = False, ignore_case: bool = False) -> re.Pattern[str]:
    """A glob pattern (``**/`` any folders, ``*`` and ``?`` within one name, ``[...]`` sets) as a
    regular expression matching a whole relative POSIX path; with ``capture`` each ``*`` is a
    group (what it matched), with ``ignore_case`` letter case is ignored."""
    parts = re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]+\])", pattern)
    body = "".join("([^/]*)" if capture and part == "*" else _glob_token(part) for part in parts)
    return re.compile(body + r"\Z", re.IGNORECASE if ignore_case else 0)


def _glob_token(part: str) -> str:
    tokens = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    if part in tokens:
        return tokens[part]
    if part.startswith("[") and part.endswith("]") and len(part) > 2:
        body = part[1:-1]
        return "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
    return re.escape(part)


def glob_files(root: str | os.PathLike, pattern: str) -> list[Path]:
    """Files under ``root`` whose path relative to it matches the glob ``pattern`` (``**``
    spans folders), like ``Path.glob`` but following symbolic links to folders (see
    :func:`walk_files`)."""
    regex = glob_regex(pattern)
    root = Path(root)
    return [p for p in walk_files(root) if regex.match(p.relative_to(root).as_posix())]


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> None:
    """Write a 3-D array (X, Y, Z) with its (4, 4) affine as NIfTI-1, atomically;
    gzip-compressed when ``path`` ends in ``.gz``.

    Without ``header`` qform and sform are the affine (code 1). With the header of the image the
    array lies on (e.g. a prediction on its source's grid) the output keeps that header's
    geometry (qform, sform and their codes, units) and takes the dtype of ``data``, unscaled.
    """
    array = np.asarray(data)
    if header is None:
        img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    else:
        img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64), header=nib.Nifti1Header.from_header(header))
        img.set_data_dtype(array.dtype)
        img.header.set_slope_inter(1.0, 0.0)
    payload = img.to_bytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def affines_match(a: np.ndarray, b: np.ndarray, atol: float = 1e-3) -> bool:
    """True when two (4, 4) affines agree element-wise within ``atol`` (mm)."""
    return bool(np.allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0.0))


def check_same_grid(reference: Image, name: str, others: Sequence[Image]) -> None:
    """The door check of every preprocessing stage: each of ``others`` has the shape of
    ``reference`` (called ``name`` in messages, e.g. "DWI") and its affine within 1e-3 mm
    (qform/sform codes may differ). Raises :class:`CaseError` naming the other file."""
    for other in others:
        if other.data.shape != reference.data.shape:
            raise CaseError(f"{other.path}: shape {other.data.shape} differs from {name} {reference.data.shape}")
        if not affines_match(other.affine, reference.affine):
            raise CaseError(f"{other.path}: affine differs from the {name}'s by more than 1e-3")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in (DataLoader worker process \d+)\.\s*\nOriginal Traceback", re.MULTILINE)


def one_line(err: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its type name if empty.

    An error re-raised from a DataLoader worker carries the worker's whole traceback in its
    message; only the original error's last line is kept, with the worker named.
    """
    text = str(err)
    worker = _WORKER_TRACEBACK.match(text)
    if worker:
        last = text.strip().splitlines()[-1]
        text = f"{last.split(': ', 1)[-1]} (in {worker.group(1)})"
    return " ".join(text.split()) or type(err).__name__


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (64 hex digits): what identifies an input whatever its name,
    place or modification time. Raises CaseError naming ``path`` when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise CaseError(f"{path}: cannot read ({err.strerror or one_line(err)})") from err
    return digest.hexdigest()


def write_csv(path: str | Path, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts) to ``path`` with a header of ``columns``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def file_fingerprints(paths: Iterable[str | os.PathLike]) -> dict[str, list[int] | None]:
    """Absolute path (links resolved, so ``runs/a`` and ``./runs/a/`` are one file) -> [size
    in bytes, modification time in ns], None for a missing file: what
    identifies the files a run read (a retrained fold, a re-preprocessed case or a
    rebuilt splits file changes them)."""
    fingerprints: dict[str, list[int] | None] = {}
    for path in sorted({str(Path(p).resolve()) for p in paths}):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            fingerprints[path] = None
            continue
        fingerprints[path] = [stat.st_size, stat.st_mtime_ns]
    return fingerprints


def changed_inputs(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The paths added, removed or changed between two :func:`file_fingerprints`, sorted."""
    return sorted(path for path in set(recorded) | set(current) if recorded.get(path) != current.get(path))
