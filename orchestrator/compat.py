"""Device identities, and whether a source's state may load into a destination.

Each backend reports an :class:`Identity` of every device it opens: what must
match for a migration stream to load (PCI IDs, an mdev type, a driver's
version, a vDPA device's features, a simulated device's model and firmware).
Before any device leaves RUNNING, the coordinator compares each source's
identity with its destination's (:func:`compare`); a difference nothing
accepts refuses the migration, naming the device, the field and both values.

Three things may accept a difference, checked in this order:

* the field's own kind: ``migration`` (the capabilities the route uses) and
  ``features`` (a vDPA device's offered feature bits) ask for compatibility,
  not equality: the destination must have whatever the source's route uses,
  or every feature the source offers;
* the plan: ``accept_differences = ["firmware"]`` in a ``[[devices]]`` entry
  accepts any difference in those fields for that device;
* the daemon's settings: a ``[[compat.rules]]`` entry (:class:`CompatRule`)
  accepts, for one backend (and model), one field's values within a list or
  a version range, in the direction an upgrade goes unless it says otherwise.
  Fleets upgrade host by host: a driver 535.2 source may go to a 535.4
  destination while the fleet moves, and back only where the rule says so.

Pure: no trio, no backend.  The field names each backend reports are its own
(``Backend.identity_fields``); this module only compares.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.errors import Problem
from orchestrator.states import Capabilities, MigrationFlags

__all__ = [
    "CAPABILITIES_FIELD",
    "FEATURES_FIELD",
    "Accepted",
    "CompatRule",
    "CompatSettings",
    "Identity",
    "Mismatch",
    "Verdict",
    "capability_names",
    "compare",
    "compare_all",
    "route_needs",
    "rule_problems",
    "version_key",
]

#: A field's value: a number, a string, or a set of names (written sorted).
FieldValue = int | str | tuple[str, ...]

#: The migration capabilities a device has (flag names): the destination must
#: have every one the source's route uses.
CAPABILITIES_FIELD = "migration"
#: Offered feature bits (an integer): the destination must offer the source's.
FEATURES_FIELD = "features"


@dataclass(frozen=True)
class Identity:
    """What one device endpoint is, as far as loading a migration stream goes.

    ``model`` is what ``[[compat.rules]]`` entries name (the simulated
    ``model``, a VFIO device's mdev type or ``vendor:device``, a vDPA device's
    ``virtio-<id>``); ``fields`` are the values compared, by name.
    """

    backend: str
    model: str
    fields: Mapping[str, FieldValue] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.model,
            "fields": {k: list(v) if isinstance(v, tuple) else v for k, v in self.fields.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> Identity:
        """The identity another daemon sent; TypeError naming what is malformed."""
        if not isinstance(data, Mapping):
            raise TypeError(f"an identity is an object, not {data!r}")
        backend, model, fields = data.get("backend"), data.get("model"), data.get("fields")
        if not isinstance(backend, str) or not isinstance(model, str):
            raise TypeError("an identity names its backend and model as strings")
        if not isinstance(fields, Mapping):
            raise TypeError("an identity's fields are an object")
        values: dict[str, FieldValue] = {}
        for name, value in fields.items():
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                values[str(name)] = tuple(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                if not 0 <= value < 1 << 64:
                    raise TypeError(f"identity field {name!r}: {value} is out of range")
                values[str(name)] = value
            elif isinstance(value, str):
                values[str(name)] = value
            else:
                raise TypeError(f"identity field {name!r}: {value!r} is not a number or text")
        return cls(backend, model, values)


def capability_names(caps: Capabilities) -> tuple[str, ...]:
    """A device's migration flags by name, for its identity's ``migration`` field."""
    return tuple(sorted(f.name for f in MigrationFlags if f in caps.flags and f.name))


def route_needs(*, precopy: bool, grace: bool) -> tuple[str, ...]:
    """The flags a source's route uses: STOP_COPY always, PRE_COPY where it pre-copies,
    P2P where it takes the grace states."""
    needs = [MigrationFlags.STOP_COPY]
    if precopy:
        needs.append(MigrationFlags.PRE_COPY)
    if grace:
        needs.append(MigrationFlags.P2P)
    return tuple(sorted(f.name for f in needs if f.name))


# -- the policy --------------------------------------------------------------------------

_VERSION_PART = re.compile(r"\d+|[A-Za-z]+")


def version_key(value: str) -> tuple[tuple[int, int | str], ...]:
    """An order for version strings: their numbers compared as numbers, part by
    part (``1.10 > 1.9``, ``535.104.05 > 535.54``); a word in a part's place
    sorts after any number there, words among themselves alphabetically."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.lower())
        for part in _VERSION_PART.findall(value)
    )


