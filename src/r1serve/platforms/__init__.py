"""Platform selection: cpu, cuda, and platforms plugged in from other packages.

A package plugs a platform in (an Ascend NPU through torch_npu, say) with an entry point in
the group "r1serve.platforms":

    [project.entry-points."r1serve.platforms"]
    npu = "r1serve_npu:npu_platform"

The name is what `device=` selects; the object is a callable that takes the EngineConfig
and returns a Platform (platforms/base.py), or None where its device is absent. device
"auto" tries the plugins first, then CUDA, then the CPU.
"""
from __future__ import annotations

import logging
from importlib.metadata import entry_points

import torch

from r1serve.config import EngineConfig
from r1serve.errors import InvalidRequestError
from r1serve.platforms.base import Platform

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "r1serve.platforms"


def plugin_platforms() -> dict[str, object]:
    """name -> entry point of every installed platform plugin."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _from_plugin(name: str, entry, config: EngineConfig) -> Platform | None:
    try:
        factory = entry.load()
    except Exception as e:  # a broken plugin must not stop the built-in platforms
        log.warning("platform plugin %r (%s) failed to import: %s", name, entry.value, e)
        return None
    return factory(config)


def get_platform(config: EngineConfig) -> Platform:
    device, plugins = config.device, plugin_platforms()
    if device in plugins or device == "auto":
        for name, entry in plugins.items() if device == "auto" else [(device, plugins[device])]:
            platform = _from_plugin(name, entry, config)
            if platform is not None:
                return platform
            if device != "auto":
                raise InvalidRequestError(f"device={device!r}: the {name} platform plugin found no device")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InvalidRequestError("device='cuda' was asked for but no CUDA GPU is visible; use device='cpu'")
        from r1serve.platforms.cuda import cuda_platform

        return cuda_platform()
    if device not in ("auto", "cpu"):
        known = ", ".join(["auto", "cpu", "cuda", *plugins])
        raise InvalidRequestError(f"device={device!r} is not a platform r1serve knows; use one of {known}")
    from r1serve.platforms.cpu import cpu_platform

    try:
        return cpu_platform(config.cpu_isa)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None


__all__ = ["Platform", "get_platform", "plugin_platforms"]
