"""The publish child process: one publish, told on stdout in the JSON-line protocol of :mod:`services.jobs`.

::

    python -m services.publishing.worker WORKSPACE RUN[@ITER] NAME '{"quantize_bits": 4}'

writes ``progress`` lines while it works, then one ``result`` line (the :class:`PublishResult` fields and a
one-line ``summary`` of the parity check) or one ``error`` line, and exits 0 (published) or 2 (not).
:class:`services.publishing.jobs.PublishJobs` starts it; ``forgellm publish --json`` prints the same lines
through :func:`run`. MLX is imported only when a publish runs, so the UI process can import this module.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from services.jobs import emit
from services.publishing.rules import OPTION_KEYS, PublishError
from services.workspace import Workspace

MODULE = "services.publishing.worker"


def args(workspace: Workspace, run_id: str, iteration: int | None, name: str, options: dict[str, Any]) -> list[str]:
    """The worker's command-line arguments for one publish (after ``python -m MODULE``)."""
    ref = f"{run_id}@{iteration}" if iteration is not None else run_id
    return [str(workspace.root), ref, name, json.dumps({k: options[k] for k in OPTION_KEYS if k in options})]


def run(workspace: Workspace, ref: str, name: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """Publish ``ref`` (``RUN`` or ``RUN@ITER``) as ``name`` with protocol lines on stdout; return the result
    line's fields, or None when it failed (an error line was written)."""
    from services.config import ConfigError
    from services.publishing.parity import parity_summary
    from services.publishing.publish import publish

    def progress(phase: str, fraction: float, message: str) -> None:
        emit("progress", phase=phase, fraction=fraction, message=message)

    try:
        result = publish(workspace, ref, None, name, progress=progress, **options)
    except (PublishError, ConfigError) as e:
        emit("error", message=str(e))
        return None
    except Exception as e:  # the parent gets a reason instead of a bare exit code; the traceback goes to its log
        traceback.print_exc()
        emit("error", message=f"{type(e).__name__}: {e}")
        return None
    fields = {**result.to_dict(), "summary": parity_summary(result.parity)}
    emit("result", **fields)
    return fields


def main(argv: list[str] | None = None) -> int:
    """``WORKSPACE RUN[@ITER] NAME OPTIONS_JSON``: exit 0 when published, 2 when not."""
    workspace, ref, name, options = (argv if argv is not None else sys.argv[1:])[:4]
    return 0 if run(Workspace.resolve(workspace), ref, name, json.loads(options)) is not None else 2


if __name__ == "__main__":
    sys.exit(main())
