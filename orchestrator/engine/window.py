"""What the downtime window measured, beside what the model predicted.

The report's ``window``: per component of the model (see
:mod:`orchestrator.engine.model`) and per device, the predicted figure, where
it came from, and what the trace says the switchover took.  Components are
measured as the model predicts them: the slowest device's arcs of a kind,
the stream from the source barrier to the last drain less the stop arcs,
the commit record from the COMMIT phase to the commit.  What the components
leave of the measured downtime is ``unattributed``: the waits between steps
and the orchestrator's own work (the model's ``overhead``, and between
hosts its ``control``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from orchestrator.engine.model import Forecast
from orchestrator.flow import Phase
from orchestrator.states import Side
from orchestrator.trace import TraceEvent

__all__ = ["window_report"]


def window_report(
    events: Iterable[TraceEvent],
    forecast: Forecast | None,
    downtime_ms: float | None,
) -> dict[str, object] | None:
    """Predicted against measured, per component and per device; None before a window."""
    if forecast is None or downtime_ms is None:
        return None
    phases: dict[str, float] = {}
    vmm: dict[tuple[Side | None, str], float] = {}
    started: dict[tuple[Side | None, str], float] = {}
    arcs: dict[str, dict[tuple[Side, str], float]] = defaultdict(lambda: defaultdict(float))
    commit_at: float | None = None
    phase = Phase.PREPARE.value
    for e in events:
        if e.kind == "phase":
            phase = str(e.detail["phase"])
            phases.setdefault(phase, e.time)
        elif e.kind == "commit":
            commit_at = e.time
        elif e.kind == "vmm_begin":
            started[(e.side, str(e.detail["action"]))] = e.time
        elif e.kind == "vmm_end":
            key = (e.side, str(e.detail["action"]))
            if key in started:
                vmm[key] = (e.time - started[key]) * 1000
        elif e.kind == "arc_end" and e.side is not None and e.device is not None:
            kind = _ARC_KINDS.get((e.side, phase))
            if kind is not None:
                arcs[kind][(e.side, e.device)] += float(e.detail.get("duration_s", 0.0)) * 1000

    def slowest(kind: str) -> float | None:
        return max(arcs[kind].values()) if arcs[kind] else None

    measured: dict[str, float | None] = {
        "pause": vmm.get((Side.SOURCE, "pause")),
        "grace_arcs": slowest("grace_arcs"),
        "stop_arcs": slowest("stop_arcs"),
        "transfer": None,
        "settle_arcs": slowest("settle_arcs"),
        "commit": None,
        "run_arcs": slowest("run_arcs"),
        "resume": vmm.get((Side.DESTINATION, "resume")),
    }
    stop, drained = phases.get(Phase.STOP_COPY.value), phases.get(Phase.DESTINATION_GRACE.value)
    if stop is not None and drained is not None:
        measured["transfer"] = max(0.0, (drained - stop) * 1000 - (measured["stop_arcs"] or 0.0))
    commit_phase = phases.get(Phase.COMMIT.value)
    if commit_phase is not None and commit_at is not None:
        measured["commit"] = (commit_at - commit_phase) * 1000
    if not forecast.components.get("grace_arcs") or forecast.components["grace_arcs"].ms == 0:
        # Without a VMM the grace arcs run before the window opens.
        measured["grace_arcs"] = None
    components: dict[str, object] = {}
    for name, figure in forecast.components.items():
        value = measured.get(name)
        components[name] = {
            "predicted_ms": figure.ms,
            "source": figure.source,
            "measured_ms": round(value, 3) if value is not None else None,
        }
    attributed = sum(v for v in measured.values() if v is not None)
    devices: dict[str, object] = {}
    for name, d in forecast.devices.items():
        devices[name] = {
            "stop_bytes_predicted": d.stop_bytes,
            **{
                kind: {
                    "predicted_ms": getattr(d, kind).ms,
                    "source": getattr(d, kind).source,
                    "measured_ms": _round(arcs[kind].get((side, name))),
                }
                for kind, side in (
                    ("grace_arcs", Side.SOURCE),
                    ("stop_arcs", Side.SOURCE),
                    ("settle_arcs", Side.DESTINATION),
                    ("run_arcs", Side.DESTINATION),
                )
            },
        }
    return {
        "predicted_ms": forecast.total_ms,
        "measured_ms": downtime_ms,
        "components": components,
        "unattributed_ms": round(downtime_ms - attributed, 3) + 0.0,
        "devices": devices,
    }


#: Which of the model's arc components an arc belongs to, by side and the phase it ran in.
_ARC_KINDS = {
    (Side.SOURCE, Phase.SOURCE_GRACE.value): "grace_arcs",
    (Side.SOURCE, Phase.STOP_COPY.value): "stop_arcs",
    (Side.SOURCE, Phase.DESTINATION_GRACE.value): "stop_arcs",
    (Side.DESTINATION, Phase.SOURCE_GRACE.value): "settle_arcs",
    (Side.DESTINATION, Phase.STOP_COPY.value): "settle_arcs",
    (Side.DESTINATION, Phase.DESTINATION_GRACE.value): "settle_arcs",
    (Side.DESTINATION, Phase.RESUME.value): "run_arcs",
}


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None
