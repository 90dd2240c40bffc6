"""Model configs are frozen dataclasses read from a component's ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ..errors import CheckpointError

C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base for native model configs.

    ``from_dict`` keeps the fields the dataclass declares and ignores the rest (``_class_name``,
    ``_diffusers_version`` and options that do not change the math). An explicit null keeps the field's
    default unless that default is ``None``. Lists become tuples so configs
    stay hashable. A required field missing from the file is a ``CheckpointError`` naming it.
    """

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config.json") -> C:
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            if value is not None:
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
            elif f.name in data and f.default is None:
                kwargs[f.name] = None  # an explicit null where the field allows it
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CheckpointError(f"{source}: required field '{f.name}' is missing for {cls.__name__}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
