"""A simulated inference engine (Dynamo's mocker architecture, in Python).

Modules, one concept each:

* ``args``: the mocker's CLI flags and ``MockerSettings``; ``build_engine``.
* ``kv_cache``: the KV block pool with hash-chained prefix reuse.
* ``scheduler``: continuous batching (waiting/running queues, token budget,
  chunked prefill, LIFO preemption), one asyncio task, per-request channels.
* ``timing``: Dynamo's polynomial perf model (how long a pass takes).
* ``device``: the real PyTorch workload per pass (CUDA when available).
* ``metrics``: the ``mocker_*`` Prometheus gauges.
* ``engine``: ``MockerEngine``, the ``LLMEngine`` that puts them together; the
  package's (user-owned) ``engine.py`` subclasses it.
"""
