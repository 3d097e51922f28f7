"""The one device resolver: a config's device name -> a torch.device, failing early and in one line."""

from __future__ import annotations

import torch

from spt_core.portable.errors import SensituneError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available, else cpu; any other torch device name as given.

    Raises:
        SensituneError: ``cuda*`` where CUDA is not available, or a name that is not a torch device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SensituneError(f"device={name!r} but CUDA is not available here; use device: auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise SensituneError(f"device={name!r} is not a torch device; use auto, cpu or cuda[:N]") from e
