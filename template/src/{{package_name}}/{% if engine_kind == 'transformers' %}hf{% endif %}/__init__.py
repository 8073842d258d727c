"""A real inference engine: a Hugging Face causal LM with continuous batching.

Modules, one concept each:

* ``args``: ``HfSettings`` (one field per flag) and the model directory check.
* ``sampling``: per-request decoding rules (``RequestParams``) and the logits processor
  that applies them inside the batch.
* ``core``: ``EngineCore``, the model behind transformers' ``ContinuousBatchingManager``
  on its own compute thread, feeding each request's ``ThreadFeed``.
* ``metrics``: the ``hf_*`` Prometheus metrics.
* ``engine``: ``TransformersEngine``, the ``LLMEngine`` over all of them.

The package's own ``engine.py`` (user-owned) is a short subclass of ``TransformersEngine``.
"""
