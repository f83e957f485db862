"""The daemon's view of its host: name, address, state folder, and the VMs it runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Host:
    name: str
    address: str
    port: int
    root: Path
    shared_dir: Path | None = None
