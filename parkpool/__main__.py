# SPDX-License-Identifier: Apache-2.0
"""``python -m parkpool``: the same command line as the ``parkpool`` script."""

import sys

from parkpool.app.cli import main

sys.exit(main())
