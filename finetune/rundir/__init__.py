"""The run directory: every file a run keeps (their names are owned here), resuming, and the lock on it.

:class:`~finetune.rundir.directory.RunDir` reads and writes the files; :mod:`finetune.rundir.lock` keeps two commands
from writing one run at once.
"""

from finetune.rundir.directory import RunDir

__all__ = ["RunDir"]
