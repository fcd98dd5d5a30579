"""email_queue: render a template, send it once, record it in the email ledger.

At most one send per message: before the SMTP conversation the message's
idempotency key is claimed in `public.email_ledger` ('sending', committed);
after it the row says 'sent' (or 'failed', so a retry may claim it again).
A redelivered message whose mail is 'sent' is archived without sending; one
left 'sending' by a worker that died mid-send is dead-lettered for a person
to check, never sent blind. The send and its record are shielded from
shutdown's cancellation, so only a crash, or a relay that took the whole
message and then did not answer (it may have accepted it), leaves 'sending'
behind; the latter is dead-lettered at once.

A relay's 4xx to the mail (greylisting, a rate limit, a full mailbox) is a
deferral, waited out on a time budget like an MTA's queue lifetime
(`_deferral`, SMTP_DEFER_MAX_S), not on MAX_ATTEMPTS. Every message field
that reaches a header is checked at the door (the models below), since message
bodies are untrusted: a bad one is dead-lettered naming the field, and the
MIME writer never sees it.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import PurePosixPath
from typing import Any, Final, Literal, LiteralString

import psycopg
import structlog
import trio
from pydantic import AwareDatetime, BaseModel, Field, field_validator, model_validator

from reactor.clinic import queries
from reactor.clinic.resources import TEMPLATES_DIR
from reactor.clinic.services.mailer import (
    Attachment,
    DeliveryUnknown,
    Mailer,
    OutgoingMail,
    SmtpDeferred,
    address_problem,
    build_message,
    check_mail_settings,
    header_safe,
    open_mailer,
)
from reactor.clinic.services.templates import EmailRenderer
from reactor.clinic.settings import MailSettings, Settings
from reactor.engine import GroupCommit
from reactor.engine.db import Database, DatabaseUnavailable
from reactor.engine.errors import Deferred, RetryableError
from reactor.engine.processor import Context, Job, MessageModel, PermanentError, Processor
from reactor.engine.queues import Message
from reactor.engine.retry import RetryPolicy

__all__ = ["EmailMessage", "EmailProcessor", "verdict_bound_s"]

log = structlog.get_logger("reactor.email")

# The verdict of a send (sent / failed) is written to the ledger for up to this long.
LEDGER_RETRY_S = 10.0
# How long a ledger claim's answer is awaited once sent (see `claim`).
CLAIM_BOUND_S = 5.0
# MAIL FROM, RCPT TO, DATA and the message: each may take SMTP_TIMEOUT_S.
SMTP_COMMANDS_PER_MAIL = 4
# Past a conversation's own bound, what a live holder of a 'sending' row still needs to
# write its verdict: the group commit of 'sent' verdicts waits behind other writers.
VERDICT_MARGIN_S = 30.0
# How often a delivery that found another's 'sending' row looks again (at most).
SENDING_RECHECK_S = 15
# How often delivery-unknown dead letters are checked against the ledger.
RECONCILE_EVERY_S = 60.0

# The longest address, in characters: public.queue_email_task refuses longer ones (044).
MAX_ADDRESS = 254
# The longest subject a message may give, in characters: one header line (RFC 5322's
# 998). The email package refolds a subject in time that grows with the square of its
# words: a 250,000-character one took 7 s to build. queue_email_task refuses longer (045).
MAX_SUBJECT = 998
# A mail built on the reactor's own thread: no file, a subject and bodies of at most
# these sizes (a rendered mail is ~2,000 characters, 0.2 ms; at these bounds a build
# took 2 ms at worst, for Cyrillic bodies, against 0.9 ms for ASCII).
INLINE_BUILD_SUBJECT = 256
INLINE_BUILD_BODIES = 32_768


# What the project attaches (the report PDF; text and pictures at most): a content type
# is one of these, exactly, never a string from the message written into a header.
ATTACHMENT_TYPES: Final = frozenset({"application/pdf", "text/plain", "text/csv",
                                     "image/png", "image/jpeg"})
# A file name goes into two header parameters (name=, filename=): no control or format
# character (CR, LF, NUL, bidi overrides), nothing that ends or splits a parameter.
_NAME_FORBIDDEN: Final = frozenset('"\\/;:*?<>|')
MAX_FILENAME = 120


def _check_filename(value: str) -> str:
    problem = header_safe(value)
    if problem is None and any(unicodedata.category(c) == "Cf" for c in value):
        problem = "must not contain invisible format characters (bidi overrides...)"
    if problem is None and _NAME_FORBIDDEN.intersection(value):
        problem = "must not contain any of \" \\ / ; : * ? < > |"
    if problem is None and (not value.strip(" .") or len(value) > MAX_FILENAME):
        problem = f"must be a file name of 1 to {MAX_FILENAME} characters"
    if problem:
        raise ValueError(f"{problem}: it goes into the attachment's headers")
    return value


class AttachmentRef(BaseModel):
    """A file under REPORTS_DIR to attach (the report processor adds the PDF).

    Every field that reaches the attachment's headers is checked here, at the door:
    `content_type` is one of ATTACHMENT_TYPES (no parameters), and the name (the
    `filename`, else the last part of `path`) is a plain file name.
    """

    path: str
    filename: str | None = None
    content_type: str = "application/pdf"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        problem = header_safe(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str | None) -> str | None:
        return None if value is None else _check_filename(value)

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, value: str) -> str:
        if value.lower() not in ATTACHMENT_TYPES:
            shown = value if len(value) <= 60 else value[:60] + "..."
            raise ValueError(f"{shown!r} is not one of {', '.join(sorted(ATTACHMENT_TYPES))} "
                             "(a type/subtype, no parameters)")
        return value.lower()

    @model_validator(mode="after")
    def _name_from_path(self) -> AttachmentRef:
        """Without `filename`, the path's last part names the attachment: the same rule."""
        if self.filename is None:
            try:
                _check_filename(PurePosixPath(self.path).name)
            except ValueError as exc:
                raise ValueError(f"path: its last part names the attachment and {exc}") \
                    from None
        return self

    @property
    def name(self) -> str:
        """The name the mail gives the attachment."""
        return self.filename or PurePosixPath(self.path).name


