"""Where training workers started before ``services`` moved into rooms (2026-12) find the run manager.

Such a worker imports ``services.runs`` as it ends, to start the next queued run. It still holds the
pre-move modules (``services.run_folder``, an older ``services.workspace``…), which the new code would
mix with its own; so in such a process the stale ``services.*`` modules are dropped first and the new
ones load from disk. New code imports :mod:`services.training.manager`.
"""

import sys

if "services.run_folder" in sys.modules:  # a process started before the move
    for _name in [m for m in sys.modules if m.startswith("services.") and m != __name__]:
        del sys.modules[_name]

from services.training.manager import RunManager, parse_ref  # noqa: E402 (after the purge above, on purpose)

__all__ = ["RunManager", "parse_ref"]
