"""vllm-cpu: a Dynamo 1.6.x backend on the vendored ``backend_common`` runtime.

Run it with ``python -m vllm_cpu --help``; the engine is
``engine.VllmCpuEngine``.
"""
