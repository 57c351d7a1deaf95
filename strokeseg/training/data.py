"""Training data: deterministic patch sampling from memory-mapped volumes, sharded per rank.

Determinism (exact resume, any number of DataLoader workers or ranks):

- An epoch holds ``samples_per_case`` samples of every training case; sample id
  ``s = case_index * samples_per_case + slot``. :func:`epoch_order` permutes the ids with a
  generator seeded by (seed, epoch) only, :func:`rank_slice` gives each rank a disjoint slice.
- Each case has fixed pools of candidate patch centres (:func:`centre_pools`: up to
  ``POOL_SIZE`` distinct lesion-centred and brain-centred windows, drawn once from a generator
  seeded by (seed, case_index), plus the centres of its pre-extracted patches). A case's
  samples of one epoch pick from the pools with a generator seeded by (seed, epoch,
  case_index) (:func:`case_plan`); the augmentation of sample ``s`` uses (seed, epoch, s).
- The sampler yields ``(epoch, s)`` keys, so what a worker returns depends on the key alone,
  not on which worker computed it or what it computed before.

Throughput: full volumes are memory-mapped when their .npz members are stored uncompressed
(:func:`strokeseg.core.io.load_npz_mmap`: a 96³ patch touches only its own pages); compressed files
are decompressed once and kept in a small per-worker LRU cache. The epoch order keeps the
samples of ``chunk_cases`` cases together (shuffled among themselves), so a worker reuses a
cached volume for several patches instead of decoding one file per patch. The pools cost one
pass over the masks per case and worker for the whole run (not one per epoch), and cutting a
patch is a single strided copy.
"""
from __future__ import annotations

import signal
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.io import CaseError, NotMemoryMappable, check_finite, load_npz, load_npz_mmap, npz_shapes
from ..inference.inferer import sample_shape
from .augment import AugmentConfig, augment_sample
from .patches import extract_patch, lesion_centers, random_centers, tissue_centers

__all__ = [
    "CaseFiles",
    "SampleMix",
    "VolumeCache",
    "open_npz",
    "find_case_files",
    "load_case_volume",
    "epoch_order",
    "rank_slice",
    "POOL_SIZE",
    "centre_pools",
    "case_plan",
    "read_stored_centres",
    "TrainingSet",
    "EpochSampler",
    "SharedBatches",
    "BatchLoader",
]

# Generator keys are [seed, epoch, stream, index]: one independent stream per purpose.
_ORDER_STREAM, _CASE_STREAM, _SAMPLE_STREAM, _POOL_STREAM = 0, 1, 2, 3


@dataclass(frozen=True)
class CaseFiles:
    """Where one case's arrays live.

    path: full-volume .npz; image_keys: members stacked as channels (C, X, Y, Z) float32;
    mask_key: lesion mask member (X, Y, Z), {0, 1}; brain_key: optional brain mask member that
    random patches are centred in; patch_path: optional .npz of pre-extracted patches from
    extract_patches_96x96x96.py (only its ``centers`` (N, 3) member is read).
    """

    case_id: str
    path: Path
    image_keys: tuple[str, ...]
    mask_key: str
    brain_key: str | None = None
    patch_path: Path | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return self.image_keys + (self.mask_key,) + ((self.brain_key,) if self.brain_key else ())


