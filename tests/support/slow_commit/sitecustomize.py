"""Test support, imported by every Python process that has this folder on its PYTHONPATH: with
WMTP_TEST_COMMIT_DELAY="<seconds>:<first step>" set, committing a checkpoint of that step or a later one takes
that much longer, so that tests can stop or kill a process while a save is in flight, or make a save outlast
torchrun's 30 s. Without the variable it does nothing. The product has no such hook."""

import os

if os.environ.get("WMTP_TEST_COMMIT_DELAY"):
    import time

    from wmtp.checkpoint.store import CheckpointStore

    _seconds, _first = os.environ["WMTP_TEST_COMMIT_DELAY"].split(":")
    _commit = CheckpointStore.commit

    def _slow_commit(self, step, files):  # type: ignore[no-untyped-def]
        if step >= int(_first):
            time.sleep(float(_seconds))
        return _commit(self, step, files)

    CheckpointStore.commit = _slow_commit  # type: ignore[method-assign]
