import logging
from pathlib import Path

import optuna
import pytest

from search_spaces import SpaceError, available_spaces, load_space

# Flattened composed config as the sweep driver builds it (dotted key -> default).
VALID_KEYS = {
    "train.epochs": 10,
    "train.batch_size": 64,
    "train.lr": 3.0e-3,
    "train.weight_decay": 1.0e-4,
    "train.warmup_epochs": 1,
    "train.seed": 0,
    "student.arch": "mobilenet_v3_small",
    "student.width_mult": 1.0,
    "teacher.name": "cnn",
    "teacher.checkpoint": None,
    "teacher.freeze": True,
    "teacher.epochs": 10,
    "kd.enabled": False,
    "kd.T": 4.0,
    "kd.alpha": 0.5,
    "kd.teacher_logits": None,
    "pruning.mode": "none",
    "pruning.target_macs_ratio": 1.0,
    "pruning.at_epoch": 2,
    "pruning.steps": 3,
    "pruning.step_epochs": 1,
    "pruning.schedule": "linear",
    "pruning.importance": "l2",
    "features.sample_rate": 16000,
    "features.n_fft": 1024,
    "features.hop_length": 160,
    "features.n_mels": 64,
    "features.f_min": 20.0,
    "features.f_max": 8000.0,
    "scenario": "kd_progressive",
    "seed": 0,
}
SCENARIOS = ["nokd_noprune", "nokd_single", "nokd_progressive", "kd_noprune", "kd_single", "kd_progressive"]
ACCEPTED = {
    "pruning.mode": {"none", "single", "progressive", "unstructured"},
    "scenario": set(SCENARIOS),
    "kd.enabled": {True, False},
}

optuna.logging.set_verbosity(logging.WARNING)


def _load(name_or_path: str):
    return load_space(name_or_path, VALID_KEYS, ACCEPTED)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_shipped_spaces_are_listed_and_valid():
    assert set(available_spaces()) >= {"kd_prune", "kd", "prune", "scenarios", "quick"}
    for name in available_spaces():
        space = _load(name)
        assert space.name == name and space.description
        assert set(space.keys()) <= set(VALID_KEYS)


def test_kd_prune_space_matches_the_plan():
    space = _load("kd_prune")
    assert space.searcher == "optuna"
    assert space.params["kd.enabled"].values == (True,)
    assert (space.params["kd.T"].low, space.params["kd.T"].high) == (1.0, 8.0)
    assert space.params["features.n_mels"].values == (32, 48, 64, 96, 128)
    assert space.params["pruning.steps"].when == {"pruning.mode": ("progressive",)}
    assert space.params["train.lr"].type == "loguniform"


def test_define_by_run_samples_conditional_params_only_when_their_condition_holds():
    space = _load("kd_prune")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    modes_seen = set()
    for _ in range(40):
        trial = study.ask()
        config = space.define_by_run(trial)
        mode = config["pruning.mode"]
        modes_seen.add(mode)
        assert ("pruning.target_macs_ratio" in config) == (mode in ("single", "progressive"))
        assert ("pruning.steps" in config) == (mode == "progressive")
        assert ("pruning.step_epochs" in config) == (mode == "progressive")
        assert config["kd.enabled"] is True and config["train.epochs"] == 10
        assert 1.0 <= config["kd.T"] <= 8.0
        # Optuna saw exactly the sampled keys (fixed ones are constants, not distributions).
        sampled = {k for k in config if space.params.get(k) is not None and space.params[k].type != "fixed"}
        assert set(trial.params) == sampled
        study.tell(trial, config["kd.T"])
    assert modes_seen == {"none", "single", "progressive"}


def test_define_by_run_through_rays_optuna_search_yields_sampled_and_fixed_keys():
    from ray.tune.search.optuna import OptunaSearch

    space = _load("quick")
    searcher = OptunaSearch(
        space=space.define_by_run,
        metric=["val_acc", "target_macs"],
        mode=["max", "min"],
        sampler=optuna.samplers.RandomSampler(seed=1),
    )
    configs = [searcher.suggest(f"trial_{i}") for i in range(15)]
    for config in configs:
        assert config["train.epochs"] == 3 and config["kd.enabled"] is True
        assert "kd.T" in config and "features.n_mels" in config
        assert ("pruning.steps" in config) == (config["pruning.mode"] == "progressive")
    assert {config["pruning.mode"] for config in configs} == {"none", "single", "progressive"}


def test_scenarios_grid_expands_to_every_combination():
    space = _load("scenarios")
    grid = space.grid()
    (seed_key,) = [key for key in space.params if key != "scenario"]  # seed or train.seed
    assert len(grid) == 12
    assert {(config["scenario"], config[seed_key]) for config in grid} == {(s, seed) for s in SCENARIOS for seed in (0, 1)}


def test_grid_honours_when(tmp_path):
    space = _load(
        _write(
            tmp_path,
            """
searcher: grid
fixed: {train.epochs: 3}
params:
  pruning.mode: {type: grid, values: [none, single, progressive]}
  pruning.steps: {type: grid, values: [2, 3], when: {pruning.mode: progressive}}
""",
        )
    )
    grid = space.grid()
    assert len(grid) == 4
    assert {"pruning.mode": "none", "train.epochs": 3} in grid
    assert {"pruning.mode": "progressive", "pruning.steps": 3, "train.epochs": 3} in grid


