"""Presets, YAML and ``--set`` overrides as plain dicts, and the strict base of every config section: what
``dcgrpo.config.load_config`` merges and validates.

Nothing here knows the config's fields; ``dcgrpo.config`` imports this module, never the reverse. The presets
themselves are data files (``src/dcgrpo/presets/<name>.yaml``) that override some of the config's defaults.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dcgrpo.errors import DcgrpoError

DEFAULT_PRESET = "tiny-cpu"
"""The preset whose values the config classes' defaults are (the demo's; its YAML file only names it)."""
PRESETS = (DEFAULT_PRESET, "qwen3-8b", "qwen3-30b-a3b")


class ConfigError(DcgrpoError, ValueError):
    """A configuration value is missing, malformed or inconsistent."""


class Section(BaseModel):
    """The base of every config section: a key in a preset, a YAML file or an override that no field has is an
    error, not silently ignored; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, section by section (nested mappings merged, everything else replaced)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {seen[key]} and line {line})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, source: str) -> dict[str, Any]:
    """A YAML mapping of sections (empty text: ``{}``); ``ConfigError`` naming ``source`` otherwise."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    return data


def preset_dict(name: str) -> dict[str, Any]:
    """The overrides a named preset applies on top of the defaults."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    text = resources.files("dcgrpo.presets").joinpath(f"{name}.yaml").read_text()
    return read_yaml(text, f"preset {name}")


def parse_override(item: str) -> dict[str, Any]:
    """``"train.lr=1e-5"`` -> ``{"train": {"lr": 1e-5}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.field=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (``eval.k``, a mapping of benchmarks, stays whole)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and key != "k":
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per bad field of a pydantic error, naming the field and the value given."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling against dcgrpo.config)"
        got = err.get("input")
        shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return f"invalid configuration from {source}:\n" + "\n".join(lines)
