"""Networks for lesion segmentation: ResNet-18 U-Net, UCTransNet3D and a residual-encoder U-Net
(nnU-Net ResEnc); the ISLES input strategies over any encoder-decoder (:mod:`models.strategies`).

Architectures are looked up by name in the registry (:mod:`models.registry`:
:func:`register_arch`, :func:`arch_spec`, :func:`arch_names`).

Every network follows one contract (see :mod:`models.common`): ``model(x)`` maps
x (B, C_in, X, Y, Z) to a tuple of per-head logits (B, num_classes, X, Y, Z), and
:func:`foreground_probability` applies its inference rule. Build from a plain dict with
:func:`build_model`, persist with :func:`save_checkpoint` / :func:`model_from_checkpoint`,
transfer with :func:`load_pretrained`. ``python -m models`` lists every registered network with its parameter counts.
"""
from .common import NORMS, count_parameters, fold_batchnorm, foreground_probability, make_norm, prepare_for_inference, unwrap_model
from .factory import (
    DIGEST_KEY,
    FORMAT_VERSION,
    TransferReport,
    build_model,
    load_checkpoint,
    load_pretrained,
    model_config_defaults,
    model_config_of,
    model_from_checkpoint,
    resolve_model_config,
    save_checkpoint,
    weights_digest,
)
from .resenc_unet import ResEncUNet, ResEncUNetConfig
from .registry import ArchSpec, arch_names, arch_spec, register_arch
from .resnet_unet import VARIANTS, ResNetUNet, ResNetUNetConfig
from .strategies import ISLES_STRATEGIES, STRATEGIES
from .uctransnet3d import UCTransNet3D, UCTransNet3DConfig

__all__ = [
    "ArchSpec",
    "DIGEST_KEY",
    "FORMAT_VERSION",
    "NORMS",
    "ISLES_STRATEGIES",
    "STRATEGIES",
    "VARIANTS",
    "ResEncUNet",
    "ResEncUNetConfig",
    "ResNetUNet",
    "ResNetUNetConfig",
    "UCTransNet3D",
    "UCTransNet3DConfig",
    "TransferReport",
    "arch_names",
    "arch_spec",
    "build_model",
    "count_parameters",
    "fold_batchnorm",
    "foreground_probability",
    "load_checkpoint",
    "load_pretrained",
    "make_norm",
    "model_config_defaults",
    "model_config_of",
    "model_from_checkpoint",
    "prepare_for_inference",
    "register_arch",
    "resolve_model_config",
    "save_checkpoint",
    "unwrap_model",
    "weights_digest",
]
