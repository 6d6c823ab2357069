"""`python -m fluxc.cli train|eval|export ...` (what `torchrun -m fluxc.cli` runs)."""

from fluxc.cli import main

raise SystemExit(main())
