"""A warm engine (issue 29): a run after other runs in the same actors equals the same run in
fresh actors, bit for bit; an `Engine` keeps its driver actor and its client actors between
runs whose resources match, and a run that fails leaves actors that serve the next one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import ray

from raysim.config import ConfigError
from raysim.datasets import DataError
from raysim.engine import warm

from helpers import FM, load_config, make_driver, tiny_overrides

ONE_ACTOR = {"resources.clients_per_actor": 3}  # every client in one actor: the cheapest fresh run
SEGMENTATION = {"data.name": "synthetic", "model.name": "unet:test_resnet", "federation.rounds": 1}
FEDHELP = {"algorithm.name": "fedhelp", "algorithm.top_n": 1, "algorithm.small_model": "test_resnet", "algorithm.large_model": "test_vit", "algorithm.foundation": FM}
# What runs warm, in this order, each after the one before in the same actor. FedAvg after
# another run is test_an_engine_keeps_its_driver_and_client_actors_between_runs's case.
SEQUENCE = [
    ("fedavg", {}),  # warms the actor up
    ("fairlora", {"algorithm.name": "fairlora"}),
    ("fedhelp", FEDHELP),
    ("segmentation after classification", SEGMENTATION),
]


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "metrics.parquet")


def fresh_run(root: Path, run_dir: Path, **settings: object) -> pd.DataFrame:
    """The run in actors started for it and stopped after it (no supply)."""
    with warm.installed(None):
        make_driver(root, run_dir, **{**ONE_ACTOR, **settings}).run()
    return metrics(run_dir)


@pytest.fixture(autouse=True)
def no_idle_session_actors(engine) -> None:  # type: ignore[no-untyped-def]
    """These tests install supplies of their own, which cannot reuse (nor stop) the actors the
    session's Engine keeps idle: without this, those held the CPUs that a test's new actors
    waited for (a run of 3 actors hung in CI once other tests had left 6 idle on 2 CPUs)."""
    engine.release_idle()


@pytest.fixture(scope="module")
def fresh_fedavg(engine, oph_root: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    """The tiny FedAvg run in fresh actors, once for the tests of this module that compare with it."""
    engine.release_idle()  # module-scoped: set up before the per-test release above
    return fresh_run(oph_root, tmp_path_factory.mktemp("fresh") / "run")


def test_runs_in_warm_actors_equal_runs_in_fresh_ones(ray_session, oph_root: Path, tmp_path: Path) -> None:
    supply = warm.ActorSupply()
    with warm.installed(supply):
        for name, settings in SEQUENCE:
            lines: list[str] = []
            make_driver(oph_root, tmp_path / "warm" / name, lines, **{**ONE_ACTOR, **settings}).run()
            if name != "fedavg":
                assert "  1 of them warm from an earlier run (raysim.engine.warm)" in lines, (name, lines[:4])
    assert (supply.started, supply.reused, supply.count()) == (1, len(SEQUENCE) - 1, 1)
    supply.close()
    for name, settings in SEQUENCE[1:]:
        pd.testing.assert_frame_equal(metrics(tmp_path / "warm" / name), fresh_run(oph_root, tmp_path / "fresh" / name, **settings), check_exact=True, obj=name)


def test_a_recovery_in_warm_actors_replays_to_the_fresh_runs_metrics(ray_session, oph_root: Path, tmp_path: Path) -> None:
    """A warm actor killed in round 2: replaced (by a fresh one), the rounds replayed; the run
    ends with the metrics of the same run, uninterrupted, in fresh actors."""
    rounds = {"federation.rounds": 3}
    supply = warm.ActorSupply()
    with warm.installed(supply):
        make_driver(oph_root, tmp_path / "before", **{**ONE_ACTOR, "algorithm.name": "fedbn"}).run()
        driver = make_driver(oph_root, tmp_path / "killed", **{**ONE_ACTOR, **rounds})
        try:
            driver.start()
            pid = int(ray.get(driver.pool.actors[0].describe.remote())["_pid"])
            for round_, part in driver.advance(3):
                if (round_, part) == (2, "round") and pid:
                    os.kill(pid, signal.SIGKILL)
                    pid = 0
        finally:
            driver.shutdown()
    assert supply.reused == 1 and supply.count() == 1  # the replacement went back to the supply
    supply.close()
    pd.testing.assert_frame_equal(driver.recorder.metrics, fresh_run(oph_root, tmp_path / "fresh", **rounds), check_exact=True)


def test_another_kind_of_actor_stops_the_idle_ones_and_surplus_actors_stop(ray_session, oph_root: Path, tmp_path: Path) -> None:
    supply = warm.ActorSupply()
    with warm.installed(supply):
        make_driver(oph_root, tmp_path / "three").run()  # 3 actors of 0.25 CPU
        assert supply.count() == 3
        make_driver(oph_root, tmp_path / "one", **ONE_ACTOR).run()  # 1 of them reused, 2 stopped
        assert (supply.reused, supply.count()) == (1, 1)
        make_driver(oph_root, tmp_path / "half", **{**ONE_ACTOR, "resources.num_cpus": 0.5}).run()  # another kind: none reused
        assert (supply.reused, supply.started, supply.count()) == (1, 4, 1)
        assert list(supply.idle) == [warm.ActorKind(0.5, 0.0, 1)]
    supply.close()


def test_an_actor_whose_load_failed_serves_the_next_run(ray_session, oph_copy: Path, oph_root: Path, tmp_path: Path, fresh_fedavg: pd.DataFrame) -> None:
    """Bad input an actor finds (a corrupt image) ends that run in its one-line error; the same
    warm actor then serves a good run, whose metrics are the fresh run's."""
    name = str(pd.read_csv(oph_copy / "meta_site1_race_test.csv", dtype=str, keep_default_na=False)["filename"][0])
    (oph_copy / "all" / name).write_bytes(b"not an image")
    supply = warm.ActorSupply()
    with warm.installed(supply):
        with pytest.raises(DataError):
            make_driver(oph_copy, tmp_path / "bad", **{**ONE_ACTOR, "data.cache": False}).run()
        assert supply.count() == 1
        make_driver(oph_root, tmp_path / "good", **ONE_ACTOR).run()
        assert supply.reused == 1
    supply.close()
    pd.testing.assert_frame_equal(metrics(tmp_path / "good"), fresh_fedavg, check_exact=True)


