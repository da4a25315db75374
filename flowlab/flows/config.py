"""The ``[[flows]]`` study section: one table per continuous model.

```toml
[[flows]]
name = "modified_loss"             # a registered flow, or "package.module:Class"
integrator = "torchdiffeq:dopri5"  # a registered integrator
rtol = 1e-7                        # adaptive; atol defaults to rtol/100; fixed step: dt
label = "igr"                      # default: name@integrator
correction = "hvp"                 # any other key is an option of the flow
integrator_options = { max_steps = 10000 }
```

Names are resolved (and options checked against the flow's and integrator's signatures) when the
run builds its followers; here only the shape of each table is checked.  Errors name fields as
``flows.N.key``, the path ``--set flows.N.key=...`` accepts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import freeze_options, pop_checked, positive_num, string
from ..errors import ConfigError

DEFAULT_INTEGRATOR = "torchdiffeq:dopri5"


def default_label(name: Any, integrator: Any) -> str:
    """A flow's label when none is given: ``name@integrator`` (objects by their ``name``)."""
    def text(x: Any) -> str:
        return x if isinstance(x, str) else str(getattr(x, "name", type(x).__name__))

    return f"{text(name)}@{text(integrator)}"


def default_integrator(name: str) -> str:
    """The integrator of a registered flow when ``[[flows]]`` names none: its class's
    ``default_integrator`` (``flowlab:euler_maruyama`` for the stochastic models), else
    :data:`DEFAULT_INTEGRATOR`."""
    from ..parts import default_parts

    try:
        reg = default_parts().registry("flows")
        cls = reg[name] if name in reg else None
    except Exception:  # noqa: BLE001 - an unknown name is reported when the flow is built
        cls = None
    return getattr(cls, "default_integrator", None) or DEFAULT_INTEGRATOR


@dataclass(frozen=True)
class FlowSpec:
    """One ``[[flows]]`` entry: a continuous model, its integrator and their options."""

    name: str
    integrator: str = DEFAULT_INTEGRATOR
    label: str = ""
    rtol: float | None = None
    atol: float | None = None
    dt: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", default_label(self.name, self.integrator))

    @property
    def flow_options(self) -> dict[str, Any]:
        """The flow's own options (everything but ``integrator_options``)."""
        return {k: v for k, v in self.options.items() if k != "integrator_options"}

    @property
    def integrator_options(self) -> Any:
        return self.options.get("integrator_options", {})

    def to_dict(self) -> dict:
        d = {"name": self.name, "integrator": self.integrator, "label": self.label}
        d.update({k: getattr(self, k) for k in ("rtol", "atol", "dt") if getattr(self, k) is not None})
        d.update(self.options)
        return d


@dataclass(frozen=True)
class FlowsSection:
    """The ``[[flows]]`` entries of a study (iterates as its :class:`FlowSpec` s)."""

    specs: tuple[FlowSpec, ...] = ()

    def __iter__(self) -> Iterator[FlowSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> FlowSpec:
        return self.specs[i]

    def to_dict(self) -> list[dict]:
        return [f.to_dict() for f in self.specs]


def parse_flow(raw: Any, index: int) -> FlowSpec:
    section = f"flows.{index}"
    if not isinstance(raw, Mapping):
        raise ConfigError(section, raw, "expected a table ([[flows]])")
    raw = dict(raw)
    if "name" not in raw:
        raise ConfigError(f"{section}.name", None, "is required (the flow's name, see `flowlab list`)")
    name = raw.pop("name")
    if string(name):
        raise ConfigError(f"{section}.name", name, string(name))
    checks = {"integrator": string, "label": string, "rtol": positive_num, "atol": positive_num, "dt": positive_num}
    kwargs = {"name": name, **pop_checked(raw, checks, section)}
    if "integrator" not in kwargs:
        kwargs["integrator"] = default_integrator(name)
    if "integrator_options" in raw and not isinstance(raw["integrator_options"], Mapping):
        raise ConfigError(f"{section}.integrator_options", raw["integrator_options"],
                          "expected a table of integrator options")
    return FlowSpec(**kwargs, options=freeze_options(raw))


def parse_flows(raw: Any) -> FlowsSection:
    """Validate the ``[[flows]]`` list (a single table is one flow)."""
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list | tuple):
        raise ConfigError("flows", raw, "expected a list of tables ([[flows]])")
    specs = tuple(parse_flow(f, i) for i, f in enumerate(raw))
    labels = [f.label for f in specs]
    for i, label in enumerate(labels):
        if label == "sgd" or label in labels[:i]:  # named at the repeat, the entry to change
            raise ConfigError(f"flows.{i}.label", label, "labels must be unique and not 'sgd' (give each flow a label)")
    return FlowsSection(specs)
