"""`python -m nnvitals ...`: the same as the `nnvitals` command."""

import sys

from nnvitals.cli import main

sys.exit(main())
