"""skeleton-cpu: a Dynamo 1.6.x backend on the vendored ``backend_common`` runtime.

Run it with ``python -m skeleton_cpu --help``; the engine is
``engine.SkeletonCpuEngine``.
"""
