"""The names kdray gives its tags, artifacts and models in MLflow, and what it never logs."""

from __future__ import annotations

STATE_TAG = "kdray.state"


KIND_TAG = "kdray.kind"


REASON_TAG = "kdray.failure_reason"


TRIAL_TAG = "kdray.trial_id"


STORE_TAG = "kdray.teacher_store"  # where a run's teacher outputs came from


BEST_TAG = "kdray.best_run_id"  # on a sweep's parent: its best trial's run


STUDENT_ARTIFACT = "student/student.pt"


STUDENT_MODEL_TYPE = "kdray-student"  # the logged model holding a run's student


# MLflow's own tags
NOTE_TAG = "mlflow.note.content"  # a run's or an experiment's description (markdown)


VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # a saved view of the experiment's runs page


TRIALS_VIEW = "kdray-trials"


#: what the engine reports to steer its loop, not results: never logged as metrics
BOOKKEEPING = frozenset({"done", "epochs", "total_epochs", "generation", "generations", "epoch_in_generation",
                         "branch_params", "epoch_wall_s"})


#: config keys that say how a run was executed, not what it is (and hold local paths): never params
RUNTIME_KEYS = frozenset({"checkpoint_dir", "resume"})


#: kdray.state -> MLflow's run status: pruned trials were stopped, not finished (the UI draws
#: KILLED and FAILED with the same red icon; the state tag and the description tell them apart)
MLFLOW_STATUS = {"failed": "FAILED", "interrupted": "KILLED", "pruned": "KILLED"}


EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


#: tags on a trial's MLflow run naming its Optuna trial (the trial holds the run id: ``mlflow_run_id``)
OPTUNA_TRIAL_TAG, OPTUNA_STUDY_TAG = "optuna.trial_number", "optuna.study_name"
