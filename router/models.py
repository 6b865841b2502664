"""Which model answers a request: the pool's served models and the default.

A request names its model with the `model` field of CompletionRequest or the `x-model` metadata
(different values in both are refused). No model means the default: the first of a `models:`
list. With a single `model:` (or none, in tests), a request that names no model goes to any
worker, as it always did: every worker of such a pool runs that one model, and a host whose file
names it differently keeps serving.

The served models are the configured ones and those of the workers registered right now (a host
on another machine may run one this router's file does not list); anything else is unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

MODEL_KEY = "x-model"


class UnknownModel(LookupError):
    """The request names a model the pool does not serve (the caller answers NOT_FOUND)."""


class ConflictingModel(ValueError):
    """The field and the metadata name different models (the caller answers INVALID_ARGUMENT)."""


class ServedModels:
    def __init__(
        self, configured: Sequence[str], registered: Callable[[], Iterable[str]], *, listed: bool
    ) -> None:
        """`listed`: the config has a `models:` list, whose first model is the default."""
        self._configured = tuple(configured)
        self._registered = registered
        self._listed = listed

    def configure(self, names: Sequence[str], *, listed: bool) -> None:
        """A reloaded config's models."""
        self._configured = tuple(names)
        self._listed = listed

    @property
    def default_name(self) -> str | None:
        """The model that answers a request naming none (for status)."""
        return self._configured[0] if self._configured else None

    @property
    def default(self) -> str | None:
        """Where a request naming no model goes: the default model, or None (any worker)."""
        return self.default_name if self._listed else None

    def names(self) -> list[str]:
        """Configured models first, in config order, then any other model a registered worker runs."""
        names = list(self._configured)
        names += sorted(set(self._registered()) - set(names))
        return names

    def resolve(self, field: str | None, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """The model a request goes to (None: any worker, when no model is configured)."""
        sent = next((value for key, value in metadata or () if key == MODEL_KEY), None)
        if isinstance(sent, bytes):
            sent = sent.decode("utf-8", "replace")
        if field is not None and sent is not None and field != sent:
            raise ConflictingModel(
                f"the request names model {field!r} but its {MODEL_KEY} metadata says {sent!r}"
            )
        wanted = field if field is not None else sent
        if wanted is None:
            return self.default
        names = self.names()
        if wanted not in names:
            raise UnknownModel(
                f"model {wanted!r} is not served here; served models: {', '.join(names) or 'none yet'}"
            )
        return wanted
