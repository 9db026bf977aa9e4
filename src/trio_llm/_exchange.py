"""One attempt's open response: reading it, and settling the call with what came.

An :class:`Exchange` is made by :meth:`trio_llm._attempt.Requester.attempt` once a
response's head arrived, and holds the attempt's concurrency slots and rate-limit
reservation until it is settled and closed. :meth:`Exchange.finish` is where a reply ends
up, whatever the call (chat, embeddings, a stream's aggregation): the reservation settled
with its usage, the reply stored in the response cache, priced, counted, and told to the
call's trace; :meth:`Exchange.fail` and :meth:`Exchange.aclose` are the other ends.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, final

import httpx2

from . import _json
from ._errors import APIResponseError, APIStatusError, error_from_transport
from ._http import BodyTooLarge, HTTPResponse
from ._ratelimit import Reservation
from ._request import Request
from ._sending import HttpxResponse, stream_decoder
from ._types import ChatResponse, EmbeddingResponse, JSONObject, set_cost
from .providers._base import Provider

if TYPE_CHECKING:
    from ._attempt import Requester

__all__ = ["Exchange"]

R = TypeVar("R", ChatResponse, EmbeddingResponse)


@final
class Exchange:
    """One attempt's response, open: its concurrency slot and reservation held.

    Obtained from :meth:`Requester.open_exchange` with a success status. Read it with
    :meth:`read_json` (a whole reply) or :meth:`receive_some` (a stream), then
    :meth:`finish` with the reply or :meth:`fail`, and always :meth:`aclose`.
    """

    __slots__ = (
        "_decoder",
        "_requester",
        "_reservation",
        "_response",
        "_slot",
        "request",
        "request_id",
        "route",
    )

    def __init__(
        self,
        requester: Requester,
        request: Request,
        response: HTTPResponse | HttpxResponse,
        reservation: Reservation | None,
    ) -> None:
        self._requester = requester
        self._response = response
        self._reservation = reservation
        self._slot = True
        self.request = request
        self.route = route = request.route
        self.request_id = route.provider.request_id(response.headers)
        # Read part by part on trio-llm's transport, a stream is decoded here (httpx2 does
        # it for its own responses).
        self._decoder = (
            stream_decoder(response.headers.get("content-encoding"))
            if request.stream and type(response) is HTTPResponse
            else None
        )

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def reason_phrase(self) -> str:
        return self._response.reason_phrase

    @property
    def provider(self) -> Provider:
        """The wire format of the endpoint that answered."""
        return self.route.provider

    @property
    def endpoint(self) -> str:
        """The name of the endpoint that answered."""
        return self.route.name

    @property
    def max_response_bytes(self) -> int | None:
        """The largest body (or streamed event) the client accepts."""
        return self._requester.max_response_bytes

    async def read(self) -> bytes:
        """Read the whole body; the slot is released once it is read.

        Raises:
            APIConnectionError: the connection failed (``APITimeoutError``: the read
                timeout expired) before the end of the body.
            APIResponseError: the body is larger than the client's ``max_response_bytes``.

        Cancellation: the connection is closed; the exchange is left to :meth:`aclose`.
        """
        limit = self._requester.max_response_bytes
        self.request.waiting_for = "the rest of the response"
        try:
            body = await self._response.read(limit)
        except httpx2.HTTPError as exc:
            request = self.request
            raise error_from_transport(exc, method=request.method, url=request.shown_url) from exc
        except BodyTooLarge as exc:
            raise self.bad_reply(
                f"is larger than the {exc.limit:,}-byte limit (open_client's "
                "max_response_bytes); its connection was closed"
            ) from None
        self._release_slot()
        return body

    async def read_json(self) -> dict[str, Any]:
        """Read the whole body and decode it as a JSON object.

        Raises:
            APIResponseError: the body is not a JSON object.
            APIConnectionError: as for :meth:`read`.
        """
        body = await self.read()
        try:
            payload = _json.loads(body)
        except ValueError as exc:
            raise self.bad_reply(f"is not JSON: {body[:200].decode('utf-8', 'replace')!r}") from exc
        if not isinstance(payload, dict):
            raise self.bad_reply("is not a JSON object")
        return payload

    async def receive_some(self) -> bytes:
        """Return the next bytes of the body (``b""`` at its end), decoded if compressed.

        Raises:
            APIConnectionError: the connection failed or the read timeout expired.
            APIResponseError: a compressed body does not decode.

        Cancellation: nothing was received; the connection is closed.
        """
        try:
            data = await self._response.receive_some()
            decoder = self._decoder
            if decoder is None:
                return data
            # A server that compresses a stream although asked not to (a proxy, say).
            while data:
                decoded = decoder.decompress(data)
                if decoded:
                    return decoded
                data = await self._response.receive_some()
            return decoder.flush()
        except httpx2.HTTPError as exc:
            request = self.request
            raise error_from_transport(exc, method=request.method, url=request.shown_url) from exc
        except zlib.error as exc:
            raise self.bad_reply(f"does not decode as its content-encoding says: {exc}") from exc

    def bad_reply(self, what: str) -> APIResponseError:
        """Return the error for a success reply whose body ``what`` (e.g. "is not JSON")."""
        return APIResponseError(
            f"HTTP {self.status_code} from {self.request.label} {what}",
            status_code=self.status_code,
            request_id=self.request_id,
        )

    def error_event(self, status: int, error: object) -> APIStatusError:
        """Return the error for an error event that came before any of the reply.

        Built and settled as an error reply of ``status`` carrying ``error`` would be, so
        it is retried (or not), refunded and counted as that status is.
        """
        body = _json.dumps({"error": error})
        return self._requester.status_error(self, status, body, "error event in the stream")

    def finish(self, reply: R, payload: JSONObject | None = None) -> R:
        """Settle, store, price, count and trace ``reply``; return it.

        The reservation is settled with the reply's usage (at the estimate if it reports
        no tokens). ``payload``, the reply as received (a streamed one aggregated), is
        stored in the client's cache if the call uses it. The reply is priced by the
        provider of the endpoint that answered and the model sent there
        (``reply.cost``; one with no known price is counted as unpriced).
        """
        requester = self._requester
        request = self.request
        usage = reply.usage
        if payload is not None and requester.cache is not None:
            requester.cache.store(request, self.request_id, payload, usage)
        cost = requester.pricers[self.route.provider.name].cost(usage, reply.model, request.model)
        if cost is None:
            requester.unpriced += 1
        else:
            requester.cost += cost
            set_cost(reply, cost)
        requester.succeeded += 1
        self.route.succeeded += 1
        requester.prompt_tokens += usage.prompt_tokens
        requester.completion_tokens += usage.completion_tokens
        reservation = self._reservation
        if reservation is not None:
            self._reservation = None
            if usage.total_tokens:
                reservation.reconcile(usage.total_tokens)
            else:
                reservation.keep()
        trace = request.telemetry
        if trace is not None:
            trace.replied(reply)
        return reply

    def finish_api_call(self) -> None:
        """Count a call of the provider's other APIs (files, batches) as succeeded.

        Its answer is no model reply: no tokens, nothing to price, store or trace; the
        reservation (of no tokens: :meth:`Request.for_api`) is kept.
        """
        self._requester.succeeded += 1
        self.route.succeeded += 1
        reservation = self._reservation
        if reservation is not None:
            self._reservation = None
            reservation.keep()

    def settle(self, *, refund: bool) -> None:
        """Settle the reservation of an error reply: refunded, or charged no tokens."""
        reservation = self._reservation
        if reservation is not None:
            self._reservation = None
            reservation.refund() if refund else reservation.reconcile(0)

    def fail(self, error: BaseException | None = None) -> None:
        """Count the call as failed after its response began (a stream that broke)."""
        self._requester.failed += 1
        self.route.failed += 1
        trace = self.request.telemetry
        if trace is not None and error is not None:
            trace.failed(error)

    def _release_slot(self) -> None:
        if self._slot:
            self._slot = False
            self._requester.limiter.release()
            self.route.release()

    async def aclose(self) -> None:
        """Close the response and release the slot; an unsettled reservation is kept.

        A body not read to its end closes its connection. Never raises; safe in
        ``finally`` blocks of cancelled scopes.
        """
        response = self._response
        try:
            if type(response) is HTTPResponse:
                response.close()
            else:
                await response.aclose()
        finally:
            if self._reservation is not None:
                # Answered, usage unknown (left early, failed): the estimate stays charged.
                self._reservation.keep()
                self._reservation = None
            self._release_slot()
            trace = self.request.telemetry
            if trace is not None:
                trace.closed()
