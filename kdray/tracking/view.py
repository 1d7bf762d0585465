"""The MLflow UI: links to an experiment's runs and the saved view that ranks a sweep's trials."""

from __future__ import annotations

import json
import time
from typing import Iterable, Optional

from kdray.core.values import mask_credentials
from kdray.tracking.store import client, scheme
from kdray.tracking.tags import (
    KIND_TAG,
    NOTE_TAG,
    TRIALS_VIEW,
    VIEW_TAG_PREFIX,
)


def ui_path(exp_id: str, view: Optional[str] = TRIALS_VIEW) -> str:
    """The UI's address of an experiment's runs page (in ``view``), relative to the UI's root.

    ``workflowType``: MLflow 3.17's UI takes an experiment's kind from its global "GenAI / Model
    training" switch (kept in the browser, GenAI on a first visit), not from the
    ``mlflow.experimentKind`` tag (``useExperimentKind`` returns the switch's value while the
    feature flag behind it, hard-wired on, stays on); without it a link opens an empty Traces /
    Overview page."""
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={view}" if view else "")
    return f"#/experiments/{exp_id}/runs?{query}"


def ui_url(uri: str, exp_id: str) -> str:
    """Where the trials view opens: on the tracking server, or on `mlflow ui`'s default address."""
    root = uri.rstrip("/") if scheme(uri) in ("http", "https") else "http://127.0.0.1:5000"
    return f"{mask_credentials(root)}/{ui_path(exp_id)}"


def ui_hint(uri: str, exp_id: str) -> str:
    """One line telling where to look at an experiment's trials."""
    if scheme(uri) in ("http", "https"):
        return f"ranked trials: {ui_url(uri, exp_id)}"
    return f"ranked trials: `mlflow ui --backend-store-uri {mask_credentials(uri)}`, then {ui_url(uri, exp_id)}"


def trials_view_state(metric: str, mode: str, searched: Iterable[str]) -> dict:
    """The runs page of a sweep's experiment as kdray sets it up: trials only, best first (a
    sort by anything but creation time also lists them flat rather than folded under their
    sweep), the columns that tell the story first (the UI's keys: ``<type>.`<name>```)."""
    metrics = [metric] + [m for m in ("val_acc", "test_acc", "params", "latency_ms") if m != metric]
    columns = (["tags.`kdray.state`", "params.`method`"] + [f"metrics.`{m}`" for m in metrics]
               + [f"params.`{p}`" for p in searched if p != "method"] + ["attributes.`Models`"])
    return {"searchFilter": f"tags.`{KIND_TAG}` = 'trial'", "orderByKey": f"metrics.`{metric}`",
            "orderByAsc": mode == "min", "selectedColumns": columns,
            "columnOrder": ["tags.`mlflow.runName`", "attributes.start_time", *columns]}


def save_trials_view(uri: str, exp_id: str, *, metric: str, mode: str, searched: Iterable[str]) -> None:
    """The saved view :data:`TRIALS_VIEW` of the experiment, in the format MLflow's UI writes
    ("Save view": an experiment tag holding a JSON envelope {name, createdAt, state}), and an
    experiment description linking to it."""
    state = trials_view_state(metric, mode, searched)
    envelope = {"name": f"kdray: trials by {metric}", "createdAt": int(time.time() * 1000),
                "state": json.dumps(state)}
    c = client(uri)
    c.set_experiment_tag(exp_id, VIEW_TAG_PREFIX + TRIALS_VIEW, json.dumps(envelope))
    c.set_experiment_tag(exp_id, NOTE_TAG, (
        f"[Trials ranked by {metric}]({ui_path(exp_id)}) (the saved view {envelope['name']!r}): state, "
        "method, searched parameters, accuracy, size, latency. One parent run per sweep session "
        "carries its best trial's numbers."))
