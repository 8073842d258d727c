"""``python -m backend_common.args --markdown``: print the settings reference."""

import sys

from .reference import main

sys.exit(main())
