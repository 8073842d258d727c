"""pytest plugin (``-p dynamo_alias_plugin``): Dynamo's module names resolve to dynamo_compat.

Loaded before collection by the subprocess that runs Dynamo 1.6.1's own backend unit tests
(``runtime/test_dynamo_compat_upstream.py``); ``DYNAMO_BACKEND_DIR`` is the wheel's
``dynamo/common/backend`` directory, where the sample engines are found.
"""

from __future__ import annotations

import os

from backend_common.dynamo_compat import aliases

aliases.install([os.environ["DYNAMO_BACKEND_DIR"]])
