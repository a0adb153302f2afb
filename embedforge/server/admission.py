"""Admission: which Embed and Score calls the server takes on, one policy for gRPC and HTTP.

The policy, in one paragraph (docs/admission.md states it too). Everything a client controls is bounded by bytes
and by time, never by a count of slots. A call's body must arrive within `body_timeout_s`; a stalled body is
dropped and what it held is given back. Bodies count against one byte budget, `max_pending_bytes`, from the
moment they are read until their texts are tokens: an HTTP body as its bytes arrive, a gRPC body (whose size
gRPC reveals only once all of it has arrived) at the largest size a body may have, trued up when it arrives. A
body over `max_body_bytes` is refused (HTTP 413; gRPC refuses it itself). Items are counted on the wire
before any Python object is built (`max_texts_per_request`). Every call has a deadline (the client's, or
`default_deadline_s`); a call whose deadline cannot be met behind the work already queued is refused at once
with a retry hint, before its body is read, again once its texts are parsed (tokens estimated from their
characters, so a hopeless call costs no tokenization) and once its tokens are known: the batcher serves least
attained service first, so a short call waits for little even behind a long queue, and a long one is judged
against all of it. Since a newcomer overtakes queued calls, it is also refused if it would make one of them
miss a deadline that it would meet otherwise (an admitted call is not made late by later ones). A refusal's
retry hint holds for its connection: a call that comes sooner on the same connection is refused at once,
before its body is read (a client that ignores the hint costs the server no more than one header each time).
RESOURCE_EXHAUSTED / 429 means that a byte or queue budget is spent, that the deadline cannot be met, or that
the connection's retry hint has not passed, nothing else. Health and Info are never admitted, so never refused
for load.

Front ends call `open` (before reading), `read_message` (gRPC) or `read_chunks` (HTTP), hand the `Ticket` to
`EmbeddingCore`, which calls `check_texts_wait`, `check_wait` and `Ticket.tokenized` once the texts are
tokens; the front ends call `refused` when they answer RESOURCE_EXHAUSTED / 429 and `Ticket.close` when the
call ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

WAIT_SAFETY = 1.5
"""A call is admitted only if its estimated wait, times this, fits in its deadline: the estimate assumes the
recent throughput holds and no newer short calls overtake it."""

CHARS_PER_TOKEN = 8
"""For the estimate before tokenization: natural text has more tokens than one per 8 characters (the bundled
tokenizer: at most one per 6.6 characters on the STS-B, SNLI and MRPC validation texts, specials included)."""

REMEMBERED_CONNECTIONS = 4096
"""Connections with a retry hint pending are forgotten once their hint has passed, checked when this many are
remembered."""

class QueuedWork(Protocol):
    """What admission asks of the queue (the batcher answers)."""

    def estimated_wait_s(self, tokens: int) -> float | None:
        """Seconds until a request of `tokens` tokens would be computed behind the queued work; None: unknown."""

    def delays_past_deadline(self, tokens: int, safety: float) -> float | None:
        """Seconds until a queued request that a newcomer of `tokens` tokens would make late is computed; None
        when it would make none late."""


@dataclass(frozen=True)
class AdmissionLimits:
    max_body_bytes: int  # the largest request body, for both protocols
    max_pending_bytes: int  # bytes of request bodies held until their texts are tokens
    body_timeout_s: float  # time a body may take to arrive once the call has started
    default_deadline_s: float  # deadline of a call that brings none


class Overloaded(Exception):
    """A byte or queue budget is spent, or the deadline cannot be met; `retry_after_s` is the hint."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BodyTooLarge(Exception):
    """The body is larger than any body may be (HTTP 413)."""


class SlowBody(Exception):
    """The body did not arrive within body_timeout_s."""


