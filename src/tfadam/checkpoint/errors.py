"""The one exception the checkpoint reader raises for bad input."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint is damaged, incomplete, unsupported, or does not fit the model.

    The message names the file and, where one is involved, the tensor, then
    says what to do. The parts are also attributes: ``path``, ``key``,
    ``detail`` and ``hint`` (any may be ``None``).

    >>> err = CheckpointError("checksum mismatch", path="m.index", key="w")
    >>> str(err)
    "m.index: tensor 'w': checksum mismatch"
    >>> isinstance(err, ValueError)
    True
    """

    def __init__(
        self,
        detail: str,
        *,
        path: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.detail = detail
        self.path = path
        self.key = key
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(str(self.path))
        if self.key is not None:
            parts.append(f"tensor {self.key!r}")
        parts.append(self.detail)
        text = ": ".join(parts)
        if self.hint:
            text += f". {self.hint}"
        return text

    def located(self, *, path: str | None = None, key: str | None = None) -> CheckpointError:
        """A copy with the file and tensor filled in where still unknown."""
        return CheckpointError(
            self.detail,
            path=self.path if self.path is not None else path,
            key=self.key if self.key is not None else key,
            hint=self.hint,
        )