@dataclass(frozen=True)
class SampleMix:
    """How each case's ``samples_per_case`` samples of an epoch are drawn.

    lesion: centred on the lesion (:func:`strokeseg.training.patches.lesion_centers`; random when the
    mask is empty); stored: one of the case's pre-extracted patches (random when it has none);
    random: anywhere in the brain mask (or the volume without one). When the patch covers the
    whole volume every sample is the whole volume and the split does not matter.
    """

    lesion: int = 0
    stored: int = 0
    random: int = 1

    def __post_init__(self) -> None:
        if min(self.lesion, self.stored, self.random) < 0 or self.total < 1:
            raise ValueError(f"sample counts must be >= 0 with a positive total, got {self}")

    @property
    def total(self) -> int:
        return self.lesion + self.stored + self.random

    @staticmethod
    def from_fraction(total: int, fraction: float, kind: str) -> "SampleMix":
        """``round(total * fraction)`` samples of ``kind`` ('lesion' | 'stored'), the rest random."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        if kind not in ("lesion", "stored"):
            raise ValueError(f"kind must be 'lesion' or 'stored', got {kind!r}")
        share = int(round(total * fraction))
        return SampleMix(**{kind: share, "random": total - share})


def open_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Members ``keys`` of an .npz: memory-mapped when stored uncompressed, else decoded once.

    Either way the members are checked: CRC-32 (zip's own check when decoding; once per process
    and file for mapped members) and floating-point members finite. Raises :class:`CaseError`
    naming the file when it is missing, unreadable, corrupt, lacks a key or holds NaN/Inf.
    """
    try:
        return load_npz_mmap(path, keys)
    except NotMemoryMappable:
        arrays = load_npz(path, keys)
        check_finite(path, arrays)
        return arrays


class VolumeCache:
    """Least-recently-used cache of :func:`open_npz` results, keyed by path (one per worker).

    Memory-mapped entries cost an open file each; decoded ones their full size, so keep
    ``max_items`` about the number of cases whose samples are interleaved (``chunk_cases``).
    """

    def __init__(self, max_items: int):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.max_items = max_items
        self._items: OrderedDict[tuple[Path, tuple[str, ...]], dict[str, np.ndarray]] = OrderedDict()

    def get(self, path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        key = (path, keys)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        arrays = open_npz(path, keys)
        self._items[key] = arrays
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return arrays


def find_case_files(
    directory: Path,
    case_ids: Sequence[str],
    image_keys: tuple[str, ...],
    mask_key: str,
    brain_key: str | None = None,
    patch_dir: Path | None = None,
) -> list[CaseFiles]:
    """``<directory>/<case>.npz`` (and ``<patch_dir>/<case>.npz``) for every case id, in order.

    Raises :class:`CaseError` listing the missing files (a split naming cases that were never
    preprocessed is an error, not a silent skip).
    """
    cases = [
        CaseFiles(
            case_id=c,
            path=Path(directory) / f"{c}.npz",
            image_keys=image_keys,
            mask_key=mask_key,
            brain_key=brain_key,
            patch_path=Path(patch_dir) / f"{c}.npz" if patch_dir is not None else None,
        )
        for c in case_ids
    ]
    missing = [str(p) for case in cases for p in (case.path, case.patch_path) if p is not None and not p.is_file()]
    if missing:
        raise CaseError(f"{len(missing)} input file(s) missing, e.g. {missing[:3]}")
    return cases


def _check_shapes(case: CaseFiles, arrays: dict[str, np.ndarray]) -> tuple[int, int, int]:
    shapes = {k: tuple(arrays[k].shape) for k in case.keys}
    first = shapes[case.mask_key]
    if len(first) != 3 or any(s != first for s in shapes.values()):
        raise CaseError(f"{case.path}: members must share one 3-D shape, got {shapes}")
    return first  # type: ignore[return-value]


def load_case_volume(case: CaseFiles) -> tuple[np.ndarray, np.ndarray]:
    """A whole case for validation: image float32 (C, X, Y, Z) and lesion mask bool (X, Y, Z)."""
    arrays = open_npz(case.path, case.image_keys + (case.mask_key,))
    _check_shapes(CaseFiles(case.case_id, case.path, case.image_keys, case.mask_key), arrays)
    image = np.stack([np.asarray(arrays[k], dtype=np.float32) for k in case.image_keys])
    return image, np.asarray(arrays[case.mask_key]) > 0




def epoch_order(n_cases: int, per_case: int, seed: int, epoch: int, chunk_cases: int) -> np.ndarray:
    """Sample ids of one epoch in training order, int64 (n_cases * per_case,).

    Cases are permuted, cut into chunks of ``chunk_cases`` cases, and each chunk's samples are
    permuted among themselves. A pure function of its arguments.
    """
    if chunk_cases < 1:
        raise ValueError(f"chunk_cases must be >= 1, got {chunk_cases}")
    rng = np.random.default_rng([seed, epoch, _ORDER_STREAM, 0])
    cases = rng.permutation(n_cases)
    chunks = []
    for start in range(0, n_cases, chunk_cases):
        ids = (cases[start : start + chunk_cases, None] * per_case + np.arange(per_case)).ravel()
        chunks.append(rng.permutation(ids))
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, dtype=np.int64)


