"""Device specs: one class per backend, each holding only its own fields.

An expert's ``device`` is one of these, told apart by ``backend`` (a pydantic discriminated
union). ``cpu``, ``nvml:1`` and ``simulated:h100`` are shorthand for the mapping form; a field
that belongs to another backend (``{backend: cpu, index: 1}``) is refused by name.

The implementations live in ``workers/devices/<backend>.py`` and ``workers.devices.BACKENDS`` maps
each backend name to its spec class and factory. The specs live here, not beside them, because
:class:`ExpertSpec <wattserve.specs.ExpertSpec>` validates them and this package imports nothing
above it. A new backend is a spec class here (joined to the union below), its module in
``workers/devices/`` and its line in ``BACKENDS``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BeforeValidator, Field, TypeAdapter, model_validator

from .strict import Strict


class DeviceSpecBase(Strict):
    """What every backend's spec answers; callers ask these instead of testing backend names."""

    backend: str = Field(description="Which backend meters the expert's energy; selects the spec class.")

    #: its power is a GPU's (measured, or a simulated GPU profile): GPU power/clock metrics apply
    is_gpu: ClassVar[bool] = False
    #: the field that ``<backend>:<arg>`` fills; None: the backend takes no argument
    shorthand_field: ClassVar[str | None] = None

    @property
    def label(self) -> str:
        """The shorthand naming this device, e.g. ``cpu``, ``nvml:0``, ``simulated:h100``."""
        arg = getattr(self, self.shorthand_field) if self.shorthand_field else None
        return f"{self.backend}:{arg}" if arg is not None else self.backend


class CpuDeviceSpec(DeviceSpecBase):
    """backend cpu: energy modeled from the process's CPU time (no counter is read)."""

    backend: Literal["cpu"] = Field(default="cpu", description="cpu; also what a mapping without `backend` is.")
    watts_per_core: float = Field(
        default=4.4,
        gt=0,
        description="Modeled active power per fully busy core. Default 280 W / 64 cores, the TDP of an AMD "
        "EPYC 7763 (a datasheet figure, not a measurement of this host).",
    )
    idle_power_w: float = Field(default=0.0, ge=0, description="Modeled idle power charged per wall-clock second.")


class NvmlDeviceSpec(DeviceSpecBase):
    """backend nvml: an NVIDIA GPU's measured energy counter (``nvml:<index>``)."""

    backend: Literal["nvml"] = Field(default="nvml", description="nvml (shorthand `nvml` or `nvml:<index>`).")
    index: int = Field(default=0, ge=0, description="GPU index as NVML numbers them (all GPUs of the host).")

    is_gpu: ClassVar[bool] = True
    shorthand_field: ClassVar[str | None] = "index"


class SimulatedDeviceSpec(DeviceSpecBase):
    """backend simulated: a named device's power/latency profile, modeled (``simulated:<profile>``)."""

    backend: Literal["simulated"] = Field(default="simulated", description="simulated (shorthand `simulated:<profile>`).")
    profile: str = Field(default="", description="Profile name, e.g. h100 (workers/devices/profiles). Required.")
    actuation_delay_s: float = Field(
        default=0.0, ge=0, le=120,
        description="Seconds before a clock lock or power limit takes effect (in-band NVML commands act within "
        "about a second, out-of-band BMC caps take up to ~40 s).",
    )

    is_gpu: ClassVar[bool] = True
    shorthand_field: ClassVar[str | None] = "profile"

    @model_validator(mode="after")
    def _needs_profile(self) -> SimulatedDeviceSpec:
        if not self.profile:
            raise ValueError("simulated devices need a profile, e.g. `simulated:h100`")
        return self


_AnyDeviceSpec = CpuDeviceSpec | NvmlDeviceSpec | SimulatedDeviceSpec  # a new backend's spec joins here
#: every backend's spec, in the order errors list them
DEVICE_SPECS: tuple[type[DeviceSpecBase], ...] = get_args(_AnyDeviceSpec)
_BY_BACKEND: dict[str, type[DeviceSpecBase]] = {cls.model_fields["backend"].default: cls for cls in DEVICE_SPECS}


def _expand(value: Any) -> Any:
    """Shorthand strings to mappings, a missing backend to cpu, foreign fields refused by name."""
    if isinstance(value, str):
        backend, _, arg = value.partition(":")
        cls = _BY_BACKEND.get(backend)
        if cls is None or not arg:
            return {"backend": backend}  # an unknown backend: the union's error lists the known ones
        if cls.shorthand_field is None:
            raise ValueError(f"device {backend!r} takes no ':<argument>' (got {value!r})")
        return {"backend": backend, cls.shorthand_field: arg}
    if isinstance(value, dict):
        value = {"backend": "cpu", **value}  # the mapping form defaulted to cpu before backends split
        cls = _BY_BACKEND.get(value["backend"]) if isinstance(value["backend"], str) else None
        if cls is not None:
            _refuse_foreign_fields(cls, value)
    return value


def _refuse_foreign_fields(cls: type[DeviceSpecBase], value: dict) -> None:
    # A key no backend knows is left to pydantic, whose error lists the allowed keys.
    own = cls.model_fields
    for key in value:
        owners = [b for b, other in _BY_BACKEND.items() if key not in own and key in other.model_fields]
        if owners:
            takes = ", ".join(k for k in own if k != "backend") or "no other keys"
            raise ValueError(
                f"{key!r} is a field of device backend {' and '.join(owners)}, not {cls.model_fields['backend'].default}"
                f" (which takes: {takes})"
            )


DeviceSpec = Annotated[
    _AnyDeviceSpec,
    Field(discriminator="backend"),
    BeforeValidator(_expand),
]

_ADAPTER: TypeAdapter[DeviceSpecBase] = TypeAdapter(DeviceSpec)


def parse_device_spec(value: Any) -> DeviceSpecBase:
    """A device spec from its shorthand (``nvml:1``) or mapping form; raises pydantic's ValidationError."""
    return _ADAPTER.validate_python(value)
