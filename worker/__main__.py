"""`python -m worker` is `tiktok-worker`."""

import sys

from worker.cli import main

sys.exit(main())
