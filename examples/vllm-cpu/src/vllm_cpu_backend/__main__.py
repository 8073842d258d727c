import sys

from backend_common import run

from .engine import VllmCpuBackendEngine
from .vllm_engine.engine import ENGINE_DEAD_EXIT_CODE, engine_died

# vLLM starts its engine core in a spawned process, which imports this module again (as
# __mp_main__): only the real main module serves.
if __name__ == "__main__":
    try:
        run(VllmCpuBackendEngine)
    except SystemExit as exc:
        # A clean shutdown after the engine core died is still a failure for a supervisor.
        if engine_died() and not exc.code:
            sys.exit(ENGINE_DEAD_EXIT_CODE)
        raise
