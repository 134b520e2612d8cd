"""The `postgres_url` fixture gives a working PostgreSQL database, usable as Optuna's RDB storage."""

from __future__ import annotations

import optuna
import sqlalchemy as sa


def test_sqlalchemy_round_trip(postgres_url):
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE fixture_probe (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"))
            conn.execute(sa.text("INSERT INTO fixture_probe (id, name) VALUES (1, 'shrinkml')"))
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, name FROM fixture_probe")).all()
            assert conn.dialect.name == "postgresql"
        assert [tuple(r) for r in rows] == [(1, "shrinkml")]
    finally:
        engine.dispose()


def test_optuna_rdb_storage(postgres_url):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    writer = optuna.storages.RDBStorage(postgres_url)
    study = optuna.create_study(study_name="fixture-probe", storage=writer,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: (trial.suggest_float("x", -1.0, 1.0) - 0.5) ** 2, n_trials=3)

    reader = optuna.storages.RDBStorage(postgres_url)  # a second connection pool, as another worker has
    loaded = optuna.load_study(study_name="fixture-probe", storage=reader)
    trials = loaded.get_trials(deepcopy=False)
    assert len(trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert loaded.best_value == min(t.value for t in trials)
    for storage in (writer, reader):
        storage.engine.dispose()
