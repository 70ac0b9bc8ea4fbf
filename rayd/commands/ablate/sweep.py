"""The sweep file and its cells: `SweepSpec` as read and checked, `expand` into `Cell`s, and
each cell's run config."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayd.config import (
    ConfigError,
    RunConfig,
    format_validation_error,
    load_config,
)

SEED_AXES = ("trainer.seed", "seed")
# Set by the sweep for every cell; an axis or override may not change them.
RESERVED_KEYS = ("name", "output_dir")
EXIT_PREEMPTED = 143
LOG_TAIL_LINES = 8


class SweepError(ConfigError):
    """A bad sweep file; the message is one line per problem, naming the key."""


# --------------------------------------------------------------------------------------------
# The sweep file
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReportSpec(_Strict):
    metric: str | None = Field(
        None, description="final metric of the main plot; default eval/accuracy, else reverse KL"
    )
    x_axis: str | None = Field(
        None, description="axis on the main plot's x; default the first numeric non-seed axis"
    )


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: str = Field(description="base run config, relative to the sweep file")
    output_dir: str = Field(
        "runs/sweeps/{name}", description="relative to the working directory, like a run's"
    )
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Checked by hand below: pydantic's errors for a list-or-mapping union are two lines of noise.
    axes: dict[str, Any]
    labels: dict[str, str] = Field(
        default_factory=dict, description="display names of axes and values (tables, plots)"
    )
    concurrency: int = Field(1, ge=1)
    stop_timeout_s: float = Field(
        600.0,
        gt=0,
        description="after SIGTERM or SIGINT to the sweep, how long a running cell may take to "
        "checkpoint and stop before its process group is killed",
    )
    report: ReportSpec = Field(default_factory=ReportSpec)
    baseline: dict[str, Any] | None = Field(
        None,
        description="the control: non-seed axis -> its value (axes left out are matched row by "
        "row); results.md adds each other setting's paired differences against it",
    )

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if not self.axes:
            raise ValueError("axes: at least one axis is needed")
        for key in self.overrides:
            _check_config_key(f"overrides.{key}", key, self.overrides[key])
        owner: dict[str, str] = {}
        for axis, node in self.axes.items():
            if isinstance(node, list):
                if not node:
                    raise ValueError(f"axes.{axis}: the list of values is empty")
                for value in node:
                    _check_config_key(f"axes.{axis}", axis, value)
                keys = [axis]
            elif isinstance(node, dict):
                if not node:
                    raise ValueError(f"axes.{axis}: the mapping of bundles is empty")
                keys = []
                for bundle, overrides in node.items():
                    if overrides is not None and not isinstance(overrides, dict):
                        raise ValueError(
                            f"axes.{axis}.{bundle}: a bundle is a mapping of dotted overrides "
                            f"(got {overrides!r})"
                        )
                    for key, value in (overrides or {}).items():
                        _check_config_key(f"axes.{axis}.{bundle}.{key}", key, value)
                        keys.append(key)
            else:
                raise ValueError(
                    f"axes.{axis}: a list of values or a mapping of named bundles of overrides "
                    f"(got {node!r})"
                )
            for key in dict.fromkeys(keys):
                if key in owner:
                    raise ValueError(
                        f"axes.{axis}: sets {key}, which axis {owner[key]} sets too; "
                        "an axis would silently override the other"
                    )
                owner[key] = axis
        known = set(self.axes) | {value_text(value) for _, value, _ in _axis_points(self.axes)}
        for key in self.labels:
            # Metric names ("eval/accuracy") can be labelled too; they are known only later.
            if key not in known and "/" not in key:
                raise ValueError(f"labels.{key}: not an axis, a value, a bundle or a metric")
        x_axis = self.report.x_axis
        if x_axis is not None and (x_axis not in self.axes or x_axis == self.seed_axis):
            raise ValueError(f"report.x_axis: {x_axis!r} is not an axis other than the seed")
        self._check_baseline()
        return self

    def _check_baseline(self) -> None:
        if self.baseline is None:
            return
        if not self.baseline:
            raise ValueError("baseline: name at least one axis and its value (e.g. {method: sft})")
        for axis, value in self.baseline.items():
            if axis == self.seed_axis:
                raise ValueError(
                    f"baseline.{axis}: the seed axis pairs the cells; name a non-seed axis"
                )
            if axis not in self.axes:
                others = ", ".join(a for a in self.axes if a != self.seed_axis)
                raise ValueError(f"baseline.{axis}: not an axis of the sweep (axes: {others})")
            values = [value_text(v) for _, v, _ in _axis_points({axis: self.axes[axis]})]
            if value_text(value) not in values:
                raise ValueError(
                    f"baseline.{axis}: {value_text(value)!r} is not one of its values "
                    f"({', '.join(values)})"
                )

    @property
    def seed_axis(self) -> str | None:
        return next((axis for axis in self.axes if axis in SEED_AXES), None)

    def is_bundle_axis(self, axis: str) -> bool:
        return isinstance(self.axes[axis], dict)

    def label(self, key: Any) -> str:
        return self.labels.get(str(key), str(key))


def _axis_points(axes: dict[str, Any]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(axis, value or bundle name, the overrides it makes) for every point of every axis."""
    for axis, node in axes.items():
        if isinstance(node, dict):
            for bundle, overrides in node.items():
                yield axis, bundle, dict(overrides or {})
        else:
            for value in node:
                yield axis, value, {axis: value}


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _check_config_key(where: str, dotted: str, value: Any) -> None:
    """Typos in a sweep's keys fail when the sweep is read, not as N identical cell errors."""
    if dotted in RESERVED_KEYS:
        raise ValueError(f"{where}: {dotted} is set by the sweep for each cell")
    model: type[BaseModel] = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None or not part:
            raise ValueError(f"{where}: {'.'.join(parts[: i + 1])} is not a config key")
        section = _section_model(info.annotation)
        if section is None:
            if i < len(parts) - 1 and typing.get_origin(info.annotation) is not dict:
                raise ValueError(f"{where}: {'.'.join(parts[: i + 1])} is a value, not a section")
            return
        if i == len(parts) - 1 and value is not None:
            # As with `key=value` on the command line, a mapping would replace the whole
            # section and drop what the base config set in it.
            raise ValueError(
                f"{where}: {dotted} is a section; set its keys one by one ({dotted}.<key>: value)"
            )
        model = section


