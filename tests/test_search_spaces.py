import logging
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search_spaces import SpaceError, available_spaces, load_space

SCENARIOS = ["nokd_noprune", "nokd_single", "nokd_progressive", "kd_noprune", "kd_single", "kd_progressive"]

optuna.logging.set_verbosity(logging.WARNING)


@pytest.fixture(scope="module")
def valid_keys() -> dict:
    """The real composed sweep config as the driver sees it: run config only (no sweep keys), flattened
    to dotted keys."""
    from common.cli import compose
    from common.tracking import flatten
    from sweeps.run import sweep_settings

    base_config, _ = sweep_settings(compose("sweep"))
    return flatten(base_config)


@pytest.fixture(scope="module")
def accepted() -> dict:
    from common.config import accepted_values

    return accepted_values()


@pytest.fixture
def load(valid_keys, accepted):
    return lambda name_or_path: load_space(name_or_path, valid_keys, accepted)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def _sample(space, n: int, seed: int = 0) -> list[tuple[optuna.trial.Trial, dict]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    samples = []
    for _ in range(n):
        trial = study.ask()
        samples.append((trial, space.define_by_run(trial)))
        study.tell(trial, 0.0)
    return samples


def test_real_config_has_the_keys_the_spaces_use(valid_keys, accepted):
    for key in (
        "train.epochs",
        "train.lr",
        "train.seed",
        "kd.enabled",
        "kd.T",
        "pruning.mode",
        "pruning.at_epoch",
        "pruning.steps",
        "features.n_mels",
        "student.width_mult",
        "scenario",
    ):
        assert key in valid_keys, key
    assert set(SCENARIOS) <= set(accepted["scenario"])
    assert {"none", "single", "progressive"} <= set(accepted["pruning.mode"])


def test_shipped_spaces_are_listed_and_valid(load, valid_keys):
    assert set(available_spaces()) >= {"kd_prune", "kd", "prune", "scenarios", "quick"}
    for name in available_spaces():
        space = load(name)
        assert space.name == name and space.description
        assert set(space.keys()) <= set(valid_keys)


def test_kd_prune_space_matches_the_plan(load):
    space = load("kd_prune")
    assert space.searcher == "optuna"
    assert space.pinned == {"train.epochs": 10, "pruning.at_epoch": 3, "kd.enabled": True}  # at_epoch is 1-based
    assert space.params["kd.T"].distribution == FloatDistribution(1.0, 8.0)
    assert space.params["features.n_mels"].distribution == CategoricalDistribution([32, 48, 64, 96, 128])
    assert space.params["pruning.steps"].distribution == IntDistribution(2, 4)
    assert space.params["pruning.steps"].when == {"pruning.mode": ("progressive",)}
    assert space.params["train.lr"].distribution == FloatDistribution(1.0e-3, 1.0e-2, log=True)
    assert list(space.params)[:2] == ["kd.T", "kd.alpha"]  # file order
    assert load("prune").pinned["pruning.at_epoch"] == 3 and load("quick").pinned["pruning.at_epoch"] == 2


def test_define_by_run_samples_conditional_params_only_when_their_condition_holds(load):
    space = load("kd_prune")
    modes_seen = set()
    for trial, config in _sample(space, 40):
        mode = config["pruning.mode"]
        modes_seen.add(mode)
        assert ("pruning.target_macs_ratio" in config) == (mode in ("single", "progressive"))
        assert ("pruning.steps" in config) == (mode == "progressive")
        assert ("pruning.step_epochs" in config) == (mode == "progressive")
        assert 1.0 <= config["kd.T"] <= 8.0 and 1.0e-3 <= config["train.lr"] <= 1.0e-2
        # Optuna saw exactly the sampled keys (pins are constants, not distributions).
        assert set(trial.params) == set(config) - set(space.pinned)
        assert trial.distributions["kd.T"] == space.params["kd.T"].distribution
    assert modes_seen == {"none", "single", "progressive"}


def test_pinned_values_appear_in_every_trial(load, tmp_path):
    space = load("quick")
    for _, config in _sample(space, 20):
        # pins are unconditional: pruning.steps is set even when the sampled mode ignores it
        assert {key: config[key] for key in space.pinned} == space.pinned
        assert config["pruning.steps"] == 2 and config["kd.enabled"] is True
    grid = load(
        _write(
            tmp_path,
            "searcher: grid\nparams:\n  train.epochs: 3\n  kd.enabled: false\n"
            "  train.seed: {type: grid, values: [0, 1, 2]}\n",
        )
    ).grid()
    assert grid == [{"train.epochs": 3, "kd.enabled": False, "train.seed": seed} for seed in (0, 1, 2)]


def test_possible_values(load):
    space = load("kd_prune")
    assert space.possible_values("pruning.mode") == ("none", "single", "progressive")
    assert space.possible_values("kd.enabled") == (True,)
    assert space.possible_values("pruning.at_epoch") == (3,)
    assert space.possible_values("kd.T") is None and space.possible_values("pruning.steps") is None
    assert space.possible_values("teacher.name") is None  # not in the space
    grid = load("scenarios")
    assert grid.possible_values("scenario") == tuple(SCENARIOS) and grid.possible_values("train.seed") == (0, 1)


def test_define_by_run_through_rays_optuna_search_yields_sampled_and_pinned_keys(load):
    from ray.tune.search.optuna import OptunaSearch

    space = load("quick")
    searcher = OptunaSearch(
        space=space.define_by_run,
        metric=["val_acc", "target_macs"],
        mode=["max", "min"],
        sampler=optuna.samplers.RandomSampler(seed=1),
    )
    configs = [searcher.suggest(f"trial_{i}") for i in range(15)]
    for config in configs:
        assert config["train.epochs"] == 3 and config["kd.enabled"] is True and config["pruning.steps"] == 2
        assert "kd.T" in config and "features.n_mels" in config
        assert ("pruning.target_macs_ratio" in config) == (config["pruning.mode"] != "none")
    assert {config["pruning.mode"] for config in configs} == {"none", "single", "progressive"}


def test_scenarios_grid_expands_to_every_combination(load):
    space = load("scenarios")
    grid = space.grid()
    assert len(grid) == 12
    assert {(config["scenario"], config["train.seed"]) for config in grid} == {
        (s, seed) for s in SCENARIOS for seed in (0, 1)
    }


def test_grid_honours_when(load, tmp_path):
    space = load(
        _write(
            tmp_path,
            """
searcher: grid
params:
  train.epochs: 3
  pruning.mode: {type: grid, values: [none, single, progressive]}
  pruning.steps: {type: grid, values: [2, 3], when: {pruning.mode: progressive}}
""",
        )
    )
    grid = space.grid()
    assert len(grid) == 4
    assert grid[0] == {"train.epochs": 3, "pruning.mode": "none"}
    assert {"pruning.mode": "progressive", "pruning.steps": 3, "train.epochs": 3} in grid


def test_when_may_test_an_earlier_pin(load, tmp_path):
    space = load(
        _write(
            tmp_path,
            "params:\n  kd.enabled: true\n  kd.T: {type: float, low: 1.0, high: 2.0, when: {kd.enabled: true}}\n",
        )
    )
    assert all("kd.T" in config for _, config in _sample(space, 3))


def test_yaml_reads_exponent_floats_without_a_dot(load, tmp_path):
    # OmegaConf's loader reads 1e-3 as a float (plain YAML 1.1 reads it as a string).
    space = load(_write(tmp_path, "params:\n  train.lr: {type: float, low: 1e-3, high: 1e-2, log: true}\n"))
    assert space.params["train.lr"].distribution == FloatDistribution(1.0e-3, 1.0e-2, log=True)


def test_float_and_int_steps(load, tmp_path):
    space = load(
        _write(
            tmp_path,
            "params:\n  kd.T: {type: float, low: 1.0, high: 3.0, step: 0.5}\n"
            "  pruning.steps: {type: int, low: 2, high: 8, step: 2}\n",
        )
    )
    for _, config in _sample(space, 10):
        assert config["kd.T"] in (1.0, 1.5, 2.0, 2.5, 3.0) and config["pruning.steps"] in (2, 4, 6, 8)


def test_searcher_mismatched_methods_are_errors(load):
    with pytest.raises(SpaceError, match="searcher: grid"):
        load("kd").grid()
    with pytest.raises(SpaceError, match="searcher: optuna"):
        load("scenarios").define_by_run(optuna.create_study().ask())


def test_unknown_space_name_lists_available_spaces(load):
    with pytest.raises(SpaceError, match=r"unknown search space 'kd_prun'.*kd_prune"):
        load("kd_prun")


def test_missing_file_path_is_an_error(load, tmp_path):
    with pytest.raises(SpaceError, match="no such search-space file"):
        load(str(tmp_path / "nope.yaml"))


def test_invalid_yaml_is_one_line(load, tmp_path):
    path = _write(tmp_path, "params:\n  kd.T: {type: float, low: [1.0\n")
    with pytest.raises(SpaceError, match="invalid YAML") as error:
        load(path)
    assert str(error.value).startswith(path) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "params, key, message",
    [
        ("kd.T: {type: normal, low: 1.0, high: 2.0}", "kd.T", "unknown type 'normal'"),
        ("kd.T: {type: uniform, low: 1.0, high: 2.0}", "kd.T", "unknown type 'uniform'"),
        ("kd.enabled: {type: fixed, value: true}", "kd.enabled", "unknown type 'fixed'.*plain value to pin"),
        ("kd.T: {low: 1.0, high: 2.0}", "kd.T", "unknown type None"),
        # bounds: Optuna's own checks, as one-line SpaceErrors
        ("kd.T: {type: float, low: 8.0, high: 1.0}", "kd.T", "`low <= high` must hold"),
        ("pruning.steps: {type: int, low: 4, high: 2}", "pruning.steps", "`low <= high` must hold"),
        (
            "train.lr: {type: float, low: 0.0, high: 1.0e-2, log: true}",
            "train.lr",
            "`low > 0` must hold for `log=True`",
        ),
        ("pruning.steps: {type: int, low: 0, high: 4, log: true}", "pruning.steps", "`low >= 1` must hold"),
        ("kd.T: {type: float, low: 1.0, high: 2.0, log: true, step: 0.5}", "kd.T", "`step` is not supported"),
        ("kd.T: {type: float, low: 1.0, high: 2.0, step: -0.5}", "kd.T", "`step > 0` must hold"),
        ("features.n_mels: {type: categorical, choices: [[32, 64]]}", "features.n_mels", "Choices for a categorical"),
        # bounds: our own checks on the YAML values
        ("pruning.steps: {type: int, low: 2.5, high: 4}", "pruning.steps", "low must be a finite integer"),
        ("kd.T: {type: float, low: one, high: 2.0}", "kd.T", "low must be a finite number"),
        ("kd.T: {type: float, low: 1.0, high: .inf}", "kd.T", "high must be a finite number"),
        ("kd.temperature: {type: float, low: 1.0, high: 2.0}", "kd.temperature", "not a key of the composed config"),
        ("kd.temperature: 2.0", "kd.temperature", "not a key of the composed config"),
        ("n_mels: {type: categorical, choices: [32]}", "n_mels", "did you mean features.n_mels"),
        ("pruning.mode: {type: categorical, choices: [none, magic]}", "pruning.mode", "'magic' is not accepted"),
        ("pruning.mode: magic", "pruning.mode", "'magic' is not accepted"),
        ("features.n_mels: {type: categorical, choices: []}", "features.n_mels", "non-empty list"),
        ("features.n_mels: {type: categorical, choices: 32}", "features.n_mels", "non-empty list"),
        ("kd.T: {type: float, low: 1.0, hgih: 2.0}", "kd.T", "unknown field 'hgih'"),
        ("kd.T: {type: float, low: 1.0}", "kd.T", "needs high"),
        ("kd.T: {type: float, low: 1.0, high: 2.0, when: progressive}", "kd.T", "when must be a mapping"),
        (
            "pruning.steps: {type: int, low: 2, high: 4, when: {pruning.mode: progressive}}\n"
            "  pruning.mode: {type: categorical, choices: [none, progressive]}",
            "pruning.steps",
            "'pruning.mode', not a pin or categorical/grid param earlier",
        ),
        (
            "kd.T: {type: float, low: 1.0, high: 2.0, when: {kd.enabled: true}}\n  kd.enabled: true",
            "kd.T",
            "'kd.enabled', not a pin or categorical/grid param earlier",
        ),
        (
            "pruning.steps: {type: int, low: 2, high: 4, when: {pruning.made: progressive}}",
            "pruning.steps",
            "not a pin or categorical/grid param earlier",
        ),
        (
            "pruning.mode: {type: categorical, choices: [none, progressive]}\n"
            "  pruning.steps: {type: int, low: 2, high: 4, when: {pruning.mode: progresive}}",
            "pruning.steps",
            "pruning.mode only takes",
        ),
        (
            "kd.enabled: true\n  kd.T: {type: float, low: 1.0, high: 2.0, when: {kd.enabled: false}}",
            "kd.T",
            r"kd.enabled only takes \[True\]",
        ),
        (
            "kd.T: {type: float, low: 1.0, high: 2.0}\n"
            "  kd.alpha: {type: float, low: 0.1, high: 0.9, when: {kd.T: 1.5}}",
            "kd.alpha",
            "'kd.T', not a pin or categorical/grid param",
        ),
        ("train.seed: {type: grid, values: [0, 1]}", "train.seed", "type 'grid' cannot be used with searcher 'optuna'"),
        (
            "kd.T: {type: float, low: 1.0, high: 2.0}\n  kd.T: {type: float, low: 1.0, high: 3.0}",
            "kd.T",
            "duplicate key",
        ),
        ("kd.T: 2.0\n  kd.T: {type: float, low: 1.0, high: 3.0}", "kd.T", "duplicate key"),
    ],
)
def test_invalid_params_name_the_file_and_key(load, tmp_path, params, key, message):
    path = _write(tmp_path, f"searcher: optuna\nparams:\n  {params}\n")
    with pytest.raises(SpaceError, match=message) as error:
        load(path)
    assert str(error.value).startswith(path)
    assert key in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "document, key, message",
    [
        ("searcher: hyperopt\nparams: {}", "searcher", "'hyperopt' is not one of optuna, grid"),
        ("seracher: optuna\nparams: {}", "seracher", "unknown top-level field"),
        ("fixed: {train.epochs: 3}\nparams: {}", "fixed", "unknown top-level field"),  # the old grammar
        ("params:\n  train.epoch: 3", "train.epoch", "not a key of the composed config"),
        ("params:\n  scenario: kd_only", "scenario", "'kd_only' is not accepted"),
        ("searcher: grid\nparams:\n  scenario: {type: grid, values: [kd_single, kd_only]}", "scenario", "not accepted"),
        ("searcher: grid\nparams:\n  train.seed: {type: grid, values: []}", "train.seed", "non-empty list"),
        (
            "searcher: grid\nparams:\n  kd.T: {type: float, low: 1.0, high: 2.0}",
            "kd.T",
            "type 'float' cannot be used with searcher 'grid'",
        ),
        ("description: x", "params", "missing"),
        ("params: [kd.T]", "params", "not a mapping"),
    ],
)
def test_invalid_documents_name_the_file_and_key(load, tmp_path, document, key, message):
    path = _write(tmp_path, document)
    with pytest.raises(SpaceError, match=message) as error:
        load(path)
    assert str(error.value).startswith(path)
    assert key in str(error.value)
