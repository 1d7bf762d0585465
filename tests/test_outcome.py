"""The trial-outcome protocol: one function decides completed / pruned / failed from the engine's
epoch counters, and one turns any exception -- raised here or wrapped by Ray on its way back from
a worker -- into one line by the type of its innermost cause (real Ray exception classes)."""

from __future__ import annotations

import errno

from kdray.core.errors import KdrayError
from kdray.core.outcome import disk_full_line, failure_reason, is_done, trial_state
from kdray.training.loop import NonFiniteLoss


def test_state_from_the_epoch_counters_not_tunes_done_flag():
    assert trial_state({"epoch": 4, "total_epochs": 4, "done": True}) == "completed"
    # Tune sets done=True on a result when ASHA stops the trial: the counters still say pruned
    assert trial_state({"epoch": 2, "total_epochs": 4, "done": True}) == "pruned"
    assert trial_state({"epoch": 4, "total_epochs": 4}, RuntimeError("x")) == "failed"
    assert not is_done(None) and not is_done({})


def _worker_group_error(inner: BaseException):
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("Training failed due to worker errors:", {0: UserExceptionWithTraceback(inner, "tb")})


def test_reason_is_the_workers_own_error_through_rays_wrappers():
    from ray.exceptions import RayTaskError

    wrapped = RayTaskError("trial", "traceback text", _worker_group_error(
        NonFiniteLoss("loss became non-finite in epoch 3 (terms: ce=nan)"))).as_instanceof_cause()
    assert failure_reason(wrapped) == "NonFiniteLoss: loss became non-finite in epoch 3 (terms: ce=nan)"


def test_a_killed_worker_is_named_not_cut_at_the_wrappers_heading():
    from ray.exceptions import ActorDiedError

    reason = failure_reason(_worker_group_error(ActorDiedError()))
    assert reason.startswith("ActorDiedError: ") and not reason.endswith("worker errors:"), reason


def test_kdrays_own_error_wins_over_what_wraps_it():
    try:
        try:
            raise KdrayError("teachers: x.pt is corrupt")
        except KdrayError as exc:
            raise RuntimeError("while loading") from exc
    except RuntimeError as outer:
        assert failure_reason(outer) == "KdrayError: teachers: x.pt is corrupt"
    assert failure_reason(ValueError("a\nb")) == "ValueError: a"


def test_full_disk_is_recognised_through_its_wrappers():
    err = OSError(errno.ENOSPC, "No space left on device", "/w/runs/r/checkpoints/epoch_0001/checkpoint.pt")
    try:
        raise RuntimeError("checkpoint failed") from err
    except RuntimeError as outer:
        line = disk_full_line(outer)
    assert line.startswith("no space left on the device writing /w/runs/r/checkpoints/epoch_0001/checkpoint.pt")
    import sqlalchemy.exc

    db = sqlalchemy.exc.OperationalError("INSERT ...", {}, Exception("database or disk is full"))
    assert "no space left on the device of a database" in disk_full_line(db)
    assert disk_full_line(OSError(errno.EACCES, "denied")) is None
