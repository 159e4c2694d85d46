"""Resolving a plan: every device's parameters checked by its own backend.

``resolve`` is stage 2 of plan validation (stage 1 is the plan's own shape,
``orchestrator.plan``): each device's ``source`` and ``destination`` tables
against its backend's parameter model, the pair against each other, and the
cross-device rules of the flow (``orchestrator.flow.check_capabilities``)
with whatever capabilities are known before a device is opened.  Every
problem is reported with its field path.

A device a VMM handed over to the daemon is named by its handle
(``handle = "vm/device"`` among a backend's parameters): with the daemon's
``HandleRegistry`` given, each handle is checked to exist, to belong to the
plan's VM and to be of the backend's kind.  The backend itself gets the
descriptor from the same registry when it opens the device
(``HandleRegistry.open``).  Without a registry (``orchestrator run``, no
daemon) nothing can be opened by handle: :func:`refuse_handles` says so.

Each device also gets its lock keys from its backend
(``Backend.device_keys``): what the service locks while a migration uses it.
Two devices of one plan with a key in common name one real device twice,
which is refused here.

A plan that passes can still meet a device whose real capabilities differ
from what the plan implies; the runner applies the same cross-device rules
again after opening the devices and before changing any state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.backends import Backend, get_backend
from orchestrator.backends.handles import NEEDS_DAEMON
from orchestrator.compat import CAPABILITIES_FIELD, FEATURES_FIELD
from orchestrator.errors import PlanError, Problem
from orchestrator.flow import SwitchoverOrder, check_capabilities, switchover_order
from orchestrator.handover import HANDLE_PARAM, HandleRegistry
from orchestrator.plan import Plan, parse_plan, problems_from_validation, read_plan_data
from orchestrator.states import Capabilities


@dataclass(frozen=True)
class ResolvedDevice:
    """A device whose parameters its backend has validated."""

    name: str
    backend: Backend
    source: BaseModel
    destination: BaseModel
    #: Capabilities known before opening (None: only the device can tell).
    source_capabilities: Capabilities | None
    destination_capabilities: Capabilities | None
    #: What the service locks this device by (``Backend.device_keys``).
    keys: tuple[str, ...] = ()

    def handles(self) -> list[str]:
        """The handed-over devices this device's endpoints name, if any."""
        found = [getattr(params, HANDLE_PARAM, None) for params in (self.source, self.destination)]
        return [h for h in found if isinstance(h, str)]


@dataclass(frozen=True)
class ResolvedPlan:
    plan: Plan
    devices: tuple[ResolvedDevice, ...]

    def handles(self) -> list[str]:
        """Every handed-over device the plan names, once each."""
        return list(dict.fromkeys(h for d in self.devices for h in d.handles()))

    def switchover_order(self) -> SwitchoverOrder | None:
        """The order the devices will stop and run in, where every device's
        capabilities are known without opening it (else None)."""
        caps: dict[str, Capabilities] = {}
        for d in self.devices:
            if d.source_capabilities is None:
                return None
            caps[d.name] = d.source_capabilities
        return switchover_order(self.plan, caps)

    def device_keys(self) -> list[str]:
        """Every device's lock keys, once each: what the service locks for this plan."""
        return list(dict.fromkeys(k for d in self.devices for k in d.keys))


