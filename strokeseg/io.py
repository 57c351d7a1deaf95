"""File I/O shared by every stage: atomic writes, pickle-free .npz/JSON, validated NIfTI.

Every writer goes through :func:`atomic_path`, so a crash or ``kill -9`` leaves either the old
file or the complete new one, never a half-written file. Readers refuse pickled content.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np

__all__ = [
    "CaseError",
    "NiftiVolume",
    "atomic_path",
    "save_npz",
    "load_npz",
    "load_npz_mmap",
    "NotMemoryMappable",
    "check_finite",
    "write_json",
    "write_text",
    "read_json",
    "load_nifti",
    "save_nifti",
    "affines_match",
    "check_same_grid",
    "one_line",
]


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest zip timestamp: fixed, so outputs are reproducible


class CaseError(ValueError):
    """Bad input for one case; the message is one line naming the file and the problem."""


class NotMemoryMappable(CaseError):
    """An .npz member that :func:`load_npz_mmap` cannot map (stored compressed): decode it instead."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name is ``.<name>.<random>.partial``: hidden and without the output's suffix,
    so a file left behind by ``kill -9`` never matches a later stage's ``*.npz`` or ``*.json``
    glob. Writers must therefore not infer the format from the name (pass it explicitly).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from a shared group
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


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
                version = np.lib.format.read_magic(raw)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically; numpy values and paths are converted."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_to_jsonable, allow_nan=True) + "\n")


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


@dataclass(frozen=True)
class NiftiVolume:
    """A 3-D volume in array axis order (X, Y, Z).

    data: float32 or the stored integer dtype (see :func:`load_nifti`); affine: (4, 4) float64
    voxel-to-world (RAS, mm); zooms: (3,) voxel spacing in mm, array axis order.
    """

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]
    path: Path

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (product of zooms in mm / 1000)."""
        return float(np.prod(self.zooms)) / 1000.0


def load_nifti(path: str | os.PathLike, dtype: type | None = np.float32) -> NiftiVolume:
    """Load a 3-D NIfTI, checking it is readable, 3-D and finite.

    A trailing singleton 4th axis is dropped; a real 4-D series is an error. The data is cast
    to ``dtype`` (float32 for images); ``None`` keeps the stored type (after nibabel's scaling),
    cheapest for masks, whose labels :func:`strokeseg.geometry.as_binary_mask` then checks.
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
    data = np.asarray(data, dtype=dtype)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int(np.size(data) - np.isfinite(data).sum())
        raise CaseError(f"{path}: {bad} NaN/Inf voxel(s)")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return NiftiVolume(data=data, affine=np.asarray(img.affine, dtype=np.float64), zooms=zooms, path=path)


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


def check_same_grid(reference: NiftiVolume, name: str, others: Sequence[NiftiVolume]) -> None:
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


def one_line(err: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its type name if empty."""
    return " ".join(str(err).split()) or type(err).__name__
