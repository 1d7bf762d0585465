"""The plots MLflow does not draw for a sweep, from its Optuna study, logged on its parent run."""

from __future__ import annotations

from kdray.core.io import first_line
from kdray.tracking.store import client

#: fewer completed trials than this give parameter importances that are noise: no plot
MIN_TRIALS_FOR_IMPORTANCES = 8


def log_sweep_plots(uri: str, parent_run_id: str, study, metrics, log=print) -> list[str]:
    """What MLflow's chart view does not draw, from the Optuna study, as PNGs on the parent run:
    the optimisation history, parallel coordinates of the parameters that varied, parameter
    importances (from :data:`MIN_TRIALS_FOR_IMPORTANCES` completed trials, their count in the
    title), the Pareto front when multi-objective (several ``metrics``: [(metric, mode)]).
    Learning curves are MLflow's own (chart view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ov

    c = client(uri)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    names = [m for m, _ in metrics]
    varied = sorted(p for p in {k for t in done for k in t.params} if len({str(t.params.get(p)) for t in done}) > 1)
    logged = []

    def save(name, make, note: str = ""):
        try:
            ax = make()
        except Exception as exc:  # noqa: BLE001 - a plot that needs more trials is skipped, not fatal
            log(f"plot {name}: skipped ({first_line(exc, 120)})")
            return
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        if note:
            fig.suptitle(note, fontsize=9)
        fig.set_size_inches(10, 6)
        fig.tight_layout()
        c.log_figure(parent_run_id, fig, f"plots/{name}.png")
        plt.close(fig)
        logged.append(name)

    if not done:
        return logged
    with _quiet_optuna():
        if len(names) > 1:
            save("pareto_front", lambda: ov.plot_pareto_front(study, target_names=names))
            target = dict(target=lambda t: t.values[0], target_name=names[0])
        else:
            target = dict(target_name=names[0])
        save("optimization_history", lambda: ov.plot_optimization_history(study, **target))
        if varied:
            save("parallel_coordinate", lambda: ov.plot_parallel_coordinate(study, params=varied, **target))
        if len(done) >= MIN_TRIALS_FOR_IMPORTANCES and varied:
            save("param_importances", lambda: ov.plot_param_importances(study, params=varied, **target),
                 note=f"from {len(done)} completed trials: a rough guide, not a measurement")
        else:
            log(f"plot param_importances: skipped ({len(done)} completed trial(s); "
                f"it needs {MIN_TRIALS_FOR_IMPORTANCES} to say more than noise)")
    return logged


class _quiet_optuna:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
