"""Print the parameter count of every network configuration, without a forward pass.

Example::

    python -m models                 # full width (64), UCTransNet3D at 64^3
    python -m models --width 32 --patch-size 96
"""
from __future__ import annotations

import argparse

import torch

from .common import count_parameters
from .factory import build_model
from .registry import arch_spec

CONFIGS = (
    ("resnet18 single / dwi_only (1 ch)", {"arch": "resnet18", "variant": "dwi_only"}),
    ("resnet18 separate (2 x 1 ch)", {"arch": "resnet18", "variant": "separate"}),
    ("resnet18 shared (2 ch, 2 decoders)", {"arch": "resnet18", "variant": "shared"}),
    ("uctransnet3d (1 ch)", {"arch": "uctransnet3d"}),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64, help="base width (channels of the first level), default 64")
    parser.add_argument(
        "--patch-size", type=int, default=64, help="input edge in voxels of the fixed-input-size networks (UCTransNet3D: divisible by 16; default 64)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"{'configuration':<42} {'parameters':>12} {'millions':>9}")
    for name, config in CONFIGS:
        config = {**config, "width": args.width}
        if arch_spec(config["arch"]).fixed_input_size:
            config["patch_size"] = args.patch_size
            name = f"{name} at {args.patch_size}^3"
        with torch.device("meta"):  # shapes only: no memory, no forward
            count = count_parameters(build_model(config))
        print(f"{name:<42} {count:>12,d} {count / 1e6:>8.2f}M")


if __name__ == "__main__":
    main()
