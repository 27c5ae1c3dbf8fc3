"""Settings from the environment and a config file, as argparse defaults: one layer under a command's flags.

Precedence: a flag on the command line, then GPTSERVE_<FLAG> in the environment (`--max-batch-size` is
GPTSERVE_MAX_BATCH_SIZE), then the `--config` YAML file (`max-batch-size: 16`), then the library's default. Each
value is checked here with its flag's own type and choices, so a mistake names the variable or the key it came from.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from pathlib import Path

PREFIX = "GPTSERVE_"
# GPTSERVE_ variables that name no serve flag: read elsewhere in gptserve, or by docker compose and nginx (the
# deployment's own settings, which an operator's shell may hold too). Any other is refused: a misspelt variable
# would otherwise be ignored without a word.
OTHER_VARIABLES = frozenset({
    "GPTSERVE_CACHE", "GPTSERVE_AUTH_TOKEN", "GPTSERVE_DEBUG", "GPTSERVE_CONFIG",
    "GPTSERVE_REPLICAS", "GPTSERVE_BIND", "GPTSERVE_TLS_DIR", "GPTSERVE_UPSTREAM_SERVERS", "GPTSERVE_LB_LISTEN",
    "GPTSERVE_HTTP_UPSTREAM_SERVERS", "GPTSERVE_HTTP_LB_LISTEN",
})
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingError(ValueError):
    """A value from the environment or the config file that its flag would refuse; the message names its source."""


def environment_name(action: argparse.Action) -> str:
    return PREFIX + action.dest.upper()


def file_key(action: argparse.Action) -> str:
    return action.option_strings[-1].removeprefix("--")


def layered_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags the layers may set: every option but help and --config itself."""
    return [action for action in parser._actions
            if action.option_strings and action.dest not in ("help", "config")
            and action.default is not argparse.SUPPRESS]


def convert(action: argparse.Action, value: object, source: str) -> object:
    """`value` (an environment string, or whatever YAML made of the file's text) as the flag would take it."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if isinstance(value, bool):
            return value
        if str(value).lower() in TRUE + FALSE:
            return str(value).lower() in TRUE
        raise SettingError(f"{source}: {value!r} is not a yes/no value ({', '.join(TRUE)}; {', '.join(FALSE)})")
    if isinstance(action, argparse._AppendAction):
        # A list in the file, comma-separated in the environment.
        items = value if isinstance(value, list) else [item.strip() for item in str(value).split(",") if item.strip()]
        return [convert_one(action, item, source) for item in items]
    return convert_one(action, value, source)


def convert_one(action: argparse.Action, value: object, source: str) -> object:
    if isinstance(value, list | dict) or value is None:
        raise SettingError(f"{source}: expected one value, got {value!r}")
    kind = action.type if callable(action.type) else str
    try:
        # YAML has already typed numbers; a bool (`port: yes`) is not one here.
        converted = value if type(value) is kind else kind(str(value))
    except (TypeError, ValueError):
        raise SettingError(f"{source}: {value!r} is not a valid {getattr(kind, '__name__', 'value')}") from None
    if action.choices is not None and converted not in action.choices:
        raise SettingError(f"{source}: {value!r}; expected one of {', '.join(map(str, action.choices))}")
    return converted


def read_config_file(path: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise SettingError(f"--config: cannot read {path}: {error.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise SettingError(f"--config: {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingError(f"--config: {path} must hold a mapping of settings (`max-batch-size: 16`), "
                           f"not a {type(data).__name__}")
    return data


def apply_layers(parser: argparse.ArgumentParser, config_file: str | None, environ: Mapping[str, str],
                 given: Collection[str] = ()) -> dict:
    """Sets `parser`'s defaults from the config file, then from the environment, except for the flags `given` on
    the command line (by dest); returns {dest: where from} for the values it set, so a later range check can name
    the variable or key rather than a flag never given. An empty variable counts as unset (docker compose passes
    unset ones empty). Unknown file keys and unknown GPTSERVE_ variables (but OTHER_VARIABLES) are refused."""
    actions = {file_key(action): action for action in layered_actions(parser)}
    values, origins = {}, {}
    if config_file:
        for key, value in read_config_file(config_file).items():
            action = actions.get(str(key).replace("_", "-"))
            if action is None:
                raise SettingError(f"{config_file}: unknown setting {key!r}; the keys are the flags of "
                                   f"`gptserve {parser.prog.split()[-1]} --help` without their dashes")
            source = f"{config_file}: {key}"
            values[action.dest], origins[action.dest] = convert(action, value, source), source
    known = {environment_name(action) for action in actions.values()} | OTHER_VARIABLES
    unknown = sorted(name for name, value in environ.items() if name.startswith(PREFIX) and value and name not in known)
    if unknown:
        raise SettingError(f"{unknown[0]}: no setting of `gptserve {parser.prog.split()[-1]}` has this name (each "
                           "flag's variable is GPTSERVE_ and the flag's name: --max-batch-size is "
                           "GPTSERVE_MAX_BATCH_SIZE)")
    for action in actions.values():
        name = environment_name(action)
        if environ.get(name):
            values[action.dest], origins[action.dest] = convert(action, environ[name], name), name
    for dest in given:
        values.pop(dest, None)
        origins.pop(dest, None)
    parser.set_defaults(**values)
    return origins
