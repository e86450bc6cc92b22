"""``python -m devft_edge`` runs the CLI."""

import sys

from devft_edge.cli import main

sys.exit(main())
