"""mocker-cuda: a Dynamo 1.6.x backend on the vendored ``backend_common`` runtime.

Run it with ``python -m mocker_cuda --help``; the engine is
``engine.MockerCudaEngine``.
"""
