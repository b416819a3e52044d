"""NNI experiment configs (v1 and v2 keys) read as study settings, so the original series' config.yml still works.

Only what a study can use is kept: the search space, trial budget, duration, concurrency, tuner
(as an Optuna sampler) and its seed. Keys that describe NNI's own machinery (trial command,
training service, log folders, ...) are ignored with a warning each; unknown keys are errors,
so a typo is not silently ignored.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effcifar.config import read_config_file
from effcifar.errors import ConfigError

TUNERS = {"TPE": "tpe", "Random": "random", "Evolution": "nsga2"}  # NNI builtin name -> our sampler
SAMPLERS = ("tpe", "random", "cmaes", "nsga2")
SAMPLER_NAMES = {**{name.lower(): sampler for name, sampler in TUNERS.items()}, **{s: s for s in SAMPLERS}}
DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", re.IGNORECASE)  # NNI takes 1H too
UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
TRAINER = "ignored; each trial runs effcifar's trainer"
LOCAL = "ignored; trials run as worker processes on this machine (--workers)"
GPU = "ignored; each worker process uses one device (pin GPUs with CUDA_VISIBLE_DEVICES)"
NNI_ONLY = "ignored; there is no NNI manager here"
OUTPUT = "ignored; a study writes everything to its run directory (--out)"
IGNORED = {
    "authorName": "ignored; NNI metadata", "description": "ignored; NNI metadata",
    "useAnnotation": "ignored; the search space comes from a file", "multiPhase": NNI_ONLY,
    "trainingServicePlatform": LOCAL, "trainingService": LOCAL, "localConfig": LOCAL,
    "machineList": LOCAL, "remoteConfig": LOCAL, "trialCommand": TRAINER, "trialCodeDirectory": TRAINER,
    "trialGpuNumber": GPU, "logDir": OUTPUT, "experimentWorkingDirectory": OUTPUT, "logLevel": NNI_ONLY,
    "debug": NNI_ONLY, "nniManagerIp": NNI_ONLY, "multiThread": NNI_ONLY, "versionCheck": NNI_ONLY,
    "logCollection": NNI_ONLY, "tunerGpuIndices": "ignored; the sampler runs on the CPU",
    "maxTrialDuration": "ignored; trials have no time limit (stop poor ones early with --pruner)",
    "assessor": "ignored; early stopping of poor trials is set with --pruner (median by default)",
}
SETTINGS = ("experimentName", "experimentType", "searchSpacePath", "searchSpaceFile", "searchSpace", "trialConcurrency",
            "maxExecDuration", "maxExperimentDuration", "maxTrialNum", "maxTrialNumber", "tuner", "trial")
SPACE_KEYS = ("searchSpacePath", "searchSpaceFile", "searchSpace")
TUNER_KEYS = ("builtinTunerName", "name", "classArgs", "gpuIndices", "gpuNum", "includeIntermediateResults")
CUSTOM_TUNER_KEYS = ("codeDir", "codeDirectory", "classFileName", "className")


@dataclass
class ExperimentSettings:
    """What a study takes from an NNI experiment config; None where the config does not say."""

    search_space_file: str | None  # resolved relative to the config file's directory
    search_space: dict[str, Any] | None  # v2 inline `searchSpace`
    trials: int | None  # maxTrialNum / maxTrialNumber
    timeout: float | None  # seconds, from maxExecDuration / maxExperimentDuration
    workers: int | None  # trialConcurrency
    sampler: str | None  # from tuner builtinTunerName / name
    direction: str = "maximize"  # tuner.classArgs.optimize_mode (only maximize: trials report accuracy)
    seed: int | None = None  # tuner.classArgs.seed
    name: str | None = None  # experimentName
    warnings: list[str] = field(default_factory=list)  # one line per ignored key


def parse_duration(text: str | int | float, where: str) -> float:
    """Seconds from NNI's duration format ("100h", "30m", "45s", "1d", "2.5h") or a number of seconds."""
    expected = f"{where}: expected a duration such as 100h, 30m, 45s, 1d or a number of seconds > 0, got {text!r}"
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ConfigError(expected)
    if isinstance(text, str):
        match = DURATION.fullmatch(text)
        seconds = float(match[1]) * UNIT_SECONDS[match[2].lower()] if match else 0.0
    else:
        seconds = float(text)
    if not 0 < seconds < float("inf"):
        raise ConfigError(expected)
    return seconds


