"""The simulated backend: a device with real state bytes and injectable faults.

This is the test double of the project, in the spirit of httpx's
``MockTransport``: every test, example plan and benchmark can migrate
simulated devices through the same :class:`~orchestrator.backends.base.Device`
interface the VFIO and vhost-vdpa backends implement, and a test can prove
that the destination ends up holding exactly the bytes the source had.

One job per module, each saying what it keeps true:

* :mod:`.params`: a device's plan table (:class:`SimulatedParams`), validated;
* :mod:`.faults`: what an injected fault is (:class:`FaultSpec`) and where it fires;
* :mod:`.content`: the state bytes, their deterministic dirtying, and the
  page digests that make the state digest cheap (:func:`reference_digest`);
* :mod:`.stream`: the self-checking migration stream, its saver and its loader;
* :mod:`.statefile`: the file a persistent device lives in, safe against a kill;
* :mod:`.device`: :class:`SimulatedDevice`, the ``Device`` interface over the above;
* :mod:`.backend`: :class:`SimulatedBackend`, which makes devices and checks pairs.

The names in ``__all__`` are this package's interface, importable from it
as they were when it was one module; so are, under their old names, the
internals the white-box tests reach for (``_StateFile``, ``_Layout``,
``_mutation_key``, ``_apply_mutations_logged`` and the file header's
``_H_*`` slots).
"""

from __future__ import annotations

from orchestrator.backends.simulated.backend import SimulatedBackend
from orchestrator.backends.simulated.content import PAGE_DIGEST_SIZE, reference_digest
from orchestrator.backends.simulated.content import _Layout as _Layout
from orchestrator.backends.simulated.content import _mutation_key as _mutation_key
from orchestrator.backends.simulated.device import SimulatedDevice
from orchestrator.backends.simulated.faults import FAULT_ARCS, FAULT_STATES, FaultKind, FaultSpec
from orchestrator.backends.simulated.params import KIB, MIB, SimulatedParams
from orchestrator.backends.simulated.statefile import _H_MUTATIONS as _H_MUTATIONS
from orchestrator.backends.simulated.statefile import _H_STATE as _H_STATE
from orchestrator.backends.simulated.statefile import _H_UNDO_LEN as _H_UNDO_LEN
from orchestrator.backends.simulated.statefile import _H_VERSION as _H_VERSION
from orchestrator.backends.simulated.statefile import (
    FILE_CONTENT_OFFSET,
    FILE_HEADER_SIZE,
    FILE_MAGIC,
    FILE_VERSION,
    LOST_LOAD,
    UNDO_ENTRIES,
    seed_fits_file,
)
from orchestrator.backends.simulated.statefile import (
    _apply_mutations_logged as _apply_mutations_logged,
)
from orchestrator.backends.simulated.statefile import _StateFile as _StateFile
from orchestrator.backends.simulated.stream import (
    END_SIZE,
    HEADER_SIZE,
    MAGIC,
    RUN_HEADER_SIZE,
    TAG_END,
    TAG_RUN,
    VERSION,
)

__all__ = [
    "END_SIZE",
    "FAULT_ARCS",
    "FAULT_STATES",
    "FILE_CONTENT_OFFSET",
    "FILE_HEADER_SIZE",
    "FILE_MAGIC",
    "FILE_VERSION",
    "HEADER_SIZE",
    "KIB",
    "LOST_LOAD",
    "MAGIC",
    "MIB",
    "PAGE_DIGEST_SIZE",
    "RUN_HEADER_SIZE",
    "TAG_END",
    "TAG_RUN",
    "UNDO_ENTRIES",
    "VERSION",
    "FaultKind",
    "FaultSpec",
    "SimulatedBackend",
    "SimulatedDevice",
    "SimulatedParams",
    "reference_digest",
    "seed_fits_file",
]
