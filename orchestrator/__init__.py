"""Live-migration orchestrator for passthrough devices."""

__version__ = "0.1.0"
