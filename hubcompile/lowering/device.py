"""Which kind of device a tensor lives on, in the terms kernel builds use."""

from __future__ import annotations

import dataclasses

import torch

DEVICE_KINDS = ("cuda", "rocm", "xpu", "mps", "cpu")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    kind: str  # one of DEVICE_KINDS
    capability: tuple[int, int] | None = None  # CUDA compute capability
    name: str = ""

    def __str__(self) -> str:
        cap = f" sm_{self.capability[0]}{self.capability[1]}" if self.capability else ""
        return f"{self.kind}{cap}"


def detect(device: torch.device | str) -> DeviceInfo:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        if torch.version.hip:
            return DeviceInfo("rocm", None, name)
        return DeviceInfo("cuda", torch.cuda.get_device_capability(index), name)
    if device.type in ("xpu", "mps", "cpu"):
        return DeviceInfo(device.type)
    return DeviceInfo(device.type)
