"""The client actor pool's plan (raysim.engine.placement): pure functions, no Ray."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from raysim.config import ConfigError, ResourcesConfig
from raysim.engine.placement import Capacity, actor_count, assign, check_fits, clients_per_actor_text, is_auto


@dataclass(frozen=True)
class Spec:
    id: str
    num_train: int


def specs(*sizes: int) -> list[Spec]:
    return [Spec(f"c{i}", n) for i, n in enumerate(sizes)]


def ids(groups: list[list[Spec]]) -> list[list[str]]:
    return [[s.id for s in g] for g in groups]


def totals(groups: list[list[Spec]]) -> list[int]:
    return [sum(s.num_train for s in g) for g in groups]


# --- assign ---------------------------------------------------------------------------------


def test_greedy_largest_first_onto_the_lightest_actor() -> None:
    groups = assign(specs(10, 9, 8, 7, 6, 5), 2)
    # 10->a0, 9->a1, 8->a1 (9<10), 7->a0 (10<17), 6->a0 (17=17: lower index), 5->a1
    assert ids(groups) == [["c0", "c3", "c4"], ["c1", "c2", "c5"]]
    assert totals(groups) == [23, 22]


def test_plan_is_balanced_on_skewed_sizes() -> None:
    sizes = [600, 200, 80, 60, 40, 20, 17, 9, 3, 1]
    groups = assign(specs(*sizes), 3)
    assert len(groups) == 3 and sorted(s.id for g in groups for s in g) == sorted(s.id for s in specs(*sizes))
    assert totals(groups)[0] == 600  # the largest client alone outweighs everyone else
    assert max(totals(groups)[1:]) - min(totals(groups)[1:]) <= 20  # the rest share the others evenly


def test_plan_depends_on_ids_and_sizes_only_not_input_order() -> None:
    clients = specs(5, 5, 3, 8, 1, 5, 2, 8)
    reference = ids(assign(clients, 3))
    for seed in range(5):
        shuffled = clients[:]
        random.Random(seed).shuffle(shuffled)
        assert ids(assign(shuffled, 3)) == reference


def test_ties_go_by_client_id_then_actor_index() -> None:
    clients = [Spec("b", 4), Spec("a", 4), Spec("d", 4), Spec("c", 4)]
    assert ids(assign(clients, 2)) == [["a", "c"], ["b", "d"]]
    assert ids(assign(clients, 3)) == [["a", "d"], ["b"], ["c"]]


def test_more_actors_than_clients_gives_one_client_each_and_no_empty_actor() -> None:
    groups = assign(specs(3, 7), 5)
    assert ids(groups) == [["c1"], ["c0"]]


def test_one_actor_hosts_everyone_largest_first() -> None:
    assert ids(assign(specs(3, 7, 7, 1), 1)) == [["c1", "c2", "c0", "c3"]]


def test_max_per_actor_caps_each_actor() -> None:
    # FedHelp's quantity-skewed six clients, two per actor: without the cap the last four small
    # clients would pile onto one actor.
    groups = assign(specs(60, 20, 8, 6, 4, 2), 3, max_per_actor=2)
    assert ids(groups) == [["c0", "c5"], ["c1", "c4"], ["c2", "c3"]]
    with pytest.raises(ValueError, match="cannot host"):
        assign(specs(1, 1, 1), 1, max_per_actor=2)


def test_clients_per_actor_text() -> None:
    assert clients_per_actor_text([[1]]) == "1 client"
    assert clients_per_actor_text([[1, 2, 3], [4, 5, 6]]) == "3 clients"
    assert clients_per_actor_text([[1, 2], [3, 4, 5]]) == "2–3 clients"


# --- actor_count ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_clients", "resources", "capacity", "expected"),
    [
        (6, {}, Capacity(2), 2),  # the laptop: num_cpus = threads_per_client = 1
        (6, {"threads_per_client": 2}, Capacity(8), 4),
        (3, {}, Capacity(16), 3),  # never more actors than clients
        (6, {"num_cpus": 0.3}, Capacity(0.9), 3),  # 0.9 / 0.3 is 2.9999... in floats
        (6, {"num_cpus": 0.5}, Capacity(2), 4),
        (6, {"driver_cpus": 1}, Capacity(4), 3),
        (6, {"num_gpus": 0.25, "num_cpus": 0.5}, Capacity(16, 1), 4),  # the GPUs bind
        (6, {"num_gpus": 0.5}, Capacity(2, 4), 2),  # the CPUs bind
        (6, {"actors": 4}, None, 4),  # an integer needs no capacity
        (3, {"actors": 8}, None, 3),
        (6, {"clients_per_actor": 4}, None, 2),
        (6, {"clients_per_actor": 1}, None, 6),
    ],
)
def test_actor_count(n_clients: int, resources: dict, capacity: Capacity | None, expected: int) -> None:
    res = ResourcesConfig(**resources)
    res.validate()
    assert actor_count(n_clients, res, capacity) == expected


@pytest.mark.parametrize(
    ("resources", "capacity"),
    [
        ({}, Capacity(0.5)),
        ({"driver_cpus": 2}, Capacity(2)),
        ({"num_gpus": 0.5}, Capacity(4, 0)),
    ],
)
def test_auto_that_fits_no_actor_names_the_keys(resources: dict, capacity: Capacity) -> None:
    with pytest.raises(ConfigError) as err:
        actor_count(6, ResourcesConfig(**resources), capacity)
    message = str(err.value)
    for key in ("resources.actors=auto", "resources.num_cpus", "resources.num_gpus", "resources.driver_cpus", "integer"):
        assert key in message


def test_is_auto() -> None:
    assert is_auto(ResourcesConfig())
    assert not is_auto(ResourcesConfig(actors=2)) and not is_auto(ResourcesConfig(clients_per_actor=2))


def test_check_fits() -> None:
    check_fits(2, ResourcesConfig(), Capacity(2))
    check_fits(8, ResourcesConfig(num_cpus=0.25), Capacity(2))
    with pytest.raises(ConfigError, match=r"3 client actors need 3 CPUs and 0 GPUs, but there are 2 CPUs .*Set resources.actors=auto"):
        check_fits(3, ResourcesConfig(actors=3), Capacity(2))
    with pytest.raises(ConfigError, match="GPUs"):
        check_fits(3, ResourcesConfig(num_gpus=0.5), Capacity(4, 1))
