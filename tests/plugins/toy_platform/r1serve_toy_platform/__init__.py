"""The CPU under another name, with a kernel table of its own: add_rms_norm is this
package's, and its first call in a process leaves a marker file (TOY_PLATFORM_MARKER) so a
test can see that the served model ran through it. TOY_PLATFORM_ABSENT=1 plays a machine
without the device: the factory then returns None."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from r1serve.kernels.rms_norm import add_rms_norm_reference
from r1serve.platforms.base import Kernel, Platform


def toy_add_rms_norm(x, residual, weight, eps):
    marker = os.environ.get("TOY_PLATFORM_MARKER")
    if marker and not Path(marker).exists():
        Path(marker).write_text(f"add_rms_norm on the toy platform, hidden size {residual.shape[-1]}\n")
    return add_rms_norm_reference(x, residual, weight, eps)


def toy_platform(config) -> Platform | None:
    if os.environ.get("TOY_PLATFORM_ABSENT") == "1":
        return None
    return Platform(name="toycpu", device=torch.device("cpu"), supported_dtypes=(torch.float32,),
                    dist_backend="gloo", preferred_half=torch.float32,
                    kernel_table=lambda: {"add_rms_norm": Kernel(toy_add_rms_norm, "toy")},
                    describe={"plugin": "r1serve-toy-platform"})