def rank_slice(order: np.ndarray, rank: int, world_size: int, batch_size: int = 1) -> np.ndarray:
    """Rank ``rank``'s share of an epoch: ``order`` wrapped around to a multiple of
    ``world_size * batch_size`` (the first ids repeat, as DistributedSampler pads), then every
    ``world_size``-th id from ``rank``. Shares are disjoint apart from the padded ids, equally
    long on all ranks, and split into whole batches (BatchNorm never sees a batch of one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    unit = world_size * batch_size
    padded = -(-len(order) // unit) * unit
    return np.resize(order, padded)[rank::world_size]


POOL_SIZE = 1024  # candidate centres per case and kind (lesion, brain), drawn once per run


def centre_pools(case: CaseFiles, arrays: dict[str, np.ndarray], patch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A case's candidate patch centres, int64 (N, 3) voxel indices of windows inside the volume.

    'lesion': up to POOL_SIZE distinct windows centred on lesion voxels
    (:func:`strokeseg.training.patches.lesion_centers`; empty for a lesion-free case); 'random': up to
    POOL_SIZE distinct windows centred on brain-mask voxels (:func:`tissue_centers`), or
    anywhere in the volume without a brain mask (:func:`random_centers`).
    """
    shape = _check_shapes(case, arrays)
    mask = np.asarray(arrays[case.mask_key])
    lesion = lesion_centers(mask, POOL_SIZE, patch_size, 0.0, rng)[0] if mask.any() else np.zeros((0, 3), np.int64)
    if case.brain_key:
        brain = np.asarray(arrays[case.brain_key])
        if not brain.any():
            raise CaseError(f"{case.path}: {case.brain_key!r} is empty, nowhere to centre random patches")
        random = tissue_centers(brain, POOL_SIZE, patch_size, rng)
    else:
        random = random_centers(shape, POOL_SIZE, patch_size, rng)
    return {"lesion": np.asarray(lesion, dtype=np.int64), "random": np.asarray(random, dtype=np.int64)}


