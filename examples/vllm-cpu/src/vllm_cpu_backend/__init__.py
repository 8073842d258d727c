"""vllm-cpu-backend: a Dynamo 1.6.x backend on the vendored ``backend_common`` runtime.

Run it with ``python -m vllm_cpu_backend --help``; the engine is
``engine.VllmCpuBackendEngine``.
"""