def test_searcher_mismatched_methods_are_errors():
    with pytest.raises(SpaceError, match="searcher: grid"):
        _load("kd").grid()
    with pytest.raises(SpaceError, match="searcher: optuna"):
        _load("scenarios").define_by_run(optuna.create_study().ask())


def test_unknown_space_name_lists_available_spaces():
    with pytest.raises(SpaceError, match=r"unknown search space 'kd_prun'.*kd_prune"):
        _load("kd_prun")


def test_missing_file_path_is_an_error(tmp_path):
    with pytest.raises(SpaceError, match="no such search-space file"):
        _load(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "params, key, message",
    [
        ("kd.T: {type: normal, low: 1.0, high: 2.0}", "kd.T", "unknown type 'normal'"),
        ("kd.T: {type: uniform, low: 8.0, high: 1.0}", "kd.T", r"low \(8.0\) must be < high"),
        ("kd.T: {type: uniform, low: 1.0, high: 1.0}", "kd.T", "must be < high"),
        ("train.lr: {type: loguniform, low: 0.0, high: 1.0e-2}", "train.lr", "loguniform low must be > 0"),
        ("train.lr: {type: loguniform, low: 1e-3, high: 1.0e-2}", "train.lr", "YAML floats need a dot"),
        ("pruning.steps: {type: int, low: 2.5, high: 4}", "pruning.steps", "int low must be an integer"),
        ("kd.temperature: {type: uniform, low: 1.0, high: 2.0}", "kd.temperature", "not a key of the composed config"),
        ("n_mels: {type: categorical, choices: [32]}", "n_mels", "did you mean features.n_mels"),
        ("pruning.mode: {type: categorical, choices: [none, magic]}", "pruning.mode", "'magic' is not accepted"),
        ("pruning.mode: {type: fixed, value: magic}", "pruning.mode", "'magic' is not accepted"),
        ("features.n_mels: {type: categorical, choices: []}", "features.n_mels", "non-empty list"),
        ("kd.T: {type: uniform, low: 1.0, hgih: 2.0}", "kd.T", "unknown field 'hgih'"),
        ("kd.T: {type: uniform, low: 1.0}", "kd.T", "needs high"),
        (
            "pruning.steps: {type: int, low: 2, high: 4, when: {pruning.mode: progressive}}\n"
            "  pruning.mode: {type: categorical, choices: [none, progressive]}",
            "pruning.steps",
            "'pruning.mode', which is not a param defined earlier",
        ),
        (
            "pruning.steps: {type: int, low: 2, high: 4, when: {pruning.made: progressive}}",
            "pruning.steps",
            "not a param defined earlier",
        ),
        (
            "pruning.mode: {type: categorical, choices: [none, progressive]}\n"
            "  pruning.steps: {type: int, low: 2, high: 4, when: {pruning.mode: progresive}}",
            "pruning.steps",
            "pruning.mode only takes",
        ),
        (
            "kd.T: {type: uniform, low: 1.0, high: 2.0}\n"
            "  kd.alpha: {type: uniform, low: 0.1, high: 0.9, when: {kd.T: 1.5}}",
            "kd.alpha",
            "can only test categorical/fixed/grid",
        ),
        ("seed: {type: grid, values: [0, 1]}", "seed", "cannot be used with searcher 'optuna'"),
        ("kd.T: {type: uniform, low: 1.0, high: 2.0}\n  kd.T: {type: uniform, low: 1.0, high: 3.0}", "kd.T", "duplicate key"),
    ],
)
def test_invalid_params_name_the_file_and_key(tmp_path, params, key, message):
    path = _write(tmp_path, f"searcher: optuna\nparams:\n  {params}\n")
    with pytest.raises(SpaceError, match=message) as error:
        _load(path)
    assert str(error.value).startswith(path)
    assert key in str(error.value)


@pytest.mark.parametrize(
    "document, key, message",
    [
        ("searcher: hyperopt\nparams: {}", "searcher", "'hyperopt' is not one of optuna, grid"),
        ("seracher: optuna\nparams: {}", "seracher", "unknown top-level field"),
        ("fixed: {train.epoch: 3}\nparams: {}", "train.epoch", "not a key of the composed config"),
        ("fixed: {scenario: kd_only}\nparams: {}", "scenario", "'kd_only' is not accepted"),
        ("searcher: grid\nparams:\n  scenario: {type: grid, values: [kd_single, kd_only]}", "scenario", "not accepted"),
        ("searcher: grid\nparams:\n  kd.T: {type: uniform, low: 1.0, high: 2.0}", "kd.T", "cannot be used with searcher 'grid'"),
        ("fixed: {kd.T: 2.0}\nparams:\n  kd.T: {type: uniform, low: 1.0, high: 2.0}", "kd.T", "set both under fixed"),
        ("description: x", "params", "missing"),
    ],
)
def test_invalid_documents_name_the_file_and_key(tmp_path, document, key, message):
    path = _write(tmp_path, document)
    with pytest.raises(SpaceError, match=message) as error:
        _load(path)
    assert str(error.value).startswith(path)
    assert key in str(error.value)
