"""List every registered network with its parameter count, without a forward pass.

One row per registered architecture; an architecture that offers the ISLES strategies
(:mod:`models.strategies`: its config has a ``variant`` field) gets one row per strategy on two
modalities (one for 'single' / 'dwi_only').

Example::

    python -m models                 # every network at its default width, UCTransNet3D at 64^3
    python -m models --width 32 --patch-size 96
"""
from __future__ import annotations

import argparse
from dataclasses import fields

import torch

from .common import count_parameters
from .factory import build_model
from .registry import arch_names, arch_spec

# strategy -> (row label, config keys); 'dwi_only' is 'single' on one channel
_STRATEGY_ROWS = (
    ("single / dwi_only (1 ch)", {"variant": "single"}),
    ("separate (2 x 1 ch)", {"variant": "separate"}),
    ("shared (2 ch, 2 decoders)", {"variant": "shared"}),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=None, help="base width (channels of the first level); default each network's own")
    parser.add_argument(
        "--patch-size", type=int, default=64, help="input edge in voxels of the fixed-input-size networks (UCTransNet3D: divisible by 16; default 64)"
    )
    return parser.parse_args(argv)


def network_rows(width: int | None, patch_size: int) -> list[tuple[str, dict]]:
    """(label, model config) for every registered architecture, one per strategy where it has them."""
    rows = []
    for name in arch_names():
        spec = arch_spec(name)
        config = {"arch": name} if width is None else {"arch": name, "width": width}
        suffix = ""
        if spec.fixed_input_size:
            config["patch_size"] = patch_size
            suffix = f" at {patch_size}^3"
        if "variant" in {f.name for f in fields(spec.config_cls)}:
            rows += [(f"{name} {label}{suffix}", {**config, **extra}) for label, extra in _STRATEGY_ROWS]
        else:
            rows.append((f"{name} (1 ch){suffix}", config))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"{'configuration':<42} {'parameters':>12} {'millions':>9}")
    for label, config in network_rows(args.width, args.patch_size):
        with torch.device("meta"):  # shapes only: no memory, no forward
            count = count_parameters(build_model(config))
        print(f"{label:<42} {count:>12,d} {count / 1e6:>8.2f}M")


if __name__ == "__main__":
    main()
