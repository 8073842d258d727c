from backend_common import run

from .engine import TransformersCpuEngine

run(TransformersCpuEngine)