def _format_sweep_error(path: Path, err: ValidationError) -> str:
    return format_validation_error(err, prefix=f"sweep error: {path}: ")


@dataclass(frozen=True)
class Sweep:
    spec: SweepSpec
    path: Path  # the sweep file
    base: Path
    out: Path

    @property
    def cells_dir(self) -> Path:
        return self.out / "cells"


def load_sweep(path: str | Path, concurrency: int | None = None) -> Sweep:
    p = Path(path)
    if not p.is_file():
        why = "is a folder; expected a YAML file" if p.is_dir() else "does not exist"
        raise SweepError(f"sweep error: sweep file {str(p)!r} {why}")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SweepError(
            f"sweep error: {p}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise SweepError(f"sweep error: {p}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise SweepError(f"sweep error: {p}{line}: not valid YAML") from exc
    if not isinstance(tree, dict):
        raise SweepError(f"sweep error: {p}: expected a mapping (name, base, axes, ...)")
    if concurrency is not None:
        tree["concurrency"] = concurrency
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as exc:
        raise SweepError(_format_sweep_error(p, exc)) from None
    base = (p.parent / spec.base) if not Path(spec.base).is_absolute() else Path(spec.base)
    if not base.is_file():
        raise SweepError(f"sweep error: {p}: base: config file {str(base)!r} does not exist")
    out = Path(spec.output_dir.format(name=spec.name))
    sweep = Sweep(spec=spec, path=p, base=base, out=out)
    expand(sweep)  # cell ids that collide are a sweep error, found now
    return sweep


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    id: str
    index: int
    values: dict[str, Any]  # axis -> its value (a bundle axis: the bundle's name)
    overrides: dict[str, Any]  # dotted key -> value: the sweep's overrides, then the axes'
    axis_overrides: dict[str, Any]  # the part of `overrides` that the axes set


def value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float | str):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def slug(text: str) -> str:
    # "-" separates axes in a cell id, so it never appears inside one axis's part.
    slug = re.sub(r"[^A-Za-z0-9._=+]+", "_", text).strip("_")
    if slug.startswith("."):
        slug = "_" + slug[1:]
    return slug or "_"


