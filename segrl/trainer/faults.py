"""Fault injection for the reliability tests (inert unless an environment variable is set).

``SEGRL_TEST_KILL_AT="point[:step][,point[:step]...]"`` makes the training process kill itself
with ``SIGKILL`` (no cleanup, no ``finally``, exactly like ``kill -9`` or the OOM killer) when
it reaches a named point, optionally only at one training step. Points:

* trainer (:mod:`segrl.trainer.trainer`): ``started`` (run directory locked, config.yaml
  written, no model loaded yet), ``step_start`` (before the rollout of step N),
  ``after_rollout`` (rollout and rewards done, before the update of step N), ``after_step``
  (step N logged, before its checkpoint), ``before_final_model`` (after the final checkpoint);
* checkpoint writer (:mod:`segrl.trainer.checkpoint`, N = the checkpoint's step):
  ``ckpt_model_written`` (weights in the temporary directory, nothing else),
  ``ckpt_before_manifest`` (all files written, no manifest yet), ``ckpt_before_rename``
  (complete temporary directory, not renamed), ``ckpt_after_rename`` (renamed, old
  checkpoints not yet pruned).

``tests/test_resume.py`` uses it to show that a run killed at any of these points and
resumed with ``--resume`` ends with the same weights and metrics as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

ENV = "SEGRL_TEST_KILL_AT"


def maybe_kill(point: str, step: int | None = None) -> None:
    """SIGKILL this process if ``SEGRL_TEST_KILL_AT`` names ``point`` (at ``step``)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, at = item.strip().partition(":")
        if name == point and (not at or step is None or int(at) == step):
            os.kill(os.getpid(), signal.SIGKILL)
