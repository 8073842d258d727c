from backend_common import run

from .engine import SkeletonDisaggCpuEngine

run(SkeletonDisaggCpuEngine)
