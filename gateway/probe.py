"""Moved to ``gateway.ops.probe`` (the probe) and ``gateway.ops.probe_cli`` (``gateway
probe``); this module re-exports them for ``gateway.cli``."""

from gateway.ops.probe import PROBE_STEPS, Prober, ProbeTarget, StepFailed, start_strobe, strobe
from gateway.ops.probe_cli import add_arguments, format_result, run_probe

__all__ = [
    "PROBE_STEPS",
    "ProbeTarget",
    "Prober",
    "StepFailed",
    "add_arguments",
    "format_result",
    "run_probe",
    "start_strobe",
    "strobe",
]
