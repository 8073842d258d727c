"""vLLM's ``AsyncLLM`` as a Dynamo engine (template-owned: ``copier update`` keeps it current).

``engine.VllmEngine`` is the engine; ``args`` puts vLLM's flags on the worker's parser;
``sampling`` maps requests to ``SamplingParams`` and outputs back; ``stats`` carries vLLM's
scheduler stats to the KV gauges. The project's ``engine.py`` subclasses ``VllmEngine``.
The package is not named ``vllm`` so that it never shadows vLLM itself.
"""
