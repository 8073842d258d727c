"""Benchmark of backend_common workers vs Dynamo's own behind the real frontend.

Run it with ``python -m bench`` (``make bench``); see ``bench/__main__.py``.
"""