def test_an_engine_keeps_its_driver_and_client_actors_between_runs(engine, oph_root: Path, tmp_path: Path, fresh_fedavg: pd.DataFrame) -> None:
    """`Engine.run` runs in the engine's driver actor; the second run finds the first one's
    client actors warm there, and its metrics are those of the same run built in this process
    in fresh actors."""
    first = load_config(None, tiny_overrides(oph_root, **{**ONE_ACTOR, "algorithm.name": "fedbn"}))
    second = load_config(None, tiny_overrides(oph_root, **ONE_ACTOR))
    engine.run(first, tmp_path / "first", echo=lambda _: None)
    driver = engine.driver
    assert engine.warm_actors() == 1
    lines: list[str] = []
    run_dir = engine.run(second, tmp_path / "second", echo=lines.append)
    assert engine.driver is driver and "  1 of them warm from an earlier run (raysim.engine.warm)" in lines
    assert run_dir == str(tmp_path / "second")
    pd.testing.assert_frame_equal(metrics(tmp_path / "second"), fresh_fedavg, check_exact=True)
    with pytest.raises(ConfigError, match="not empty"):
        engine.run(second, tmp_path / "second", echo=lambda _: None)


def test_a_new_driver_actors_client_actors_start_beside_it_and_stop_with_it(engine, oph_root: Path, tmp_path: Path, fresh_fedavg: pd.DataFrame) -> None:
    """(item 3) A new driver actor's client actors are started by the Engine as it launches the
    driver, not by the driver once it has imported torch and read the clients: the run takes
    them (it starts none), its metrics are the fresh run's, and they stop with that driver."""
    lines: list[str] = []
    own_driver = load_config(None, tiny_overrides(oph_root, **{**ONE_ACTOR, "resources.driver_cpus": 0.125}))  # a driver kind no other test asks for
    engine.run(own_driver, tmp_path / "lent", echo=lines.append)
    lent, lender = list(engine.lent), engine.driver
    assert len(lent) == 1 and ray.get(engine.driver.supply_counts.remote()) == {"started": 0, "reused": 0, "idle": 1}
    assert not any("warm from an earlier run" in line for line in lines)
    pd.testing.assert_frame_equal(metrics(tmp_path / "lent"), fresh_fedavg, check_exact=True)

    engine.run(load_config(None, tiny_overrides(oph_root, **ONE_ACTOR)), tmp_path / "next", echo=lambda _: None)  # another driver kind: that driver goes
    assert engine.driver is not lender  # other driver resources: a new driver actor
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(lent[0].node_id.remote(), timeout=60)
