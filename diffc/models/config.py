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
    ``_diffusers_version`` and options that do not change the math). Lists become tuples so configs
    stay hashable. A required field missing from the file is a ``CheckpointError`` naming it.
    """

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config.json") -> C:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data and data[f.name] is not None:
                value = data[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CheckpointError(f"{source}: required field '{f.name}' is missing for {cls.__name__}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
