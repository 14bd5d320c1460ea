"""The YAML files and the schemas agree, so every documented setting can be set from the command line.

Hydra composes plain YAML and refuses an override of a key the YAML lacks ("not in struct"), while
``ksd.config.validate`` merges the composed nodes into dataclass schemas. A schema field missing from
its YAML can therefore only be set with ``+key=value``, and a YAML key missing from its schema is
refused at validation; both have happened (``run.checkpoint_every``). Each key must also carry a
comment, because the YAML files are the settings' documentation.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from conftest import CONF, REPO, compose_config

from ksd.config import DatasetConfig, LoggerConfig, ModelConfig, RunConfig, validate
from ksd.optim import OPTIMIZERS, available, optimizer_class
from ksd.runner import REGISTRIES

#: Fields of a group's schema that only some of the group's options use: they may be left out of the
#: other options' YAML (where Hydra then refuses them by name). Every other field must be in every
#: option's YAML. A new option-specific field goes here, or into every YAML of its group.
APPLIES_TO: dict[str, dict[str, set[str]]] = {
    "dataset": {
        "augment": {"cifar10"},
        "path": {"text", "tensors"},
        "seq_len": {"text"},
        "torchvision": {"torchvision"},
        "download": {"torchvision"},
    },
    "model": {
        "arch": {"cnn"},
        "widths": {"autoencoder", "mlp", "charlm"},
        "activation": {"autoencoder", "mlp", "cnn"},
        "embedding": {"charlm"},
        "target": {"custom"},
        "kwargs": set(),  # model=custom: the keys beyond its schema, added with +model.KEY
    },
    "logger": {field: {"wandb"} for field in ("project", "entity", "group", "mode")},
}
#: YAML keys that fill a schema field of another name (``model=custom``: ``_target_`` is ``model.target``).
ALIASES: dict[str, dict[str, str]] = {"model": {"_target_": "target"}}
SCHEMAS = {"dataset": DatasetConfig, "model": ModelConfig, "logger": LoggerConfig}
#: Keys that need no comment of their own: the option's name (the file's header describes it).
SELF_EXPLAINING = {"name"}


def yaml_keys(path: Path, node: str | None = None) -> dict[str, bool]:
    """Each key of the file's top level (or of its ``node`` mapping) -> whether it carries a comment.

    A comment is one on the key's line or a comment line right above it at the key's indentation.
    """
    lines = path.read_text().splitlines()
    indent = ""
    if node is not None:
        start = next(i for i, line in enumerate(lines) if re.match(rf"{node}:\s*(#.*)?$", line))
        body = []
        for line in lines[start + 1 :]:
            if line.strip() and not line.startswith((" ", "#")):
                break
            body.append(line)
        lines = body
        first_key = next(line for line in lines if line.strip() and not line.lstrip().startswith("#"))
        indent = re.match(r"\s*", first_key).group()
    found: dict[str, bool] = {}
    for i, line in enumerate(lines):
        match = re.match(rf"{indent}([A-Za-z_][A-Za-z0-9_]*):(.*)$", line)
        if not match:
            continue
        value = re.sub(r"'[^']*'|\"[^\"]*\"", "", match.group(2))  # a '#' inside quotes is no comment
        inline = re.search(r"(^|\s)#\s*\S", value) is not None
        above = i > 0 and re.match(rf"{indent}#\s*\S", lines[i - 1]) is not None
        found[match.group(1)] = inline or above
    return found


def check_against_schema(path: Path, schema: type, option: str, group: str, node: str | None = None) -> None:
    keys = {ALIASES.get(group, {}).get(k, k): commented for k, commented in yaml_keys(path, node).items()}
    keys.pop("defaults", None)  # Hydra's defaults list, not a setting
    fields = {f.name for f in dataclasses.fields(schema)}
    where = f"{path.relative_to(REPO)}" + (f" ({node}:)" if node else "")
    assert not set(keys) - fields, f"{where}: keys not in {schema.__qualname__}: {sorted(set(keys) - fields)}"
    applies = APPLIES_TO.get(group, {})
    required = {f for f in fields if option in applies.get(f, {option})}
    missing = sorted(required - set(keys))
    assert not missing, (
        f"{where}: {schema.__qualname__} settings missing (only settable with +): {missing}; add them to the"
        " YAML, or to APPLIES_TO in tests/test_config_schema.py if they do not apply to this option"
    )
    undocumented = sorted(k for k, commented in keys.items() if not commented and k not in SELF_EXPLAINING)
    assert not undocumented, f"{where}: keys without a comment: {undocumented}"


def test_run_node_has_every_field_of_run_config_with_a_comment():
    check_against_schema(CONF / "config.yaml", RunConfig, "run", "run", node="run")
    top = yaml_keys(CONF / "config.yaml")
    assert all(top[key] for key in ("seed", "device", "scale")), top


@pytest.mark.parametrize("group", list(SCHEMAS))
def test_every_option_of_a_group_matches_its_schema(group):
    paths = sorted((CONF / group).glob("*.yaml"))
    assert paths
    for path in paths:
        check_against_schema(path, SCHEMAS[group], path.stem, group)


def test_every_registered_optimizer_has_a_yaml_that_matches_its_config():
    registered = available()
    assert set(registered) == set(OPTIMIZERS), "an optimizer is registered without its module"
    yamls = {p.stem for p in (CONF / "optimizer").glob("*.yaml")}
    assert yamls == set(registered), f"YAMLs {yamls ^ set(registered)} and registered optimizers differ"
    for name in registered:
        schema = optimizer_class(name).Config
        check_against_schema(CONF / "optimizer" / f"{name}.yaml", schema, name, "optimizer")


def test_every_optimizer_yaml_validates_as_it_ships():
    """The YAML values have the schema's types and ranges (the keys agree, so must the values)."""
    for name in OPTIMIZERS:
        assert validate(compose_config(f"optimizer={name}"), REGISTRIES).optimizer.name == name


def test_readme_names_every_run_setting_and_no_unknown_one():
    readme = (REPO / "README.md").read_text()
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    named = set(re.findall(r"`run\.([a-z_]+)", readme))
    assert not run_fields - named, f"README does not name run.{sorted(run_fields - named)}"
    assert not named - run_fields, f"README names unknown run settings: {sorted(named - run_fields)}"
    for group, schema in SCHEMAS.items():
        fields = {f.name for f in dataclasses.fields(schema)}
        unknown = set(re.findall(rf"`{group}\.([a-z_]+)", readme)) - fields
        assert not unknown, f"README names unknown {group} settings: {sorted(unknown)}"
    optimizer_fields = {f.name for n in OPTIMIZERS for f in dataclasses.fields(optimizer_class(n).Config)}
    unknown = set(re.findall(r"optimizer\.([a-z_0-9]+)", readme)) - optimizer_fields
    assert not unknown, f"README names unknown optimizer settings: {sorted(unknown)}"
