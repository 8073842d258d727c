"""Benchmark: backend_common workers vs Dynamo's own behind the real frontend (``python -m bench``)."""
