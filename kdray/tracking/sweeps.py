"""TODO"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kdray.core.values import mask_credentials
from kdray.tracking.runs import (
    dataset_input,
    git_commit,
    log_batch,
    relative_path,
    run_tags,
    source_tags,
    versions,
)
from kdray.tracking.store import client
from kdray.tracking.tags import (
    BEST_TAG,
    KIND_TAG,
    NOTE_TAG,
    STATE_TAG,
)
from kdray.tracking.view import ui_path


# ---------------------------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------------------------
def start_sweep_run(uri: str, exp_id: str, *, name: str, space, study_name: str, storage_url: str,
                    teachers: Optional[str], teacher_archs: Optional[list] = None,
                    workdir: Optional[Path] = None) -> str:
    """The parent run: space file and resolved base config as artifacts, study, versions, commit.
    Its params and metrics are the best trial's, logged when the sweep ends (:func:`summarize_sweep`).
    ``storage_url``: the Optuna study's; a sqlite file in ``workdir`` is tagged relative to it."""
    import yaml

    c = client(uri)
    storage_url = mask_credentials(storage_url)  # masked here too: a tag is readable by every user of the store
    if storage_url.startswith("sqlite:///"):
        storage_url = "sqlite:///" + relative_path(storage_url[len("sqlite:///"):], workdir)
    tags = {KIND_TAG: "sweep", STATE_TAG: "running", **source_tags("sweep"), "kdray.study_name": study_name,
            "kdray.optuna_storage": storage_url,
            "kdray.metric": ",".join(m for m, _ in space.metrics),
            "kdray.mode": ",".join(d for _, d in space.metrics), **versions(), **run_tags(space.base, teacher_archs)}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id = c.create_run(exp_id, run_name=f"sweep-{name}", tags=tags).info.run_id
    log_batch(c, run_id, params={"samples": space.samples, "study_name": study_name, "space": Path(space.path).name})
    c.log_inputs(run_id, datasets=[dataset_input(space.base.to_dict())])
    c.log_artifact(run_id, str(space.path), "space")
    c.log_text(run_id, yaml.safe_dump(space.base.to_dict(), sort_keys=True), "config/base.yaml")
    if teachers and (Path(teachers) / "manifest.json").is_file():
        c.log_artifact(run_id, str(Path(teachers) / "manifest.json"), "teachers")
    return run_id


def searched_params(space) -> list[str]:
    """The params a sweep varies, as its trials log them (one per branch for per-branch ones)."""
    names = [k for k, spec in space.params.items() if isinstance(spec, dict)]
    if space.per_branch:
        branches = space.params.get("branches", space.base.branches)
        most = int(branches["high"] if isinstance(branches, dict) and "high" in branches else
                   max(branches["choices"]) if isinstance(branches, dict) else branches)
        names += [f"{k}_{b}" for k in space.per_branch for b in range(most)]
    return names


def trial_counts(study_counts: dict) -> str:
    """'3 completed, 1 pruned, 0 failed' from Optuna's counts by state."""
    names = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
    return ", ".join(f"{n} {names.get(s, s.lower())}" for s, n in study_counts.items() if n or s in ("COMPLETE", "PRUNED"))


def summarize_sweep(uri: str, parent_run_id: str, *, best_run_id: Optional[str], metric: str, counts: str) -> None:
    """The parent run at the end of a sweep: the best trial's metrics (latest values) and params,
    ``kdray.best_run_id``, and a description with the counts and a link to the best trial."""
    c = client(uri)
    parent = c.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    lines = [f"Sweep of `{parent.data.params.get('space', '?')}`: {counts}. "
             f"[All trials, ranked by {metric}]({ui_path(exp_id)})."]
    params, metrics, tags = {}, {}, {}
    if best_run_id:
        best = c.get_run(best_run_id)
        metrics = dict(best.data.metrics)
        params = {k: v for k, v in best.data.params.items() if k not in parent.data.params}
        tags[BEST_TAG] = best_run_id
        score = f"{metric} {metrics[metric]:.4f}" if metric in metrics else "no score"
        lines.append(f"Best trial: [{best.info.run_name}](#/experiments/{exp_id}/runs/{best_run_id}) ({score}); "
                     "its metrics and params are this run's.")
    tags[NOTE_TAG] = "\n\n".join(lines)
    tags["kdray.trials"] = counts
    log_batch(c, parent_run_id, params=params, tags=tags, metrics=metrics)