class EmailMessage(MessageModel):
    to: str
    subject: str | None = None
    template: str = Field(pattern=r"^[a-z0-9_]+$")
    variables: dict[str, Any] = Field(default_factory=dict)
    priority: int = 0
    locale: Literal["ru", "en"] | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)
    attachments: list[AttachmentRef] = Field(default_factory=list)
    # Stamped by the reactor on a mail a relay deferred (4xx), when it puts the mail back
    # on the queue; a producer leaves them out. See EmailProcessor._deferral.
    deferred_since: AwareDatetime | None = None
    deferrals: int = Field(0, ge=0)

    @field_validator("to")
    @classmethod
    def _address(cls, value: str) -> str:
        """RFC 6531 / IDNA 2008 (`user@пример.рф`, `мама@example.org`): mailer.address."""
        if len(value) > MAX_ADDRESS:
            raise ValueError(f"not a valid email address: over {MAX_ADDRESS} characters")
        problem = address_problem(value)
        if problem:
            raise ValueError(f"not a valid email address: {problem}")
        return value

    @field_validator("subject")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and ("\r" in value or "\n" in value):
            raise ValueError("must not contain CR or LF")
        if value is not None and len(value) > MAX_SUBJECT:
            raise ValueError(f"over {MAX_SUBJECT} characters: it is one header line")
        problem = None if value is None else header_safe(value, allow_tab=True)
        if problem:
            raise ValueError(f"{problem}: it is the Subject header")
        return value


