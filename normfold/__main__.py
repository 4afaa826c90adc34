"""`python -m normfold ...`: the same as the `normfold` command."""

import sys

from normfold.cli import main

sys.exit(main())
