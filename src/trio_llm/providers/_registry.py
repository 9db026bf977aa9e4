"""The providers a client can be opened with, by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .._errors import ConfigurationError
from ._anthropic import AnthropicProvider
from ._base import Provider
from ._openai import OpenAIProvider

__all__ = ["PROVIDER_NAMES", "provider_named"]

_PROVIDERS: Final[dict[str, Callable[[], Provider]]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
}

#: The names ``open_client(provider=...)`` accepts.
PROVIDER_NAMES: Final = tuple(_PROVIDERS)


def provider_named(name: str) -> Provider:
    """Return the adapter for ``name``.

    Raises:
        ConfigurationError: no provider has that name.
    """
    make = _PROVIDERS.get(name)
    if make is None:
        supported = ", ".join(repr(known) for known in PROVIDER_NAMES)
        raise ConfigurationError(f"unknown provider {name!r}; supported: {supported}")
    return make()
