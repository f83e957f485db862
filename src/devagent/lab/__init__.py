"""The lab: devagent hosts as network namespaces (or loopback folders), one devagentd each."""

from __future__ import annotations

from devagent.lab.lab import Lab, LabState
from devagent.lab.layout import LabHost, default_lab_name, run_in_host
from devagent.vocab import format_rate, parse_rate

__all__ = [
    "Lab",
    "LabHost",
    "LabState",
    "default_lab_name",
    "format_rate",
    "parse_rate",
    "run_in_host",
]
