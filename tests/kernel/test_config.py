"""Config: presets, overrides, validation errors that name the key and list the choices."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raysim import config
from raysim.algorithms import params as algorithm_params
from raysim.config import ConfigError

from helpers import load_config


def test_default_preset_loads_with_public_keys() -> None:
    cfg = load_config()
    assert cfg.data.name == "synthetic"
    assert cfg.algorithm["name"] == "fedavg"
    assert cfg.model.name == "resnet18" and cfg.model.img_size == 64
    keys = config.all_keys()
    for key in ("seed", "data.name", "data.root", "data.attribute", "data.val_fraction", "model.name", "model.img_size",
                "algorithm.name", "federation.rounds", "federation.clients_per_round", "federation.local_epochs",
                "federation.batch_size", "federation.optimizer", "federation.lr", "federation.momentum",
                "federation.weight_decay", "resources.actors", "resources.num_cpus", "resources.num_gpus", "resources.driver_cpus", "resources.clients_per_actor",
                "resources.threads_per_client", "eval.every", "eval.attributes", "checkpoint.every"):
        assert key in keys


def test_overrides_are_typed_and_merged() -> None:
    cfg = load_config(None, ["federation.rounds=3", "federation.lr=1e-3", "eval.attributes=[race, gender]", "seed=7"])
    assert cfg.federation.rounds == 3
    assert cfg.federation.lr == pytest.approx(1e-3)
    assert cfg.eval.attributes == ["race", "gender"]
    assert cfg.seed == 7
    assert cfg.model.name == "resnet18"  # untouched keys keep the preset's value


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("federation.rouds=3", "did you mean federation.rounds"),
        ("algorithm.name=fedfoo", "unknown algorithm 'fedfoo'; choose one of: adapter, afl, cksp, deer, det, ditto, dp_lora, fairfed, fairlora, fedadagrad, fedadam, fedasync, fedavg,"),
        ("data.name=imagenet", "unknown dataset 'imagenet'; choose one of:"),
        ("federation.rounds=0", "federation.rounds must be a positive number"),
        ("federation.rounds=-2", "federation.rounds must be a positive number"),
        ("data.val_fraction=1.5", "data.val_fraction must be a fraction in (0, 1)"),
        ("resources.num_gpus=2", "resources.num_gpus must be a fraction in [0, 1]"),
        ("resources.actors=many", "resources.actors must be auto or a positive integer, got 'many'"),
        ("resources.actors=0", "resources.actors must be auto or a positive integer, got 0"),
        ("resources.actors=1.5", "resources.actors must be auto or a positive integer, got 1.5"),
        ("resources.driver_cpus=-1", "resources.driver_cpus must be >= 0"),
        ("federation.optimizer=lbfgs", "sgd, adam, adamw"),
        ("federation.rounds=ten", "federation.rounds must be an integer"),
        ("algorithm.mu=0.1", "unknown config key 'algorithm.mu'"),
        ("nonsense=1", "unknown config key 'nonsense'"),
    ],
)
def test_bad_values_fail_with_a_clear_message(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_resources_defaults_and_the_pool_keys() -> None:
    res = load_config().resources
    assert res.actors == "auto" and res.num_cpus is None and res.clients_per_actor is None and res.driver_cpus == 0
    assert res.actor_cpus == 1.0  # num_cpus defaults to threads_per_client: no oversubscription
    assert load_config(None, ["resources.threads_per_client=2"]).resources.actor_cpus == 2.0
    assert load_config(None, ["resources.num_cpus=0.25"]).resources.actor_cpus == 0.25
    assert load_config(None, ["resources.clients_per_actor=2"]).resources.clients_per_actor == 2  # alone, as before
    assert load_config(None, ["resources.actors=auto", "resources.clients_per_actor=2"]).resources.clients_per_actor == 2
    with pytest.raises(ConfigError, match=r"resources.actors=3 and resources.clients_per_actor=2 both set the number of client actors; set one"):
        load_config(None, ["resources.actors=3", "resources.clients_per_actor=2"])


def test_missing_config_file_names_it(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nothere.yaml not found"):
        load_config(tmp_path / "nothere.yaml")


def test_roundtrip_through_yaml(tmp_path) -> None:
    cfg = load_config(None, ["federation.rounds=4", "algorithm.name=fedavg"])
    path = tmp_path / "c.yaml"
    path.write_text(config.dump(cfg))
    assert load_config(path) == cfg


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_cli_help_lists_keys_with_defaults() -> None:
    out = subprocess.run([sys.executable, "-m", "raysim.run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "federation.rounds" in out and "resources.clients_per_actor" in out and "presets: availability, default" in out


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_cli_rejects_bad_input_before_training(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "raysim.run", "--out", str(tmp_path / "r"), "federation.rounds=0"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "federation.rounds must be a positive number" in proc.stderr


def test_an_exponent_without_a_dot_is_a_number_as_in_yaml_1_2() -> None:
    # YAML 1.1 (PyYAML's default) reads 1e-8 as a string: algorithm.delta=1e-8 failed as "not a number"
    cfg = load_config(None, ["algorithm.name=dp_lora", "algorithm.delta=1e-8", "federation.lr=5E-4"])
    assert algorithm_params(cfg).delta == 1e-8 and cfg.federation.lr == 5e-4
    assert config.parse_overrides(["data.root=1e5x", "seed=12"]) == {"data": {"root": "1e5x"}, "seed": 12}


def test_the_config_module_knows_no_registry() -> None:
    """Layer 1 (the kernel) builds a config without asking a registry; `raysim.algorithms.check`,
    which every entry point calls after `load`, checks the registered names."""
    import subprocess
    import sys

    from raysim import algorithms

    cfg = config.load(None, ["algorithm.name=fedfoo", "data.name=imagenet"])
    assert cfg.algorithm["name"] == "fedfoo"
    with pytest.raises(ConfigError, match="unknown algorithm 'fedfoo'"):
        algorithms.check(cfg)
    loaded = subprocess.run([sys.executable, "-c", "import sys, raysim.config as c; c.load(); print(sorted(m for m in sys.modules if m.startswith(('raysim.algorithms', 'raysim.datasets', 'torch'))))"], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"  # neither a registry nor torch behind a config
