"""``python -m strokeseg.ablation``: see :mod:`strokeseg.ablation`."""
import sys

from . import main

sys.exit(main())
