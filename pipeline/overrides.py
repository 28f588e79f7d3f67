"""The one grammar of ``--set section.field=value`` and ``--space section.field=...``: keys
checked against the config's fields (and virtual keys such as ``loss.lambda_cyc``), values read
the same way by both, and nested trees flattened for MLflow's params."""

from __future__ import annotations

import dataclasses

import yaml

from pipeline.config import Config, _field_types

VIRTUAL_KEYS = {"loss.lambda_cyc": ("loss.lambda_A", "loss.lambda_B")}
"""Keys that set several fields at once (both cycle weights)."""


def parse_value(text: str):
    """A value typed on the command line: a number where it reads as one (YAML would keep
    ``2e-3`` a string), else YAML (``true``, ``null``, lists), else the text itself."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return yaml.safe_load(text) if text else ""


def check_key(key: str, flag: str) -> tuple[str, ...]:
    """The fields ``key`` (``section.field`` or a virtual key) sets; raises naming the flag and
    the valid keys when it names none."""
    if key in VIRTUAL_KEYS:
        return VIRTUAL_KEYS[key]
    section, dot, name = key.partition(".")
    sections = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "preset"}
    if not dot or section not in sections:
        raise ValueError(
            f"{flag} {key!r}: expected section.field with a section of "
            f"{', '.join(sorted(sections))}"
        )
    valid = _field_types(type(getattr(Config(), section)))
    if name not in valid:
        extra = [k for k in VIRTUAL_KEYS if k.startswith(section + ".")]
        raise ValueError(
            f"{flag}: unknown key {key}; valid keys of {section}: "
            f"{', '.join(sorted(valid) + extra)}"
        )
    return (key,)


def set_keys(tree: dict, key: str, value) -> dict:
    """``tree`` with ``key`` (virtual keys expanded) set to ``value``."""
    for target in VIRTUAL_KEYS.get(key, (key,)):
        section, _, name = target.partition(".")
        tree.setdefault(section, {})[name] = value
    return tree


def parse_override(text: str) -> dict:
    """``"section.field=value"`` as ``{"section": {"field": value}}``; the value is read as
    :func:`parse_value` reads it, and ``loss.lambda_cyc`` sets both cycle weights."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"--set {text!r}: expected section.field=value")
    check_key(key, "--set")
    return set_keys({}, key, parse_value(raw))


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
