"""Prompt templates with named fields, checked when filled; run, mapped or chained in plain code.

There is no chain object: one call's output feeds the next through ordinary variables::

    outline = await outline_prompt.run(client, topic=topic)
    story = await story_prompt.run(client, outline=outline.text)
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, final, overload

from ._types import ChatResponse, Result

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["Prompt"]

T = TypeVar("T")


def _fields_of(template: str) -> tuple[str, ...]:
    """Return the template's field names in order of first use; reject positional fields."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"invalid prompt template {template!r:.80}: {exc}") from None
    for _literal, name, _spec, _conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(
                f"prompt template field {{{name}}} must be a plain name like {{topic}} "
                "(write literal braces as {{ and }})"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


@final
class Prompt:
    """A chat prompt template with named fields, an optional system message and default params.

    ``Prompt("Write a short story about {topic}.", system="You are terse.", max_tokens=200)``.
    Fields use ``str.format`` syntax with plain names; ``{{`` and ``}}`` are literal braces.
    The system message may have fields too. Every field must be given when the prompt is
    filled, and no others.

    Attributes:
        template: the user message template.
        system: the system message template, or ``None``.
        params: default ``client.chat`` arguments (``model``, ``temperature``, ...).
        fields: the field names, in order of first use.
    """

    def __init__(self, template: str, *, system: str | None = None, **params: Any) -> None:
        self.template = template
        self.system = system
        self.params: dict[str, Any] = params
        fields = list(_fields_of(template))
        for name in _fields_of(system) if system is not None else ():
            if name not in fields:
                fields.append(name)
        self.fields: tuple[str, ...] = tuple(fields)

    def __repr__(self) -> str:
        return f"Prompt({self.template!r}, system={self.system!r}, fields={self.fields!r})"

    def with_params(self, **params: Any) -> Prompt:
        """Return a copy whose default params are updated with ``params``."""
        return Prompt(self.template, system=self.system, **{**self.params, **params})

    def _check(self, values: Mapping[str, object]) -> None:
        missing = [name for name in self.fields if name not in values]
        unknown = sorted(name for name in values if name not in self.fields)
        if missing or unknown:
            problems = []
            if missing:
                problems.append(f"missing field(s) {', '.join(missing)}")
            if unknown:
                problems.append(f"unknown field(s) {', '.join(unknown)}")
            raise ValueError(
                f"{'; '.join(problems)} for prompt {self.template!r:.60} "
                f"(its fields: {', '.join(self.fields) or 'none'})"
            )

    def format(self, **values: object) -> str:
        """Return the user message with ``values`` filled in.

        Raises:
            ValueError: a field is missing or unknown (the message names them).
        """
        self._check(values)
        return self.template.format(**values)

    def messages(self, **values: object) -> list[dict[str, Any]]:
        """Return the messages (system first, if any) with ``values`` filled in.

        Raises:
            ValueError: a field is missing or unknown (the message names them).
        """
        self._check(values)
        user = {"role": "user", "content": self.template.format(**values)}
        if self.system is None:
            return [user]
        return [{"role": "system", "content": self.system.format(**values)}, user]

    async def run(self, client: Client, /, **values: object) -> ChatResponse:
        """Fill in ``values`` and send the prompt with its default params.

        Raises:
            ValueError: a field is missing or unknown (before anything is sent).
            LLMError: any error ``client.chat`` raises.

        Cancellation: as for ``client.chat``: the request in flight is abandoned.
        """
        return await client.chat(self.messages(**values), **self.params)

    async def map(
        self,
        client: Client,
        items: Iterable[Mapping[str, object]],
        /,
        *,
        limit: int | None = None,
    ) -> list[Result[ChatResponse]]:
        """Run the prompt once per mapping of field values, concurrently; results in order.

        Built on ``client.chat_many``: at most ``limit`` requests in progress (default:
        the client's ``max_concurrency``), and one :class:`Result` per item, so a failed
        item never cancels the others.

        Raises:
            ValueError: an item has a missing or unknown field (checked for every item
                before anything is sent).

        Cancellation: every request in flight is cancelled and nothing is returned.
        """
        requests = [{"messages": self.messages(**item), **self.params} for item in items]
        return await client.chat_many(requests, limit=limit)

    @overload
    async def run_structured(
        self, client: Client, schema: type[T], /, *, max_repairs: int = 2, **values: object
    ) -> T: ...

    @overload
    async def run_structured(
        self,
        client: Client,
        schema: Mapping[str, Any],
        /,
        *,
        max_repairs: int = 2,
        **values: object,
    ) -> Any: ...

    async def run_structured(
        self,
        client: Client,
        schema: type[Any] | Mapping[str, Any],
        /,
        *,
        max_repairs: int = 2,
        **values: object,
    ) -> Any:
        """Fill in ``values`` and ask for a reply matching ``schema``; see :func:`chat_structured`.

        ``schema`` is a pydantic model, an attrs class, a dataclass, a ``TypedDict`` or a
        JSON Schema dict.

        Raises:
            ValueError: a field is missing or unknown.
            StructuredOutputError: the reply did not match ``schema`` after the repairs.

        Cancellation: the request in flight is cancelled; nothing is returned.
        """
        # Imported here: jsonschema and cattrs load only for structured calls.
        from ._structured import chat_structured

        return await chat_structured(
            client, self.messages(**values), schema, max_repairs=max_repairs, **self.params
        )