class EmailProcessor(Processor[EmailMessage]):
    settings: Settings
    mail: MailSettings  # what it reads of the settings: its own part
    model = EmailMessage
    concurrency = 20
    timeout_s = 120.0

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.mail = settings = self.settings
        check_mail_settings(settings)
        self.renderer = EmailRenderer(TEMPLATES_DIR, timezone=settings.app_timezone,
                                      app_name=settings.app_name,
                                      app_base_url=settings.app_base_url,
                                      reply_to=settings.smtp_reply_to)
        self.mailer: Mailer | None = None
        self._defer_policy = RetryPolicy(base_s=settings.smtp_defer_backoff_s,
                                         max_s=settings.smtp_defer_backoff_max_s)
        # Group commit of 'sent' verdicts (see _record_sent).
        # A mail that went out is recorded even if its job was cut meanwhile: orphans kept.
        self._sent_verdicts: GroupCommit[tuple[str, str], None] = GroupCommit(
            self._write_sent, keep_orphans=True)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with open_mailer(self.mail) as mailer:
            self.mailer = mailer
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_reconciling)
                    try:
                        yield
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                self.mailer = None

    async def _keep_reconciling(self) -> None:
        while True:
            await trio.sleep(RECONCILE_EVERY_S)
            await self.reconcile()

    async def reconcile(self) -> int:
        """Resolve delivery-unknown dead letters whose ledger row says 'sent' by now (a
        frozen worker woke and wrote its verdict): each is archived out of the dead-letter
        queue, with an `email.reconciled` event (and its log line). Returns how many.
        A database that does not answer now is tried again at the next round."""
        try:
            rows = await self.db.run(lambda c: c.execute(queries.RECONCILE_UNKNOWN).fetchall())
        except (DatabaseUnavailable, psycopg.Error) as exc:
            log.debug("email reconcile skipped", error=str(exc))
            return 0
        for dlq_msg_id, key, sent_by in rows:
            self.bus.publish("email.reconciled", self.queue, error=None,
                             dlq_msg_id=int(dlq_msg_id), ledger_key=str(key),
                             sent_by_msg_id=int(sent_by))
        return len(rows)

    async def handle(self, job: Job[EmailMessage]) -> None:
        msg = job.message
        key = msg.idempotency_key or unkeyed_ledger_key(job.delivery)
        locale = msg.locale or await self._profile_locale(msg.to) or "ru"
        rendered = self.renderer.render(msg.template, locale, msg.variables, msg.subject)
        attachments = [await self._attachment(ref) for ref in msg.attachments]
        sender = self.mail.smtp_from or "noreply@localhost"
        build = partial(build_message, sender=sender, sender_name=self.mail.smtp_from_name,
                        to=msg.to, email=rendered, attachments=attachments,
                        reply_to=self.mail.smtp_reply_to)
        # A mail's text and HTML take ~0.2 ms to build: on this thread, as a hop to a
        # worker thread costs more (0.4 ms of CPU a mail, the threads trading the GIL;
        # bench mail). A file's base64 lines, or an outsized subject or body, take
        # milliseconds: a worker thread builds those, and every other job goes on.
        if (attachments or len(rendered.subject) > INLINE_BUILD_SUBJECT
                or len(rendered.text) + len(rendered.html) > INLINE_BUILD_BODIES):
            email = await trio.to_thread.run_sync(build)
        else:
            email = build()

        try:
            await self._send(job, key, email)
        except SmtpDeferred as exc:
            raise self._deferral(job, key, exc) from None

    async def _send(self, job: Job[EmailMessage], key: str, email: OutgoingMail) -> None:
        """Claim the ledger key, hold the SMTP conversation, record its verdict."""
        msg = job.message
        assert self.mailer is not None, "EmailProcessor used outside running()"
        # Waiting for a pooled connection may be cut (job timeout, shutdown): nothing has
        # started, and the ledger is claimed only once the connection is ours.
        async with self.mailer.session() as session:
            holder = await claim(self.db, key, job, msg)
            if holder is not None and holder.status == "sent":
                return  # redelivered after the mail went out: nothing to do
            if holder is not None:
                raise self._sending_elsewhere(job, key, holder)
            # Shielded: shutdown must not cut a conversation whose outcome we then cannot
            # know. Bounded all the same: every SMTP command has SMTP_TIMEOUT_S, and the
            # verdict's write to the ledger gets LEDGER_RETRY_S.
            with trio.CancelScope(shield=True) as conversation:
                conversation.deadline = (trio.current_time() + LEDGER_RETRY_S
                                         + SMTP_COMMANDS_PER_MAIL * self.mail.smtp_timeout_s)
                try:
                    message_id = await session.send(email)
                except DeliveryUnknown as exc:
                    # The ledger keeps 'sending' (never resent blind): a person decides.
                    raise PermanentError(
                        f"delivery state unknown: {exc} (ledger key {key}); check the SMTP "
                        f"server's log, then run `reactor email resolve {key} --sent` (it "
                        "arrived) or `--resend` (it did not) and replay the dead letter"
                    ) from None
                except Exception as exc:
                    await self._record(queries.EMAIL_FAILED, {"key": key, "error": str(exc),
                                                              "msg_id": job.msg_id})
                    raise
                await self._record_sent(key, message_id)
            if conversation.cancelled_caught:
                raise RetryableError(f"the SMTP conversation did not finish in time (ledger "
                                     f"key {key}): its outcome is unknown", outage=True)

    @property
    def verdict_bound_s(self) -> float:
        return verdict_bound_s(self.mail)

    def _sending_elsewhere(self, job: Job[EmailMessage], key: str,
                           holder: Holder) -> Deferred | PermanentError:
        """Another delivery holds the key in 'sending': a question, not a verdict.

        Its worker may be alive and about to write 'sent' (its verdicts are batched), or
        frozen (SIGSTOP, a long pause, a VM migration) past its lease while this replica
        took the message again. So the mail is looked at again later (put back on the
        queue, no attempt counted, its ledger key kept) until the holder has surely had
        the time to write a verdict (verdict_bound_s after its claim). A 'sent' row then
        archives it quietly (the check above); only a row still 'sending' past the bound
        is dead-lettered as delivery-unknown, saying who claimed it and when.
        """
        left = self.verdict_bound_s - holder.age_s
        since = holder.claimed_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if left > 0:
            stamp = {} if job.message.idempotency_key else {"idempotency_key": key}
            # Deferred: not a failure, not done (no archive row; `job.deferred`).
            return Deferred(f"ledger key {key} is being sent by message {holder.msg_id} "
                            f"(claimed {since}): looking again before deciding",
                            min(SENDING_RECHECK_S, max(1, math.ceil(left))), stamp=stamp)
        return PermanentError(
            f"delivery state unknown: message {holder.msg_id} claimed ledger key {key} at "
            f"{since} and wrote no verdict within {self.verdict_bound_s:g}s (its worker "
            f"stopped or froze while sending); check the SMTP server's log, then run "
            f"`reactor email resolve {key} --sent` (it arrived) or `--resend` (it did not) "
            "and replay the dead letter (a 'sent' written later resolves it by itself)")

    def _deferral(self, job: Job[EmailMessage], key: str,
                  exc: SmtpDeferred) -> Deferred | PermanentError:
        """A relay's 4xx: wait it out on the time budget, as an MTA keeps a deferred mail.

        The mail goes back on the queue (Deferred) with when its deferrals began and how
        many there were, stamped into its body: that survives restarts and replicas and
        costs no attempt of MAX_ATTEMPTS. Tried again after SMTP_DEFER_BACKOFF_S,
        doubling up to SMTP_DEFER_BACKOFF_MAX_S (the last wait shortened to end at the
        budget); dead-lettered with the last reply once SMTP_DEFER_MAX_S has passed.
        """
        msg = job.message
        now = datetime.now(UTC)
        since = min(msg.deferred_since or now, now)  # never trust a stamp in the future
        waited = (now - since).total_seconds()
        tries = msg.deferrals + 1
        budget = self.mail.smtp_defer_max_s
        if waited >= budget:
            return PermanentError(f"{exc} (deferred for {_duration(waited)}, {tries} tries: "
                                  f"gave up after SMTP_DEFER_MAX_S={budget})")
        delay = min(self._defer_policy.delay_s(tries), max(1, math.ceil(budget - waited)))
        stamp: dict[str, Any] = {"deferred_since": since.isoformat(), "deferrals": tries}
        if not msg.idempotency_key:
            stamp["idempotency_key"] = key  # the requeued mail is the same mail to the ledger
        return Deferred(f"{exc} (deferred for {_duration(waited)}, try {tries}; next in "
                        f"{delay}s)", delay, stamp=stamp)

    async def _record(self, query: LiteralString, params: dict[str, Any]) -> None:
        """Write the verdict of a send; retried, so a database blip right after a send
        does not turn a known outcome into an unknown one. One quick statement: it
        goes on a trio-native connection (`Database.fetch`), without a thread hop."""
        delay = 0.2
        deadline = trio.current_time() + LEDGER_RETRY_S
        while True:
            try:
                await self.db.fetch(query, params)
                return
            except (DatabaseUnavailable, psycopg.Error):
                if trio.current_time() + delay > deadline:
                    raise
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _record_sent(self, key: str, message_id: str) -> None:
        """Write a 'sent' verdict together with the others waiting at this moment
        (engine.batching.GroupCommit): no added delay, and under load one round trip
        and one commit for many mails. A 'sent' verdict is true once the server has
        accepted the mail, so rewriting it (a writer cut off hands its batch on) is
        harmless, and the ledger still learns that those mails went out."""
        await self._sent_verdicts.submit((key, message_id))

    async def _write_sent(self, verdicts: Sequence[tuple[str, str]]) -> None:
        await self._record(queries.EMAIL_SENT_MANY, {
            "keys": [key for key, _ in verdicts],
            "message_ids": [message_id for _, message_id in verdicts]})

    def dead_letter_stamp(self, delivery: Message) -> dict[str, Any]:
        """A mail queued without a key keeps the one it was tried under: replaying it
        is then the same mail for the ledger (never a second, blind send)."""
        body = delivery.body
        stamp: dict[str, Any] = {}
        if isinstance(body, dict) and not body.get("idempotency_key"):
            stamp["idempotency_key"] = unkeyed_ledger_key(delivery)
        if isinstance(body, dict) and body.get("deferred_since") is not None:
            # A replay is a fresh try: a new deferral budget (the reason keeps the old one).
            stamp |= {"deferred_since": None, "deferrals": 0}
        return stamp

    async def _profile_locale(self, address: str) -> str | None:
        row = await self.db.run(
            lambda c: c.execute(queries.PROFILE_LOCALE_BY_EMAIL, {"email": address}).fetchone())
        return str(row[0]) if row else None

    async def _attachment(self, ref: AttachmentRef) -> Attachment:
        base = await trio.Path(self.mail.reports_dir).resolve()
        path = await (base / ref.path).resolve()
        if not path.is_relative_to(base):
            raise PermanentError(f"attachment {ref.path!r} is outside REPORTS_DIR")
        try:
            content = await trio.Path(path).read_bytes()
        except FileNotFoundError:
            raise PermanentError(f"attachment {ref.path!r} does not exist") from None
        return Attachment(ref.name, content, ref.content_type)


