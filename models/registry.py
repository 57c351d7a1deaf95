"""The architecture registry: one :class:`ArchSpec` per network, looked up by its one name.

The name is used on the command line (``--arch resnet18``), in checkpoints (``model_config
["arch"]``) and in logs. Everything else about an architecture is read from its spec: the config
dataclass (whose fields are the model config keys and, except those the training script sets,
the command-line model flags with their defaults), the network class, the paper's training patch
edge and whether the network runs only at its training input size. Add a network with
:func:`register_arch` (the built-in three are registered below); nothing else in the repository
names an architecture.

Checkpoints written before the registry call the ResNet-18 U-Net ``resnet18_unet``; they load
through :data:`FORMER_NAMES`, the one place that knows the old name.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from torch import nn

from .resenc_unet import ResEncUNet, ResEncUNetConfig
from .resnet_unet import ResNetUNet, ResNetUNetConfig
from .uctransnet3d import UCTransNet3D, UCTransNet3DConfig

__all__ = [
    "ArchSpec",
    "FORMER_NAMES",
    "SCRIPT_FIELDS",
    "register_arch",
    "arch_spec",
    "arch_names",
    "arch_of_network",
    "canonical_arch",
]

# Config fields a training script derives from its data (input channels, classes, the ISLES
# strategy), never command-line model flags.
SCRIPT_FIELDS = ("in_channels", "num_classes", "variant")
# Old name in checkpoints -> registry name.
FORMER_NAMES = {"resnet18_unet": "resnet18"}


@dataclass(frozen=True)
class ArchSpec:
    """One architecture.

    name: the one name (CLI, checkpoints). config_cls: a frozen dataclass whose fields (with
    defaults) are the model config; network_cls: ``network_cls(config)`` builds the network,
    which follows the contract of :mod:`models.common`. default_patch: the paper's cubic
    training patch edge in voxels. fixed_input_size: the network runs only on inputs of its
    config's ``patch_size`` (e.g. a learned position embedding); such a config must have a
    ``patch_size`` field, which is then also the training patch and the inference window, and
    pretrained weights transfer only between equal patch sizes. transfer_scope: what a pretrained
    checkpoint of it gives by default ("encoder": the encoder(s) only; "all": every tensor).
    downsampling: how many input voxels per axis make one voxel of the network's coarsest
    feature grid (1: none or unknown); the brain crop aligns its windows to this grid's phase
    (:func:`strokeseg.inference.sliding_window.crop_alignment`).
    """

    name: str
    config_cls: type
    network_cls: type[nn.Module]
    default_patch: int
    fixed_input_size: bool = False
    transfer_scope: str = "encoder"
    downsampling: int = 1

    def __post_init__(self) -> None:
        names = {f.name for f in fields(self.config_cls)}
        missing = sorted({"in_channels", "norm"} - names)
        if missing:
            raise ValueError(f"architecture {self.name!r}: config {self.config_cls.__name__} lacks field(s) {missing}")
        if not (isinstance(self.downsampling, int) and self.downsampling >= 1):
            raise ValueError(f"architecture {self.name!r}: downsampling must be an int >= 1, got {self.downsampling!r}")
        if self.fixed_input_size and "patch_size" not in names:
            raise ValueError(f"architecture {self.name!r} has a fixed input size but its config has no 'patch_size' field")

    def defaults(self) -> dict[str, Any]:
        """The config dataclass's defaults as a dict (fields without a default are left out)."""
        return {f.name: f.default for f in fields(self.config_cls) if f.default is not MISSING}

    def flag_fields(self) -> tuple[str, ...]:
        """Config fields offered as command-line model flags: all but :data:`SCRIPT_FIELDS`;
        ``patch_size`` is the training script's ``--patch-size``."""
        return tuple(f.name for f in fields(self.config_cls) if f.name not in SCRIPT_FIELDS)


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to the registry (a name or network class registered twice is an error)."""
    if spec.name in _ARCHS or spec.name in FORMER_NAMES:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    if any(other.network_cls is spec.network_cls for other in _ARCHS.values()):
        raise ValueError(f"network class {spec.network_cls.__name__} is already registered")
    _ARCHS[spec.name] = spec
    return spec


def canonical_arch(name: object) -> object:
    """``name`` with a former checkpoint name replaced by the registry name (else unchanged)."""
    return FORMER_NAMES.get(name, name) if isinstance(name, str) else name


def arch_spec(name: str) -> ArchSpec:
    """The spec registered as ``name`` (or its former checkpoint name); an unknown name is a
    ValueError listing the known ones."""
    spec = _ARCHS.get(canonical_arch(name))  # type: ignore[arg-type]
    if spec is None:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(arch_names())}")
    return spec


def arch_names() -> tuple[str, ...]:
    """Registered architecture names, in registration order."""
    return tuple(_ARCHS)


def arch_of_network(net: nn.Module) -> ArchSpec:
    """The spec whose network class built ``net`` (an unwrapped network)."""
    for spec in _ARCHS.values():
        if type(net) is spec.network_cls:
            return spec
    raise ValueError(f"{type(net).__name__} is not a registered architecture's network ({', '.join(arch_names())})")


register_arch(ArchSpec("resnet18", ResNetUNetConfig, ResNetUNet, default_patch=96, downsampling=32))
# The paper's code transfers the whole UCTransNet3D (CNN encoder, channel transformer, decoder, head).
register_arch(ArchSpec("uctransnet3d", UCTransNet3DConfig, UCTransNet3D, default_patch=64, fixed_input_size=True, transfer_scope="all", downsampling=16))
register_arch(ArchSpec("resenc_unet", ResEncUNetConfig, ResEncUNet, default_patch=96, downsampling=32))
