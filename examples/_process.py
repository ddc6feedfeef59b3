"""How the command-line scripts end their process, alone or under ``torchrun``.

One concept: the exit status of a finished run must be the run's, not an accident of
interpreter shutdown. A process launched by a ``torch.distributed`` launcher has used the
gloo (CPU) or NCCL backend, whose worker threads free finished collectives lazily. A worker
that frees one holding a tensor that Python also saw takes the GIL; when that happens after
the interpreter began to shut down, the thread cannot take it and the process aborts with
SIGABRT ("terminate called without an active exception") although the run finished and
wrote all its files. ``DistributedDataParallel`` keeps its process group alive in C++ after
``destroy_process_group``, so the threads are still there at shutdown. Once the script has
written and closed everything, such a process therefore leaves without interpreter shutdown
(``os._exit``), after flushing its standard streams. A single process exits normally.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

__all__ = ["exit_process"]


def exit_process(code: int = 0) -> NoReturn:
    """End the process with ``code``: ``sys.exit`` alone, ``os._exit`` under a launcher.

    Call it only from a script's ``__main__`` block, after every file is written and closed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # not started by a launcher with several ranks
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
