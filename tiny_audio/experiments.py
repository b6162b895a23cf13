"""Experiment files: finding one by name or path, reading its YAML, applying `section.key=value` overrides, and
turning every mistake (unknown key, wrong type, impossible value, bad YAML) into ONE line that names the key, the
file it came from and what is allowed. The settings themselves, with their defaults, are tiny_audio.config's.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tiny_audio.config import EXPERIMENTS_DIR, Config, Section
from tiny_audio.errors import ConfigError


def available_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def experiment_path(experiment: str) -> Path:
    """An experiment name (`mlp`) or a path to a YAML file -> the YAML file."""
    candidate = Path(experiment)
    if candidate.suffix in (".yaml", ".yml") or os.sep in experiment:
        if not candidate.is_file():
            raise ConfigError(f"experiment file {experiment} does not exist")
        return candidate.resolve()
    path = EXPERIMENTS_DIR / f"{experiment}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown experiment '{experiment}': choose one of {', '.join(available_experiments())} "
            f"or give a path to a YAML file"
        )
    return path


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=3e-4` -> (["training", "learning_rate"], 3e-4); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string; a number is what anyone typing it means.
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.split("."), value


def _set_dotted(tree: dict[str, Any], keys: list[str], value: Any, source: str) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])} is not a section (in {source})")
        node = child
    node[keys[-1]] = value


def _format_error(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "<root>"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _section_for(error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the docs"
        return f"unknown key '{key}' in {source}; allowed here: {allowed}"
    message = error["msg"]
    if kind == "literal_error":
        message = message.replace("Input should be", "must be")
    return f"{key}: {message} (got {error.get('input')!r}, in {source})"


def _section_for(loc: tuple[Any, ...]) -> type[Section] | None:
    """The config section class at a validation error's location (to list the keys allowed there)."""
    section: type[Section] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = section.model_fields.get(str(part))
        found = _find_section(field.annotation) if field else None
        if found is None:
            return None
        section = found
    return section


def _find_section(annotation: Any) -> type[Section] | None:
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _find_section(arg)
        if found is not None:
            return found
    return None


def load_config(experiment: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve an experiment name or YAML path, apply `section.key=value` overrides, validate everything."""
    path = experiment_path(experiment)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, projector, data, ...)")
    raw.setdefault("experiment", path.stem)
    _resolve_relative_files(raw, path.parent)
    source = str(path)
    problems: list[str] = []
    try:
        Config.model_validate(raw)
    except ValidationError as exc:
        problems += [_format_error(e, source) for e in exc.errors()]
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(raw, keys, value, f"override '{text}'")
    if overrides and not problems:
        try:
            return Config.model_validate(raw)
        except ValidationError as exc:
            problems += [_format_error(e, "the command-line overrides") for e in exc.errors()]
    if problems:
        raise ConfigError("; ".join(problems))
    return Config.model_validate(raw)


def _resolve_relative_files(raw: dict[str, Any], base: Path) -> None:
    """data_files given relative to the experiment file are made absolute, so a copied YAML keeps working."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    sources = [*list(data.get("train") or []), data.get("eval")]
    for source in sources:
        if not isinstance(source, dict):
            continue
        files = source.get("data_files")
        if isinstance(files, list):
            source["data_files"] = [_absolute(f, base) for f in files]
        path = source.get("path")
        if isinstance(path, str) and path.startswith(("./", "../")):
            source["path"] = str((base / path).resolve())


def _absolute(file: Any, base: Path) -> Any:
    if not isinstance(file, str) or "://" in file or os.path.isabs(file):
        return file
    return str((base / file).resolve())