def positive_int(value: Any, where: str) -> int:
    """A positive integer setting, or an error naming where it came from."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def concurrency(value: Any, where: str) -> int:
    """trialConcurrency as worker processes: 1 to `max_workers()` on this machine, or an error naming the key."""
    from effcifar.studies import max_workers

    if positive_int(value, where) > max_workers():
        raise ConfigError(f"{where}: expected 1 to {max_workers()} worker processes on this machine, got {value!r}")
    return value


def first(data: dict[str, Any], *keys: str) -> tuple[str, Any] | None:
    """(key, value) of the first of these keys (v1 and v2 spellings) present in `data`."""
    return next(((key, data[key]) for key in keys if key in data), None)


def nni_spelling(data: dict[str, Any], known: tuple[str, ...], where: str) -> dict[str, Any]:
    """`data` with each key spelled as in `known` when it differs only in case and underscores, as NNI's v2
    configs allow (max_trial_number, MaxTrialNumber); two spellings of one key are an error."""
    canonical = {key.replace("_", "").lower(): key for key in known}
    spelled: dict[str, Any] = {}
    for key, value in data.items():
        name = canonical.get(str(key).replace("_", "").lower(), key)
        if name in spelled:
            raise ConfigError(f"{where}: key '{key}': given twice (as '{name}' too)")
        spelled[name] = value
    return spelled


def parse_tuner(tuner: Any, source: Path) -> tuple[str, int | None, list[str]]:
    """(sampler, seed, warnings) from NNI's `tuner` section."""
    where = f"{source}: key 'tuner"
    if not isinstance(tuner, dict):
        raise ConfigError(f"{where}': expected a mapping with builtinTunerName (v1) or name (v2), got {tuner!r}")
    tuner = nni_spelling(tuner, (*TUNER_KEYS, *CUSTOM_TUNER_KEYS), f"{source}: section 'tuner'")
    custom = [key for key in CUSTOM_TUNER_KEYS if key in tuner]
    if custom:
        raise ConfigError(f"{where}.{custom[0]}': custom tuner classes cannot run here; use builtinTunerName")
    unknown = [key for key in tuner if key not in TUNER_KEYS]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}': unknown key; expected only {', '.join(TUNER_KEYS)}")
    name_key, name = first(tuner, "builtinTunerName", "name") or (None, None)
    choices = f"{', '.join(TUNERS)} (or {', '.join(SAMPLERS)})"
    if name_key is None:
        raise ConfigError(f"{where}': expected builtinTunerName (v1) or name (v2), one of {choices}")
    if not isinstance(name, str) or name.lower() not in SAMPLER_NAMES:
        raise ConfigError(f"{where}.{name_key}': tuner {name!r} is not available here; expected one of {choices}")
    warnings = [f"tuner.{key}: ignored; the sampler runs on the CPU" for key in ("gpuIndices", "gpuNum")
                if key in tuner]
    if "includeIntermediateResults" in tuner:
        warnings.append("tuner.includeIntermediateResults: ignored; the sampler learns from final accuracies (the "
                        "pruner reads the per-epoch ones)")
    args = tuner.get("classArgs", {})
    if not isinstance(args, dict):
        raise ConfigError(f"{where}.classArgs': expected a mapping, got {args!r}")
    mode = args.get("optimize_mode", "maximize")
    if mode != "maximize":
        raise ConfigError(f"{where}.classArgs.optimize_mode': expected maximize (trials report accuracy), got {mode!r}")
    seed = args.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"{where}.classArgs.seed': expected an integer, got {seed!r}")
    warnings += [f"tuner.classArgs.{key}: ignored; the Optuna sampler uses its own settings"
                 for key in args if key not in ("optimize_mode", "seed")]
    return SAMPLER_NAMES[name.lower()], seed, warnings


def check_keys(data: dict[str, Any], source: Path) -> list[str]:
    """Warnings for the keys that mean nothing here; an error for advisors and unknown keys."""
    if "advisor" in data:
        raise ConfigError(f"{source}: key 'advisor': NNI advisors (Hyperband, BOHB) are not available; "
                          f"use tuner TPE, Random or Evolution with --pruner hyperband")
    for key in data:
        if key not in SETTINGS and key not in IGNORED:
            close = difflib.get_close_matches(str(key), [*SETTINGS, *IGNORED], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{source}: unknown key '{key}' ({hint}known keys: {', '.join([*SETTINGS, *IGNORED])})")
    warnings = [f"{key}: {IGNORED[key]}" for key in data if key in IGNORED]
    trial = data.get("trial", {})
    if not isinstance(trial, dict):
        raise ConfigError(f"{source}: key 'trial': expected a mapping (command, codeDir, gpuNum), got {trial!r}")
    return warnings + [f"trial.{key}: {GPU if key == 'gpuNum' else TRAINER}" for key in trial]


def load_experiment(path: str | Path) -> ExperimentSettings:
    """Read an NNI experiment config (v1 or v2 keys); errors name the file and key."""
    path = Path(path)
    data = nni_spelling(read_config_file(path), (*SETTINGS, *IGNORED, "advisor"), str(path))
    warnings = check_keys(data, path)
    kind = data.get("experimentType", "hpo")
    if kind != "hpo":
        raise ConfigError(f"{path}: key 'experimentType': expected hpo (architecture search is effcifar supernet and "
                          f"search), got {kind!r}")
    spaces = [key for key in SPACE_KEYS if key in data]
    if len(spaces) > 1:
        raise ConfigError(f"{path}: keys {' and '.join(spaces)}: expected only one search space")
    space_file, space = None, data.get("searchSpace")
    if space is not None and not isinstance(space, dict):
        raise ConfigError(f"{path}: key 'searchSpace': expected a mapping (an NNI search space), got {space!r}")
    if spaces and spaces[0] != "searchSpace":
        if not isinstance(data[spaces[0]], str) or not data[spaces[0]]:
            raise ConfigError(f"{path}: key '{spaces[0]}': expected a file path, got {data[spaces[0]]!r}")
        space_file = str(path.parent / data[spaces[0]])  # an absolute path stays as it is
    trials, duration, workers = (first(data, *keys) for keys in (
        ("maxTrialNum", "maxTrialNumber"), ("maxExecDuration", "maxExperimentDuration"), ("trialConcurrency",)))
    name = data.get("experimentName")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{path}: key 'experimentName': expected a string, got {name!r}")
    sampler, seed = None, None
    if "tuner" in data:
        sampler, seed, tuner_warnings = parse_tuner(data["tuner"], path)
        warnings += tuner_warnings
    return ExperimentSettings(
        search_space_file=space_file, search_space=space,
        trials=positive_int(trials[1], f"{path}: key '{trials[0]}'") if trials else None,
        timeout=parse_duration(duration[1], f"{path}: key '{duration[0]}'") if duration else None,
        workers=concurrency(workers[1], f"{path}: key '{workers[0]}'") if workers else None,
        sampler=sampler, seed=seed, name=name, warnings=warnings,
    )