def _pick(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return pool[rng.choice(len(pool), size=n, replace=n > len(pool))]


def case_plan(pools: dict[str, np.ndarray], stored_centres: np.ndarray | None, mix: SampleMix, rng: np.random.Generator) -> np.ndarray:
    """Patch centres of one case's samples in one epoch: int64 (mix.total, 3) in slot order
    (lesion, stored, random), picked from :func:`centre_pools` and the stored patch centres.
    Lesion slots of a lesion-free case and stored slots of a case without stored patches pick
    from the random pool."""
    n_random = mix.random
    parts = []
    if mix.lesion:
        if len(pools["lesion"]):
            parts.append(_pick(pools["lesion"], mix.lesion, rng))
        else:
            n_random += mix.lesion
    if mix.stored:
        if stored_centres is not None and len(stored_centres):
            parts.append(_pick(stored_centres, mix.stored, rng))
        else:
            n_random += mix.stored
    if n_random:
        parts.append(_pick(pools["random"], n_random, rng))
    return np.concatenate(parts)


def read_stored_centres(case: CaseFiles) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """Centres (N, 3) int64 of a case's pre-extracted patches and the full-volume shape they
    index (``centers`` and ``original_shape`` of its patch file), None without a patch file.
    Only these small members are read: the patches are cut again from the full volume, which
    by the patch stage's contract gives the same arrays."""
    if case.patch_path is None:
        return None
    stored = load_npz(case.patch_path, keys=("centers", "original_shape"))
    centres = stored["centers"]
    if centres.ndim != 2 or centres.shape[1] != 3:
        raise CaseError(f"{case.patch_path}: 'centers' must be (N, 3), got {centres.shape}")
    return centres.astype(np.int64), tuple(int(v) for v in stored["original_shape"])


class TrainingSet(Dataset):
    """Training samples keyed by ``(epoch, sample_id)`` (see the module docstring).

    ``dataset[(epoch, s)]`` → (image float32 tensor (C, P, P, P), mask uint8 tensor (P, P, P)),
    P = ``patch_size``, or the whole volume (C, X, Y, Z) when the patch covers it. Stored
    patches are re-cut from the full volume at their recorded centres (same P required).
    """

    def __init__(
        self,
        cases: Sequence[CaseFiles],
        patch_size: int,
        mix: SampleMix,
        augment: AugmentConfig | None,
        seed: int,
        chunk_cases: int = 8,
    ):
        if not cases:
            raise ValueError("no training cases")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.cases = list(cases)
        self.patch_size = patch_size
        self.mix = mix
        self.augment = augment
        self.seed = seed
        self.chunk_cases = chunk_cases
        self.stored = [read_stored_centres(c) if mix.stored else None for c in self.cases]
        if mix.stored and all(s is None or len(s[0]) == 0 for s in self.stored):
            raise ValueError("stored patches requested but no case has pre-extracted patches")
        self._volumes = VolumeCache(chunk_cases)
        self._pools: dict[int, dict[str, np.ndarray] | None] = {}  # per worker, kept for the run (small)

    @property
    def samples_per_case(self) -> int:
        return self.mix.total

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def describe(self) -> dict:
        """What determines the samples (stored in checkpoints; a resume must match it)."""
        return {
            "cases": [c.case_id for c in self.cases],
            "patch_size": self.patch_size,
            "mix": [self.mix.lesion, self.mix.stored, self.mix.random],
            "augment": None if self.augment is None else dict(vars(self.augment)),
            "seed": self.seed,
            "chunk_cases": self.chunk_cases,
            "pool_size": POOL_SIZE,
        }

    def sample_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one sample: image (C, P, P, P) and mask (P, P, P), or the first case's
        whole-volume shapes when the patch covers it. Raises :class:`CaseError` naming both
        files when another case's samples would have another shape (volumes of mixed shapes
        not larger than the patch cannot share a batch)."""
        case = self.cases[0]
        arrays = open_npz(case.path, case.keys)
        shape = _check_shapes(case, arrays)
        spatial = sample_shape(self.patch_size, shape)
        for other in self.cases[1:]:
            other_shape = npz_shapes(other.path, (other.mask_key,))[other.mask_key]
            if sample_shape(self.patch_size, other_shape) != spatial:
                raise CaseError(
                    f"{other.path}: volume shape {other_shape} differs from {shape} of {case.path}, and the patch "
                    f"{self.patch_size} covers one of them whole: preprocess every case to one --target-shape"
                )
        return (len(case.image_keys), *spatial), spatial

    def _case_pools(self, case_index: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The case's centre pools (None when the patch covers the whole volume), computed on
        first use in this process and kept."""
        if case_index not in self._pools:
            case = self.cases[case_index]
            shape = _check_shapes(case, arrays)
            whole = sample_shape(self.patch_size, shape) == shape
            stored = self.stored[case_index]
            if stored is not None and stored[1] != shape:
                raise CaseError(f"{case.patch_path}: patches cut from a {stored[1]} volume, but {case.path} is {shape}")
            rng = np.random.default_rng([self.seed, 0, _POOL_STREAM, case_index])
            self._pools[case_index] = None if whole else centre_pools(case, arrays, self.patch_size, rng)
        return self._pools[case_index]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.sample(key)
        return torch.from_numpy(np.array(image, order="C")), torch.from_numpy(np.array(mask, order="C"))

    def sample(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``key`` = (epoch, sample_id) as numpy arrays, image float32 (C, P, P, P) and
        mask uint8 (P, P, P); possibly read-only or negative-stride views (copy before writing)."""
        epoch, sample_id = int(key[0]), int(key[1])
        case_index, slot = divmod(sample_id, self.samples_per_case)
        case = self.cases[case_index]
        arrays = self._volumes.get(case.path, case.keys)
        pools = self._case_pools(case_index, arrays)
        if pools is None:
            channels = [np.asarray(arrays[k], dtype=np.float32) for k in case.image_keys]
            image = channels[0][None] if len(channels) == 1 else np.stack(channels)  # a view when possible
            mask = np.asarray(arrays[case.mask_key], dtype=np.uint8)
        else:
            rng = np.random.default_rng([self.seed, epoch, _CASE_STREAM, case_index])
            stored = self.stored[case_index]
            centre = case_plan(pools, None if stored is None else stored[0], self.mix, rng)[slot]
            p = self.patch_size
            channels = [extract_patch(arrays[k], centre, p).astype(np.float32, copy=False) for k in case.image_keys]
            image = channels[0][None] if len(channels) == 1 else np.stack(channels)  # one copy only
            mask = extract_patch(arrays[case.mask_key], centre, p).astype(np.uint8, copy=False)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, _SAMPLE_STREAM, sample_id])
            image, mask = augment_sample(image, mask, self.augment, rng)
        return image, mask


class EpochSampler(Sampler):
    """Yields this rank's ``(epoch, sample_id)`` keys of the current epoch, in training order.

    :meth:`set_epoch` picks the epoch and how many of this rank's samples to skip (a resumed
    epoch skips the batches already trained on: ``skip = steps_done * batch_size``). Iterated
    in the main process, so persistent workers see every epoch change.
    """

    def __init__(self, dataset: TrainingSet, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.case_ids = [case.case_id for case in dataset.cases]
        self.n_cases = len(dataset.cases)
        self.per_case = dataset.samples_per_case
        self.chunk_cases = dataset.chunk_cases
        self.seed, self.batch_size, self.rank, self.world_size = dataset.seed, batch_size, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def per_rank(self) -> int:
        """Samples per rank in a whole epoch: whole batches, the same on every rank."""
        unit = self.world_size * self.batch_size
        return -(-self.n_cases * self.per_case // unit) * self.batch_size

    def __len__(self) -> int:
        return max(self.per_rank() - self.skip, 0)

    def _rank_order(self) -> np.ndarray:
        order = epoch_order(self.n_cases, self.per_case, self.seed, self.epoch, self.chunk_cases)
        return rank_slice(order, self.rank, self.world_size, self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for sample_id in self._rank_order()[self.skip :]:
            yield (self.epoch, int(sample_id))

    def batch_case_ids(self, step: int) -> list[str]:
        """Case ids (sorted, each once) of this rank's batch ``step`` (0-based) of the current epoch."""
        batch = self._rank_order()[step * self.batch_size : (step + 1) * self.batch_size]
        return sorted({self.case_ids[int(sample_id) // self.per_case] for sample_id in batch})


def _worker_init(worker_id: int) -> None:
    # SIGTERM and SIGUSR1 are the main process's preemption request: it saves last.pth and
    # shuts the workers down (a None on their index queue). SLURM's time limit and scancel
    # signal the whole process group; a worker killed by it would take the step with it.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)  # parallelism comes from the workers


_PREFETCH = 2  # batches in flight per worker (DataLoader prefetch_factor)


class SharedBatches:
    """Batch buffers in shared memory, allocated once: a ring of ``slots_per_worker`` slots
    per worker. A worker writes a batch into its next slot and sends only (slot, n, stamp).

    Why: the default DataLoader path allocates fresh shared memory for every batch; at 96³
    (14 MB per batch of 4) its page faults cost more than cutting the patches (measured on 2
    cores: ~150 batches/s of trivial data, against thousands with reused buffers).

    Safety: the DataLoader (in order) sends a worker a new task only when a batch is handed to
    the loop, so a worker is at most ``prefetch`` batches ahead of the one in use; with
    ``prefetch + 2`` slots it never writes the slot being used. A stamp per slot (-1 while being
    written) is checked when a batch is handed out and again when the loop asks for the next
    one: any overwrite raises instead of training on mixed data.
    """

    def __init__(self, workers: int, batch_size: int, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]):
        self.slots_per_worker = _PREFETCH + 2
        n = workers * self.slots_per_worker
        self.images = torch.zeros((n, batch_size, *image_shape), dtype=torch.float32).share_memory_()
        self.masks = torch.zeros((n, batch_size, *mask_shape), dtype=torch.uint8).share_memory_()
        self.stamps = torch.full((n,), -1, dtype=torch.int64).share_memory_()

    def check(self, slot: int, stamp: int) -> None:
        if int(self.stamps[slot]) != stamp:
            raise RuntimeError(f"batch buffer {slot} was overwritten while in use (stamp {int(self.stamps[slot])}, expected {stamp})")


class _SlotFiller(Dataset):
    """Worker side: builds a whole batch of ``dataset`` samples into a :class:`SharedBatches` slot."""

    def __init__(self, dataset: TrainingSet, buffers: SharedBatches):
        self.dataset, self.buffers = dataset, buffers
        self._count = 0  # batches written by this worker process

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, int]]) -> tuple[int, int, int]:
        info = torch.utils.data.get_worker_info()
        per_worker = self.buffers.slots_per_worker
        slot = (info.id if info else 0) * per_worker + self._count % per_worker
        stamp, self._count = self._count, self._count + 1
        self.buffers.stamps[slot] = -1
        for i, key in enumerate(keys):
            image, mask = self.dataset.sample(key)
            if tuple(image.shape) != tuple(self.buffers.images.shape[2:]):
                raise CaseError(
                    f"sample {key} has shape {tuple(image.shape)}, the batch buffers {tuple(self.buffers.images.shape[2:])}: "
                    "whole-volume training needs volumes of one shape"
                )
            np.copyto(self.buffers.images[slot, i].numpy(), image)  # also resolves flipped views
            np.copyto(self.buffers.masks[slot, i].numpy(), mask)
        self.buffers.stamps[slot] = stamp
        return slot, len(keys), stamp


