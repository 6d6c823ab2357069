"""Run a Python script with a shared library loaded first, RTLD_GLOBAL (scripts/aoti_locale_preload.cpp).

    python scripts/run_with_preload.py LIB.so SCRIPT.py [ARGS...]

Exits with the script's status without interpreter teardown: with two libstdc++ copies in the process, static
destructors at exit can crash after the script has finished and written its results.
"""

import ctypes
import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    library, script, *args = sys.argv[1:]
    ctypes.CDLL(os.path.abspath(library), mode=os.RTLD_GLOBAL)
    os.environ["FLUXC_PRELOADED"] = os.path.abspath(library)  # for the script's records
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
