"""Pins each use of Optuna internals (`study.optuna_compat`) against the Optuna installed: a release that
changes one fails here, by name."""

import optuna

from mnist_diff.study.optuna_compat import grid_point_id, retried_trial_number, stored_trial

SPACE = {"schedule": ["linear", "cosine", "sigmoid"], "timesteps_beta_end": ["200:0.08", "1000:0.02"]}


def grid_study(tmp_path):
    return optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'optuna.db'}", sampler=optuna.samplers.GridSampler(SPACE, seed=0)
    )


def test_grid_point_id_is_the_id_grid_sampler_gives_the_point(tmp_path):
    study, seen = grid_study(tmp_path), []

    def objective(trial):
        params = {name: trial.suggest_categorical(name, values) for name, values in SPACE.items()}
        space, grid_id = grid_point_id(study.sampler, params)
        assert space == SPACE
        seen.append((grid_id, stored_trial(trial).system_attrs["grid_id"]))
        return 1.0

    study.optimize(objective)  # GridSampler stops the study once every point ran
    assert len(seen) == 6 and all(ours == its for ours, its in seen)
    assert {ours for ours, _ in seen} == set(range(6))


def test_stored_trial_holds_the_attributes_set_when_it_was_queued(tmp_path):
    study = grid_study(tmp_path)
    study.enqueue_trial({"schedule": "cosine", "timesteps_beta_end": "200:0.08"}, user_attrs={"retries": 2})
    trial = study.ask()
    stored = stored_trial(trial)
    assert isinstance(stored, optuna.trial.FrozenTrial)
    assert stored.number == trial.number and stored.user_attrs == {"retries": 2}
    assert retried_trial_number(stored) is None


def test_a_stale_trial_is_failed_and_its_retry_names_it(tmp_path):
    """Heartbeats: a trial whose worker died (no heartbeat for the grace period) is failed by
    `fail_stale_trials`, and the retry the callback queues names it (`retried_trial_number`)."""
    import time

    from mnist_diff.study.optuna_compat import fail_stale_trials, knowingly_experimental

    with knowingly_experimental():
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{tmp_path / 'hb.db'}",
            heartbeat_interval=1,
            grace_period=1,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.1)
    fail_stale_trials(study)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert retried_trial_number(study.get_trials()[1]) == trial.number