def cell_token(axis: str, value: Any, bundle: bool) -> str:
    """One axis's part of a cell id: a name as it is (`sft`, `rationales`), a number or flag
    with its key's last part (`seed=0`, `train_fraction=0.25`, `rationales=false`)."""
    if bundle or isinstance(value, str):
        return slug(str(value))
    return slug(f"{axis.rsplit('.', 1)[-1]}={value_text(value)}")


def cell_id(tokens: Sequence[str]) -> str:
    ident = "-".join(tokens)
    if len(ident) > 120:  # file-name limits; the hash keeps long ids distinct and stable
        digest = hashlib.sha1(ident.encode()).hexdigest()[:10]
        ident = f"{ident[:100]}-{digest}"
    return ident


def expand(sweep: Sweep) -> list[Cell]:
    """The cells in product order (the first axis varies slowest). A cell's id depends only on
    its own axis values, so adding a value to an axis keeps the ids (and results) of the rest."""
    spec = sweep.spec
    per_axis: list[list[tuple[Any, str, dict[str, Any]]]] = []
    for axis in spec.axes:
        points = [(v, o) for a, v, o in _axis_points({axis: spec.axes[axis]})]
        tokens = [cell_token(axis, v, spec.is_bundle_axis(axis)) for v, _ in points]
        seen: dict[str, Any] = {}
        for (value, _), token in zip(points, tokens, strict=True):
            if token in seen:
                raise SweepError(
                    f"sweep error: {sweep.path}: axes.{axis}: values {seen[token]!r} and "
                    f"{value!r} give the same cell id part {token!r}"
                )
            seen[token] = value
        per_axis.append(
            [(value, token, o) for (value, o), token in zip(points, tokens, strict=True)]
        )
    cells = []
    for index, combo in enumerate(itertools.product(*per_axis)):
        axis_overrides: dict[str, Any] = {}
        for _, _, point_overrides in combo:
            axis_overrides.update(point_overrides)
        cells.append(
            Cell(
                id=cell_id([token for _, token, _ in combo]),
                index=index,
                values={axis: value for axis, (value, _, _) in zip(spec.axes, combo, strict=True)},
                overrides={**spec.overrides, **axis_overrides},
                axis_overrides=axis_overrides,
            )
        )
    return cells


def yaml_value(value: Any) -> str:
    """A value as `key=value` text that load_config's YAML parsing turns back into `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    return text.removesuffix("\n...\n").removesuffix("\n")


def cell_dir(sweep: Sweep, cell: Cell) -> Path:
    return sweep.cells_dir / cell.id


def cell_config(sweep: Sweep, cell: Cell) -> RunConfig:
    """Base config + the cell's overrides, named and placed in the sweep; ConfigError if bad."""
    out = str(cell_dir(sweep, cell)).replace("{", "{{").replace("}", "}}")
    items = [f"{key}={yaml_value(value)}" for key, value in cell.overrides.items()]
    items += [
        f"name={yaml_value(f'{sweep.spec.name}-{cell.id}')}",
        f"output_dir={yaml_value(out)}",
    ]
    return load_config(sweep.base, items)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.removesuffix("."): tree}


def config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return [
        f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key, object()) != b.get(key, object())
    ]
