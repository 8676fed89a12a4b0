"""Test support, imported by every Python process that has this folder on its PYTHONPATH. Without the variables
below it does nothing; the product has no such hooks.

- WMTP_TEST_COMMIT_DELAY="<seconds>:<first step>": committing a checkpoint of that step or a later one takes that
  much longer, so that tests can stop or kill a process while a save is in flight, or make a save outlast
  torchrun's 30 s.
- WMTP_TEST_KILL_AT_STEP="<step>": when training reaches that step the process waits for its checkpoint save in
  flight (so the newest committed checkpoint is known) and SIGKILLs itself: a kill at a replayable point instead
  of a sleep that races the trainer.
"""

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

if os.environ.get("WMTP_TEST_KILL_AT_STEP"):
    import signal

    from wmtp.train import Trainer

    _kill_at = int(os.environ["WMTP_TEST_KILL_AT_STEP"])
    _train_step = Trainer.train_step

    def _train_step_or_die(self):  # type: ignore[no-untyped-def]
        if self.state.step == _kill_at:
            self.checkpoints.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return _train_step(self)

    Trainer.train_step = _train_step_or_die  # type: ignore[method-assign]
