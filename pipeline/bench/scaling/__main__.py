"""``python -m pipeline.bench.scaling``: weak scaling, predicted vs measured (see the package)."""

import sys

from pipeline.bench.scaling import main

sys.exit(main())