class CompatRule(BaseModel):
    """One ``[[compat.rules]]`` entry: differences this daemon accepts in one field.

    Both the source's and the destination's value must be among ``values`` or
    within ``min``..``max`` (inclusive, by version order); unless ``downgrade``
    is true, the destination's must also be at least the source's (an upgrade,
    or the same), since a newer driver reads an older one's state, not
    necessarily the other way round.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str = Field(description='The backend the rule is for ("vfio", "simulated", ...).')
    model: str | None = Field(
        None,
        description="The source device's model the rule is for (its identity's model: a "
        "simulated model, an mdev type, vendor:device); unset: every model of the backend.",
    )
    field: str = Field(description="The identity field whose differences it accepts.")
    values: list[str] | None = Field(
        None, min_length=1, description="Values that may migrate into one another."
    )
    min: str | None = Field(None, min_length=1, description="Lowest version accepted.")
    max: str | None = Field(None, min_length=1, description="Highest version accepted.")
    downgrade: bool = Field(
        False,
        description="Accept a destination whose version is lower than the source's too.",
    )

    @model_validator(mode="after")
    def _says_what_it_accepts(self) -> CompatRule:
        if self.values is None and self.min is None and self.max is None:
            raise ValueError("give values = [...] or a version range (min, max, or both)")
        low, high = self.min, self.max
        if low is not None and high is not None and version_key(low) > version_key(high):
            raise ValueError(f"min {self.min!r} is above max {self.max!r}")
        return self

    def covers(self, backend: str, model: str, field_name: str) -> bool:
        return (
            self.backend == backend
            and self.field == field_name
            and (self.model is None or self.model == model)
        )

    def _within(self, value: str) -> bool:
        if self.values is not None and value not in self.values:
            return False
        key = version_key(value)
        if (self.min is not None or self.max is not None) and (not key or key[0][0] != 0):
            return False  # "unknown", "N/A", "": no version, inside no range
        if self.min is not None and key < version_key(self.min):
            return False
        return self.max is None or key <= version_key(self.max)

    def accepts(self, source: FieldValue, destination: FieldValue) -> bool:
        src, dst = str(source), str(destination)
        if not (self._within(src) and self._within(dst)):
            return False
        return self.downgrade or version_key(dst) >= version_key(src)

    def describe(self, index: int) -> str:
        """``compat.rules[i]`` and what it accepts, for reports."""
        what = []
        if self.values is not None:
            what.append(f"values {self.values}")
        if self.min is not None or self.max is not None:
            what.append(f"{self.min or '*'}..{self.max or '*'}")
        if not self.downgrade:
            what.append("no downgrade")
        model = f" model {self.model!r}" if self.model is not None else ""
        return f"compat.rules[{index}] ({self.backend}{model} {self.field}: {', '.join(what)})"


class CompatSettings(BaseModel):
    """The ``[compat]`` table: which identity differences this daemon accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[CompatRule] = Field(
        default_factory=list,
        description="Accepted differences, per backend, model and field (see docs).",
    )

    def rule_for(
        self, backend: str, model: str, field_name: str, source: FieldValue, dest: FieldValue
    ) -> str | None:
        """The first rule that accepts this difference, described; None: none does."""
        for index, rule in enumerate(self.rules):
            if rule.covers(backend, model, field_name) and rule.accepts(source, dest):
                return rule.describe(index)
        return None


def rule_problems(
    settings: CompatSettings, fields_by_backend: Mapping[str, Collection[str]]
) -> list[Problem]:
    """Rules naming a backend or a field no backend reports (each with its path)."""
    problems = []
    for index, rule in enumerate(settings.rules):
        where = f"compat.rules[{index}]"
        known = fields_by_backend.get(rule.backend)
        if known is None:
            problems.append(
                Problem(
                    f"{where}.backend",
                    f"unknown backend {rule.backend!r} "
                    f"(known: {', '.join(sorted(fields_by_backend))})",
                )
            )
        elif rule.field in (CAPABILITIES_FIELD, FEATURES_FIELD):
            problems.append(
                Problem(
                    f"{where}.field",
                    f"{rule.field!r} is compared for compatibility (the destination must "
                    "offer what the source uses), never by rules",
                )
            )
        elif rule.field not in known:
            problems.append(
                Problem(
                    f"{where}.field",
                    f"{rule.backend} devices report no field {rule.field!r} "
                    f"(they report {', '.join(sorted(known))})",
                )
            )
    return problems


# -- the comparison ------------------------------------------------------------------------


def _show(field_name: str, value: FieldValue | None) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]"
    if isinstance(value, int):
        return hex(value) if field_name == FEATURES_FIELD else str(value)
    return repr(value)


