from backend_common.run import run

from .engine import SkeletonCpuEngine

run(SkeletonCpuEngine)
