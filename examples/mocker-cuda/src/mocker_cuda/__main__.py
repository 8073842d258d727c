from backend_common import run

from .engine import MockerCudaEngine

run(MockerCudaEngine)
