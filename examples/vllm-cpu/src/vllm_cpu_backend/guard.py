"""``ActiveRequests``, kept importable as ``from .guard import ActiveRequests``.

It lives in the runtime (``backend_common.guard``, exported as
``backend_common.ActiveRequests``) beside ``RequestGuard``. This module stays because
``engine.py`` is yours and ``copier update`` never rewrites it: an ``engine.py`` generated
before the move imports ``ActiveRequests`` from here and keeps working. New code imports it
from ``backend_common``.
"""

from backend_common import ActiveRequests

__all__ = ["ActiveRequests"]
