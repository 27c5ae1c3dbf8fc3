"""Readers for the deployment files, as docker and nginx read them: compose interpolation, Dockerfile stages,
.dockerignore matching, nginx-image template rendering. Only the parts of each format these files use."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
TLS_OVERLAY = REPO / "deploy" / "compose.tls.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
NGINX_TEMPLATE = REPO / "deploy" / "nginx" / "gptserve.conf.template"
NGINX_TLS_CONF = REPO / "deploy" / "nginx" / "tls.conf"
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"

# Compose's ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+other}, $NAME, $$.
_COMPOSE_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class UnsetVariable(KeyError):
    pass


def interpolate(value, environ: dict[str, str]):
    """`value` (a loaded compose document or any part of it) with its variables substituted, as compose does."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        operator, argument = match["operator"], match["argument"]
        current = environ.get(name)
        unset_or_empty = not current if operator and operator.startswith(":") else current is None
        if operator in (":-", "-"):
            return argument if unset_or_empty else current
        if operator in (":?", "?"):
            if unset_or_empty:
                raise UnsetVariable(f"{name}: {argument}")
            return current
        if operator in (":+", "+"):
            return "" if unset_or_empty else argument
        return current or ""

    return _COMPOSE_VARIABLE.sub(substitute, value)


def compose_variables(text: str) -> dict[str, str | None]:
    """Every variable a compose file reads (comments aside): {name: its default, or None without one}."""
    found: dict[str, str | None] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for match in _COMPOSE_VARIABLE.finditer(line):
            name = match["braced"] or match["bare"]
            if name:
                default = match["argument"] if match["operator"] in (":-", "-") else None
                found[name] = found.get(name) or default
    return found


def load_compose(path: Path, environ: dict[str, str] | None = None) -> dict:
    """The compose file as compose sees it: YAML (merge keys resolved), then interpolated from `environ`."""
    document = yaml.safe_load(path.read_text())
    return document if environ is None else interpolate(document, environ)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [arguments for name, arguments in self.instructions if name == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def lineage(self, name: str) -> list[Stage]:
        """The stage and those it is built FROM inside this Dockerfile, nearest first."""
        chain = [self.stage(name)]
        while any(stage.name == chain[-1].base for stage in self.stages):
            chain.append(self.stage(chain[-1].base))
        return chain


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions by stage: continuation lines joined, comment lines (also inside continuations) dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    global_args, stages = {}, []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, found {line!r}"
            arg_name, _, default = arguments.partition("=")
            global_args[arg_name] = default
        else:
            stages[-1].instructions.append((keyword, arguments))
    return Dockerfile(global_args, stages)


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def in_build_context(relative: str, patterns: list[str]) -> bool:
    """Whether a path (relative to the context) is sent to the builder: the last pattern matching it or one of its
    parents decides, `!` patterns including again (docker's rule; `**` stands for any number of folders)."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if any(_glob_match(candidate, glob) for candidate in candidates):
            included = negated
    return included


def _glob_match(path: str, glob: str) -> bool:
    if glob.startswith("**/"):
        tail = glob[3:]
        return any(_glob_match("/".join(path.split("/")[index:]), tail) for index in range(len(path.split("/"))))
    path_parts, glob_parts = path.split("/"), glob.split("/")
    return len(path_parts) == len(glob_parts) and all(map(fnmatch.fnmatchcase, path_parts, glob_parts))


_TEMPLATE_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def template_placeholders(text: str) -> set[str]:
    """The ${NAME} placeholders of an nginx-image template, comments aside."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return set(_TEMPLATE_PLACEHOLDER.findall(code))


def render_template(text: str, values: dict[str, str]) -> str:
    """What the nginx image's entrypoint does to a template: envsubst of the variables it has (`values`), every
    other ${...} left as it is. Every placeholder the template uses must be given."""
    missing = template_placeholders(text) - set(values)
    assert not missing, f"no value for the template's placeholders {sorted(missing)}"
    return _TEMPLATE_PLACEHOLDER.sub(lambda match: values.get(match[1], match[0]), text)
