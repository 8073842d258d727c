from backend_common import run

from .engine import SkeletonCpuEngine

run(SkeletonCpuEngine)
