"""The precision a model answers in: fp32, or the forward under bf16 autocast.

bf16 is offered everywhere (emulated where the CPU lacks it, so every model gets a calibration for
it and tests run anywhere); `auto` picks it where it runs natively (a GPU, a CPU with AVX512-BF16
or AMX: `bench/inference_precision.py` measured its top-1 and speed there) and fp32 elsewhere. Open-set
thresholds move with the precision of the features, so each precision has its own calibration
(`ray_jobs.inference.calibration_store`), and a model is served only in a precision it was
calibrated in.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Literal

from ray_jobs.errors import UserInputError

if TYPE_CHECKING:  # torch is imported where a forward runs: the CLI reads the flag types without it
    import torch

InferencePrecision = Literal["auto", "fp32", "bf16"]
OFFERED: tuple[str, ...] = ("fp32", "bf16")  # every calibration is made in each of these


def native_bf16(device: torch.device) -> bool:
    from ray_jobs.training.engine import cpu_has_bf16

    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


def resolve_precision(setting: InferencePrecision, device: torch.device, calibrated: tuple[str, ...] | None,
                      source: str) -> str:
    """The precision to serve `source` in: `setting`, or for auto bf16 where native and calibrated.

    `calibrated` lists the precisions the model has a calibration for (None: it has none, so any
    precision serves). An explicit precision the model was not calibrated in is refused in one line.
    """
    if setting != "auto":
        if calibrated is not None and setting not in calibrated:
            raise UserInputError(f"--precision {setting}: model {source} has open-set thresholds for "
                                 f"{', '.join(calibrated)} only; evaluate it again to calibrate {setting}")
        return setting
    wanted = "bf16" if native_bf16(device) else "fp32"
    return wanted if calibrated is None or wanted in calibrated else "fp32"


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The forward's context: bf16 autocast, or nothing for fp32."""
    import torch

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
