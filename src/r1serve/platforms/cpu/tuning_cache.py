"""Choices that depend on the machine, measured once per CPU and kept on disk.

A start never times anything it has timed before: the first start on a CPU measures (a
fraction of a second per weight shape) and writes the result; every later start on the same
CPU model, flags and torch reads it and makes the same choice. The file is one JSON object
per CPU, written whole to a temporary name and renamed, so a crash or a second process
never leaves half of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

from r1serve.kernels.cpu_isa import cpu_flags, cpu_model

log = logging.getLogger(__name__)


class TuningCache:
    def __init__(self, directory: Path) -> None:
        import torch

        key = "\0".join([cpu_model(), *sorted(cpu_flags()), torch.__version__])
        self.path = Path(directory) / "tuning" / f"cpu-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        self._said = False  # a start that measures says so once: it is why that start is slower

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get_or_measure(self, key: str, measure: Callable[[], int]) -> int:
        values = self._read()
        if key in values:
            return int(values[key])
        if not self._said:
            self._said = True
            log.info("timing kernel choices for this CPU (once per CPU and weight shape; kept in %s)", self.path)
        value = measure()
        values = {**self._read(), key: value}  # another process may have written meanwhile
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-")
            with os.fdopen(fd, "w") as f:
                json.dump(values, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache still serves, measuring each start
            log.warning("could not keep the measurement %s in %s: %s", key, self.path, e)
        return value
