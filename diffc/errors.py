"""User-facing errors. The CLI prints these as one clear message, without a traceback."""


class DiffcError(Exception):
    """Base class for every error diffc raises on purpose."""


class InvalidArgumentError(DiffcError, ValueError):
    """A user-supplied value is out of range; the message names the field and what is accepted.

    ``field`` and ``message`` are kept apart, so a caller can raise the same message under another name (a CLI
    flag for a Python argument)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class OutputError(DiffcError, OSError):
    """A file or directory diffc was asked to write cannot be written; names the path and the OS reason.

    Also an ``OSError``, so code that handles write failures as such keeps doing so.
    """

    def __init__(self, path: str, reason: str, field: str | None = None):
        self.path, self.reason, self.field = str(path), reason, field
        super().__init__(f"{field + ': ' if field else ''}cannot write {path}: {reason}")


class CheckpointError(DiffcError):
    """A checkpoint directory is missing files, names an unknown class, or has malformed contents."""


class WeightMismatchError(CheckpointError):
    """The checkpoint's tensor names do not match the model's parameters."""

    def __init__(self, component: str, missing: list[str], unexpected: list[str], limit: int = 20):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)

        def fmt(keys: list[str]) -> str:
            shown = ", ".join(keys[:limit])
            return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

        parts = [f"weights of '{component}' do not match the model"]
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {fmt(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {fmt(self.unexpected)}")
        super().__init__("; ".join(parts))