def resolve(
    plan: Plan,
    backends: Mapping[str, Backend] | None = None,
    handles: HandleRegistry | None = None,
) -> ResolvedPlan:
    """Stage 2: every device against its backend, and the cross-device rules.

    ``backends`` is the registry the plan's backend names are looked up in
    (default: ``orchestrator.backends.BACKENDS``, whose simulated devices live
    in memory; ``backends_for(state_dir)`` gives persistent ones).  The
    resolved devices are created by those backends.  ``handles`` is the
    daemon's registry of handed-over devices, if the handles a plan names
    are to be checked against it.
    """
    problems: list[Problem] = []
    devices: list[ResolvedDevice] = []
    for index, spec in enumerate(plan.devices):
        where = f"devices[{index}]"
        try:
            backend = get_backend(spec.backend, backends)
        except PlanError as exc:
            problems.extend(Problem(f"{where}.backend", p.message) for p in exc.problems)
            continue
        source = _backend_params(backend, spec.source, f"{where}.source", problems)
        if source is None:
            continue
        inherited: Mapping[str, Any] = backend.destination_defaults(source)
        destination = _backend_params(
            backend, {**inherited, **spec.destination}, f"{where}.destination", problems
        )
        if destination is None:
            continue
        for problem in backend.check_pair(source, destination):
            problems.append(Problem(f"{where}.{problem.path}", problem.message))
        problems.extend(_accept_problems(backend, spec.accept_differences, where))
        for side, params in (("source", source), ("destination", destination)):
            handle = getattr(params, HANDLE_PARAM, None)
            if handles is not None and isinstance(handle, str):
                why = handles.plan_problem(handle, plan.vm, backend.name)
                if why is not None:
                    problems.append(Problem(f"{where}.{side}.{HANDLE_PARAM}", why))
        devices.append(
            ResolvedDevice(
                name=spec.name,
                backend=backend,
                source=source,
                destination=destination,
                source_capabilities=backend.static_capabilities(source),
                destination_capabilities=backend.static_capabilities(destination),
                keys=tuple(backend.device_keys(spec.name, source, destination)),
            )
        )
    if not problems:
        problems.extend(_shared_devices(plan, devices))
    if not problems:
        known = {
            d.name: (d.source_capabilities, d.destination_capabilities)
            for d in devices
            if d.source_capabilities is not None and d.destination_capabilities is not None
        }
        problems.extend(check_capabilities(plan, known))
    if problems:
        raise PlanError(problems)
    return ResolvedPlan(plan=plan, devices=tuple(devices))


def _shared_devices(plan: Plan, devices: list[ResolvedDevice]) -> list[Problem]:
    """Two devices of the plan that name one real device (a key in common)."""
    index = {spec.name: i for i, spec in enumerate(plan.devices)}
    first: dict[str, str] = {}
    problems = []
    for device in devices:
        for key in device.keys:
            other = first.setdefault(key, device.name)
            if other != device.name:
                problems.append(
                    Problem(
                        f"devices[{index[device.name]}]",
                        f"device {device.name!r} names the same device as {other!r} "
                        f"(devices[{index[other]}]): {key}",
                    )
                )
    return problems


def _accept_problems(backend: Backend, fields: list[str], where: str) -> list[Problem]:
    """``accept_differences`` naming a field the backend's identities do not have, or
    one compared for compatibility (the route's capabilities cannot be waived)."""
    problems = []
    for i, name in enumerate(fields):
        path = f"{where}.accept_differences[{i}]"
        if name in (CAPABILITIES_FIELD, FEATURES_FIELD) and name in backend.identity_fields:
            problems.append(
                Problem(
                    path,
                    f"{name!r} is compared for compatibility (the destination must have what "
                    "the source uses), not equality: it cannot be accepted as a difference",
                )
            )
        elif name not in backend.identity_fields:
            fixed = (CAPABILITIES_FIELD, FEATURES_FIELD)
            known = ", ".join(f for f in backend.identity_fields if f not in fixed)
            problems.append(
                Problem(
                    path,
                    f"unknown identity field {name!r} for {backend.name} devices "
                    f"(they have {known or 'none'})",
                )
            )
    return problems


def refuse_handles(resolved: ResolvedPlan) -> None:
    """PlanError for what only a daemon can do, for a process without one
    (``orchestrator run``): endpoints named by handle (no handover socket), and a
    destination on another host (no API its daemon could ask for the decision)."""
    problems = [
        Problem(f"devices[{i}].{side}.{HANDLE_PARAM}", NEEDS_DAEMON)
        for i, device in enumerate(resolved.devices)
        for side, params in (("source", device.source), ("destination", device.destination))
        if isinstance(getattr(params, HANDLE_PARAM, None), str)
    ]
    if resolved.plan.destination is not None:
        problems.append(
            Problem(
                "destination",
                "a migration to another host runs on the source daemon, whose API the "
                "destination can ask for the decision: submit it there (orchestrator submit)",
            )
        )
    if problems:
        raise PlanError(problems)


def _backend_params(
    backend: Backend, raw: Mapping[str, Any], where: str, problems: list[Problem]
) -> BaseModel | None:
    try:
        return backend.params_model.model_validate(dict(raw))
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc, where))
        return None


def load_plan(path: Path) -> ResolvedPlan:
    """Read, parse and resolve a plan file."""
    return resolve(parse_plan(read_plan_data(path)))