def _as_is(batch: tuple[int, int, int]) -> tuple[int, int, int]:
    return batch


class BatchLoader:
    """Iterable of training batches: images float32 (B, C, P, P, P) and masks uint8 (B, P, P, P),
    in the sampler's order (whole batches: the sampler pads every epoch).

    With ``workers`` > 0 the batches are views of :class:`SharedBatches` slots, valid until the
    next batch is requested (copy them to the device, or finish the step, before that).
    """

    def __init__(self, dataset: TrainingSet, sampler: EpochSampler, workers: int):
        batch_size = sampler.batch_size
        self.buffers: SharedBatches | None = None
        image_shape, mask_shape = dataset.sample_shapes()  # checks that every case gives this shape
        if workers == 0:
            self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0)
            return
        self.buffers = SharedBatches(workers, batch_size, image_shape, mask_shape)
        self.loader = DataLoader(
            _SlotFiller(dataset, self.buffers),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=_as_is,
            persistent_workers=True,
            prefetch_factor=_PREFETCH,
            worker_init_fn=_worker_init,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.buffers is None:
            yield from self.loader
            return
        previous = None
        for slot, n, stamp in self.loader:
            if previous is not None:
                self.buffers.check(*previous)  # the batch just used was intact until the end of its use
            self.buffers.check(slot, stamp)
            previous = (slot, stamp)
            yield self.buffers.images[slot, :n], self.buffers.masks[slot, :n]