class ByteBudget:
    """Bytes of request bodies in the server's hands, against a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self, size: int) -> bool:
        if self.taken + size > self.limit:
            return False
        self.taken += size
        return True

    def give(self, size: int) -> None:
        self.taken -= size


class Ticket:
    """One admitted call: its deadline (time.monotonic()) and the body bytes it holds against the budget."""

    def __init__(self, budget: ByteBudget, deadline: float) -> None:
        self._budget = budget
        self.deadline = deadline
        self.held = 0

    def hold(self, size: int) -> None:
        """Hold `size` more bytes; Overloaded if the budget cannot take them."""
        if not self._budget.take(size):
            raise Overloaded(f"request bodies in memory are at the limit ({self._budget.limit} bytes); "
                             "retry later")
        self.held += size

    def resize(self, size: int) -> None:
        """Hold exactly `size` bytes (a gRPC body once its real size is known; never more than held)."""
        self._budget.give(self.held - size)
        self.held = size

    def tokenized(self) -> None:
        """The texts are tokens now (the queue's token budget counts them): the body's bytes go back."""
        self.resize(0)

    def close(self) -> None:
        """The call ended: whatever it still holds goes back."""
        self.resize(0)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()


class Admission:
    """The admission policy above; `queue` is set once the model serves (the batcher)."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.budget = ByteBudget(limits.max_pending_bytes)
        self.queue: QueuedWork | None = None
        self._retry_at: dict[str, float] = {}  # connection -> time.monotonic() its retry hint passes

    def open(self, timeout_s: float | None, reserve: int = 0, connection: str | None = None) -> Ticket:
        """Admit a call before its body is read: its connection's retry hint (if any) must have passed, its
        deadline is `timeout_s` from now (None: the default) and must allow for the smallest request behind the
        queued work; `reserve` bytes are held for its body."""
        retry_at = self._retry_at.get(connection, 0.0) if connection else 0.0
        if retry_at > time.monotonic():
            wait = retry_at - time.monotonic()
            raise Overloaded(f"this connection was asked to retry after {wait:.2f} s more; calls before then are "
                             "refused unread", retry_after_s=wait)
        ticket = self.exempt(timeout_s)
        self.check_wait(ticket, 1)
        if reserve:
            ticket.hold(reserve)
        return ticket

    def exempt(self, timeout_s: float | None) -> Ticket:
        """A ticket for a call that is never refused for load (Info): a deadline, nothing held."""
        timeout_s = self.limits.default_deadline_s if timeout_s is None else timeout_s
        return Ticket(self.budget, time.monotonic() + timeout_s)

    def check_wait(self, ticket: Ticket, tokens: int) -> None:
        """Overloaded (with an estimated wait as the retry hint) if `tokens` cannot be computed before the
        ticket's deadline behind the work queued now, or if computing them first would make a queued call late."""
        wait = None if self.queue is None else self.queue.estimated_wait_s(tokens)
        if wait is None:
            return
        remaining = ticket.remaining_s()
        if wait * WAIT_SAFETY > remaining:
            raise Overloaded(f"the queued work would take about {wait:.2f} s before this call's {tokens} tokens "
                             f"are computed, and its deadline is {max(remaining, 0.0):.2f} s away",
                             retry_after_s=wait)
        endangered = self.queue.delays_past_deadline(tokens, WAIT_SAFETY)
        if endangered is not None:
            raise Overloaded(f"this call's {tokens} tokens, served first, would make a call queued earlier miss its "
                             f"deadline; it is done in about {endangered:.2f} s", retry_after_s=endangered)

    def refused(self, connection: str | None, exc: Exception) -> float:
        """A call on `connection` is answered RESOURCE_EXHAUSTED because of `exc`: its retry hint in seconds
        (at most default_deadline_s), which then holds for the connection."""
        hint = min(exc.retry_after_s if isinstance(exc, Overloaded) else 1.0, self.limits.default_deadline_s)
        if connection:
            now = time.monotonic()
            if len(self._retry_at) >= REMEMBERED_CONNECTIONS:
                self._retry_at = {key: at for key, at in self._retry_at.items() if at > now}
            self._retry_at[connection] = max(self._retry_at.get(connection, 0.0), now + hint)
        return hint

    def check_texts_wait(self, ticket: Ticket, texts: list[str], max_length: int) -> None:
        """check_wait before tokenization, for the tokens the texts will have at least: one per CHARS_PER_TOKEN
        characters (at most max_length) plus the two specials, per text."""
        self.check_wait(ticket, sum(min(max_length, 2 + len(text) // CHARS_PER_TOKEN) for text in texts))

    async def read_message(self, ticket: Ticket, read: Callable[[], Awaitable[bytes]]) -> bytes:
        """A gRPC body: read() within body_timeout_s, then the ticket's reservation trued up to its size."""
        try:
            raw = await asyncio.wait_for(read(), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise SlowBody(f"the request message did not arrive within {self.limits.body_timeout_s:g} s") from None
        ticket.resize(min(ticket.held, len(raw)))
        if len(raw) > ticket.held:
            ticket.hold(len(raw) - ticket.held)
        return raw

    async def read_chunks(self, ticket: Ticket, chunks: AsyncIterator[bytes],
                          content_length: int | None) -> bytearray:
        """An HTTP body, chunk by chunk, each held as it arrives; all of it within body_timeout_s."""
        limit = self.limits.max_body_bytes
        if content_length is not None and content_length > limit:
            raise BodyTooLarge(f"request body too large: {content_length} bytes; the limit is {limit} bytes")
        give_up = time.monotonic() + self.limits.body_timeout_s
        body = bytearray()
        iterator = aiter(chunks)
        while True:
            try:
                chunk = await asyncio.wait_for(anext(iterator), max(0.0, give_up - time.monotonic()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise SlowBody(f"the request body did not arrive within {self.limits.body_timeout_s:g} s") from None
            if len(body) + len(chunk) > limit:
                raise BodyTooLarge(f"request body too large: the limit is {limit} bytes")
            ticket.hold(len(chunk))
            body += chunk
        return body