@dataclass(frozen=True)
class Mismatch:
    """A field whose values differ and nothing accepts."""

    device: str
    field: str
    source: FieldValue | None
    destination: FieldValue | None
    why: str = ""

    @property
    def message(self) -> str:
        text = (
            f"device {self.device!r}: {self.field} differs: source "
            f"{_show(self.field, self.source)}, destination {_show(self.field, self.destination)}"
        )
        return f"{text} ({self.why})" if self.why else text


@dataclass(frozen=True)
class Accepted:
    """A difference that was accepted, and what accepted it."""

    device: str
    field: str
    source: FieldValue | None
    destination: FieldValue | None
    by: str

    def as_json(self) -> dict[str, Any]:
        def plain(v: FieldValue | None) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {
            "device": self.device,
            "field": self.field,
            "source": plain(self.source),
            "destination": plain(self.destination),
            "by": self.by,
        }


@dataclass
class Verdict:
    """What comparing every pair found."""

    mismatches: list[Mismatch] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)
    #: Fields only one end reported: not compared.
    unknown: list[str] = field(default_factory=list)

    def extend(self, other: Verdict) -> None:
        self.mismatches.extend(other.mismatches)
        self.accepted.extend(other.accepted)
        self.unknown.extend(other.unknown)

    @property
    def message(self) -> str:
        """Every mismatch, for the refusal's error."""
        return (
            "the devices cannot load each other's state, refused before any change: "
            + "; ".join(m.message for m in self.mismatches)
        )


def _compatible(
    name: str, source: FieldValue | None, destination: FieldValue | None, needs: Collection[str]
) -> str | None:
    """Why a compatibility field does not fit (None: it does)."""
    if name == CAPABILITIES_FIELD:
        have = set(destination) if isinstance(destination, tuple) else set()
        missing = sorted(set(needs) - have)
        if missing:
            return f"the route uses {', '.join(missing)}, which the destination lacks"
        return None
    src = source if isinstance(source, int) else 0
    dst = destination if isinstance(destination, int) else 0
    lacking = src & ~dst
    if lacking:
        return f"the destination does not offer feature bits {hex(lacking)} the source offers"
    return None


def compare(
    device: str,
    source: Identity,
    destination: Identity,
    *,
    needs: Collection[str] = (),
    accept: Collection[str] = (),
    policy: CompatSettings | None = None,
) -> Verdict:
    """Compare one device's two identities.

    ``needs``: the capability flags the device's route uses (checked against
    the destination's ``migration`` field); ``accept``: the plan's
    ``accept_differences`` for the device; ``policy``: the daemon's ``[compat]``.
    """
    verdict = Verdict()
    by: str | None
    if source.backend != destination.backend:
        verdict.mismatches.append(Mismatch(device, "backend", source.backend, destination.backend))
        return verdict
    for name in sorted(set(source.fields) | set(destination.fields)):
        src, dst = source.fields.get(name), destination.fields.get(name)
        if name in (CAPABILITIES_FIELD, FEATURES_FIELD):
            why = _compatible(name, src, dst, needs)
            if why is not None:
                verdict.mismatches.append(Mismatch(device, name, src, dst, why))
            continue
        if src == dst:
            continue
        if src is None or dst is None:
            # One end could not tell (a handed-over device its host cannot trace, or
            # a peer that left it out): an unknown is no proof of a match, so it is
            # refused unless the plan accepts the field; the report says it was
            # not compared.
            side = "source" if dst is None else "destination"
            verdict.unknown.append(f"device {device!r}: {name} known on the {side} only")
            if name in accept:
                by = "the plan's accept_differences"
                verdict.accepted.append(Accepted(device, name, src, dst, by))
            else:
                why = f"known on the {side} only: the other end cannot tell"
                verdict.mismatches.append(Mismatch(device, name, src, dst, why))
            continue
        by = None
        if name in accept:
            by = "the plan's accept_differences"
        elif policy is not None:
            by = policy.rule_for(source.backend, source.model, name, src, dst)
        if by is None:
            verdict.mismatches.append(Mismatch(device, name, src, dst))
        else:
            verdict.accepted.append(Accepted(device, name, src, dst, by))
    return verdict


def compare_all(
    pairs: Iterable[tuple[str, Identity, Identity, Collection[str], Collection[str]]],
    policy: CompatSettings | None = None,
) -> Verdict:
    """Every device's pair: (name, source, destination, needs, accept)."""
    verdict = Verdict()
    for name, source, destination, needs, accept in pairs:
        verdict.extend(
            compare(name, source, destination, needs=needs, accept=accept, policy=policy)
        )
    return verdict
