from backend_common.run import run

from .engine import MockerCudaEngine

run(MockerCudaEngine)