def _duration(seconds: float) -> str:
    """`45s`, `12m 5s`, `3h 20m`: how long a mail has been deferred, for its reason."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60}s"
    return f"{whole // 3600}h {whole % 3600 // 60}m"


def unkeyed_ledger_key(delivery: Message) -> str:
    """The ledger key of a mail queued without one: the message's identity.

    pgmq msg ids start again at 1 when a queue is dropped and recreated, so the
    key carries the enqueue time too (microseconds): an old ledger row can never
    make a new mail look sent.
    """
    micros = int(delivery.enqueued_at.timestamp() * 1_000_000)
    return f"{delivery.queue}:{delivery.msg_id}:{micros}"


def verdict_bound_s(mail: MailSettings) -> float:
    """How long after its claim a live holder of a ledger key has surely written its
    verdict: its conversation's bound (shielded; every command has SMTP_TIMEOUT_S), the
    ledger write's retries, and a margin for the group commit. A row still 'sending'
    after that is truly unknown (`reactor email stuck` shows those)."""
    return LEDGER_RETRY_S + SMTP_COMMANDS_PER_MAIL * mail.smtp_timeout_s + VERDICT_MARGIN_S


@dataclass(frozen=True)
class Holder:
    """The delivery that holds a ledger key: its status, its claim, and how long ago."""

    status: str
    claimed_at: datetime
    msg_id: int
    age_s: float


async def claim(db: Database, key: str, job: Job[EmailMessage],
                msg: EmailMessage) -> Holder | None:
    """Claim the ledger key; None if ours to send, else who holds it.

    One autocommit statement on a trio-native connection (`Database.fetch`): the
    claim costs one round trip to Postgres and no thread hop.

    Raises:
        RetryableError: another delivery of the same key committed its claim while
            this one ran (two at once); the next attempt sees which.
    """
    # Its answer is awaited even if the job is cancelled meanwhile (shutdown, its deadline):
    # a cancel that came after the server committed the claim, before we read the answer,
    # would leave 'sending' for a mail never sent, which waits out the verdict bound and
    # then asks a person. Bounded (CLAIM_BOUND_S): a claim stuck on the database is cut,
    # and retried, and delays a shutdown that long at most.
    rows = await db.fetch(queries.CLAIM_EMAIL, {
        "key": key, "queue": job.delivery.queue, "msg_id": job.msg_id,
        "enqueued_at": job.delivery.enqueued_at, "recipient": msg.to,
        "template": msg.template}, finish_within_s=CLAIM_BOUND_S)
    if not rows:
        raise RetryableError(f"ledger key {key} was claimed by another delivery at the "
                             "same moment; retrying to see its outcome")
    status, claimed_at, msg_id, age_s = rows[0]
    if status is None:
        return None
    return Holder(str(status), claimed_at, int(msg_id), float(age_s))
