"""Secrets and personal data in training text: found, masked for the report, or replaced by placeholders.

A fine-tuned model learns its replies word for word, so a key, password or address left in the data
can come back out of it. `find` looks for secrets (private key blocks, AWS, GCP, GitHub, Slack and
OpenAI-style keys and tokens, JWTs, passwords in URLs) and personal data (e-mail addresses, phone
numbers, card numbers that pass the Luhn check, IBANs that pass their mod-97 check, public IPv4
addresses). Each pattern is anchored on what the real thing has and a look-alike lacks (a key's
prefix, a checksum, word boundaries that a hex hash or UUID does not give), so code and prose read
clean. `mask` gives a sample that names the kind without the value; `redact` puts a typed
placeholder (`<EMAIL>`, `<API_KEY>`) in place of each hit.

The detectors are regular expressions with checksums: detect-secrets covers only the secrets, reports
values rather than their places, and would be one more dependency for a dozen patterns.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from .schema import Conversation, Document, Message, Preference, Record

MODES = ("warn", "refuse", "redact", "off")
SECRET, PERSONAL = "secret", "personal data"

# Domains reserved for examples and tests (RFC 2606, RFC 6761): no one's address can be at one.
_RESERVED_DOMAIN = re.compile(r"(?:^|\.)(?:example\.(?:com|org|net)|example|test|invalid|localhost)$", re.I)
# Values that stand for a password in documentation rather than being one (scott:tiger is SQL's sample login).
_PLACEHOLDER_PASSWORD = re.compile(
    r"^(?:pass(?:word|wd)?|pwd|secret|changeme|tiger|token|.{1,2}|x+|\*+|[$<{%].*)$", re.I
)
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|3[0689]|6(?:011|5|4[4-9])|35)")


@dataclass(frozen=True)
class Kind:
    name: str
    category: str
    placeholder: str
    pattern: re.Pattern
    valid: Callable[[str], bool] | None = None
    group: int = 0  # the part of the match that is the secret (a URL's password, not the URL)
    not_after: re.Pattern | None = None  # text just before a match that makes it a look-alike
    needs: tuple[str, ...] = ()  # text without any of these cannot match: the pattern is not run on it


@dataclass(frozen=True)
class Hit:
    kind: Kind
    start: int
    end: int
    text: str

    @property
    def sample(self) -> str:
        return mask(self.kind.name, self.text)


def _luhn(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19 or not _CARD_PREFIX.match("".join(map(str, digits))):
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _email(text: str) -> bool:
    local, _, domain = text.rpartition("@")
    return local.lower() != "git" and not _RESERVED_DOMAIN.search(domain)


def _phone(text: str) -> bool:
    return 8 <= sum(c.isdigit() for c in text) <= 15


def _public_ipv4(text: str) -> bool:
    parts = text.split(".")
    if any(len(p) > 1 and p[0] == "0" for p in parts) or all(int(p) < 32 for p in parts):
        return False  # leading zeros are no address; four small parts read as a version or section (2.4.8.19)
    return ipaddress.ip_address(text).is_global


def _url_password(text: str) -> bool:
    return not _PLACEHOLDER_PASSWORD.match(text)


def _any_digit(text: str) -> bool:
    return any(c.isdigit() for c in text) and any(c.isalpha() for c in text)


_DIGITS = tuple("0123456789")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
KINDS: tuple[Kind, ...] = (
    # Secrets first: where patterns overlap (a URL's password before an address), the earlier kind wins.
    Kind(
        "private_key",
        SECRET,
        "<PRIVATE_KEY>",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
            r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
            re.S,
        ),
        needs=("PRIVATE KEY",),
    ),
    Kind(
        "aws_access_key",
        SECRET,
        "<API_KEY>",
        re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b"),
        needs=("AKIA", "ASIA", "ABIA", "ACCA"),
    ),
    Kind(
        "aws_secret_key",
        SECRET,
        "<API_KEY>",
        re.compile(r"(?i:aws_?secret_?(?:access_?)?key)[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"),
        group=1,
        needs=("ecret", "ECRET"),
    ),
    Kind("gcp_api_key", SECRET, "<API_KEY>", re.compile(r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"), needs=("AIza",)),
    Kind(
        "github_token",
        SECRET,
        "<API_KEY>",
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
        needs=("gh", "github_pat_"),
    ),
    Kind(
        "slack_token",
        SECRET,
        "<API_KEY>",
        re.compile(
            r"\bxox[abposr]-[A-Za-z0-9-]{10,}|https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+"
        ),
        needs=("xox", "hooks.slack.com"),
    ),
    Kind(
        "openai_key",
        SECRET,
        "<API_KEY>",
        re.compile(r"\bsk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{32,}(?![A-Za-z0-9_-])"),
        _any_digit,
        needs=("sk-",),
    ),
    Kind(
        "jwt",
        SECRET,
        "<TOKEN>",
        re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
        needs=("eyJ",),
    ),
    Kind(
        "url_password",
        SECRET,
        "<PASSWORD>",
        # The user may be empty (redis://:PASSWORD@host) and the password holds every character of a URL's
        # user information after the first ':', another ':' included (RFC 3986).
        re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:([^\s/@]+)@[^\s/@]"),
        _url_password,
        group=1,
        needs=("://",),
    ),
    Kind(
        "email",
        PERSONAL,
        "<EMAIL>",
        # A local part holds at most 64 characters, a domain at most 127 labels of 63 (RFC 5321, RFC 1035):
        # bounded, a long run of such characters around an @ (a blob, minified code) is not read again from
        # each of its characters.
        re.compile(
            r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63}){0,126}"
            r"\.[A-Za-z]{2,63}\b"
        ),
        _email,
        needs=("@",),
    ),
    Kind(
        "credit_card",
        PERSONAL,
        "<CARD_NUMBER>",
        # 15 or 16 digits as one run, or in the groups cards print them in (4-4-4-4, Amex's 4-6-5): longer or
        # shorter runs of digits are numbers in code and tables, and so are digits next to letters, operators
        # or brackets (a seed, a constant, a hex string).
        re.compile(
            r"(?<![\w.*/(+-])(?:\d{15,16}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}|\d{4}([ -])\d{6}\2\d{5})"
            r"(?![\w*/)]|[.-]\d)"
        ),
        _luhn,
        needs=_DIGITS,
    ),
    Kind(
        "iban",
        PERSONAL,
        "<IBAN>",
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
        _iban,
        needs=_DIGITS,
    ),
    Kind(
        "phone",
        PERSONAL,
        "<PHONE>",
        re.compile(
            r"(?<![\w.+-])(?:\+\d{8,15}|\+\d{1,3}(?:[ .-]|(?=\())(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,8}){1,4}"
            r"|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}([.-])\d{3}\1\d{4})(?![\w.-]?\d)"
        ),
        _phone,
        needs=_DIGITS,
    ),
    Kind(
        "ipv4",
        PERSONAL,
        "<IP_ADDRESS>",
        re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w-]|\.\d)"),
        _public_ipv4,
        # A version number: `v4.19.128.1`, `version 4.19.128.1`, `build: ...`, `torch==2.4.0.1`.
        not_after=re.compile(r"(?:\b(?:v|ver|version|build|release)\s*[:=]?\s*|[=<>~!]=\s*|[<>]\s*)$", re.I),
        needs=(".",),
    ),
)
KIND_NAMES = tuple(kind.name for kind in KINDS)


def find(text: str) -> list[Hit]:
    """Every secret and piece of personal data in `text`, in order; where matches overlap, the kind listed
    first in KINDS keeps its span."""
    hits: list[Hit] = []
    spans: list[tuple[int, int]] = []  # the kept hits' spans in order: they never overlap, so ends are in order too
    for kind in KINDS:
        if kind.needs and not any(needed in text for needed in kind.needs):
            continue
        for match in kind.pattern.finditer(text):
            start, end = match.span(kind.group)
            value = match.group(kind.group)
            if kind.valid and not kind.valid(value):
                continue
            if kind.not_after and kind.not_after.search(text, max(0, start - 16), start):
                continue
            at = bisect.bisect_right(spans, (start, end))
            if (at and spans[at - 1][1] > start) or (at < len(spans) and spans[at][0] < end):
                continue
            spans.insert(at, (start, end))
            hits.append(Hit(kind, start, end, value))
    return sorted(hits, key=lambda h: h.start)


def redact(text: str, hits: list[Hit] | None = None) -> str:
    """`text` with each hit replaced by its kind's placeholder."""
    out, at = [], 0
    for hit in find(text) if hits is None else hits:
        out += [text[at : hit.start], hit.kind.placeholder]
        at = hit.end
    return "".join(out) + text[at:]


def mask(kind: str, value: str) -> str:
    """A sample that says what was found without what it is: `j***@e***.com`, `AKIA***`, `***1111`."""
    if kind == "email":
        local, _, domain = value.rpartition("@")
        name, dot, tld = domain.rpartition(".")
        return f"{local[:1]}***@{name[:1]}***{dot}{tld}"
    if kind == "private_key":
        return value.splitlines()[0] + "***"
    if kind in ("credit_card", "phone"):
        digits = [c for c in value if c.isdigit()]
        return "***" + "".join(digits[-(4 if kind == "credit_card" else 2) :])
    if kind == "ipv4":
        return value.split(".")[0] + ".***"
    if kind == "iban":
        return value[:2] + "***"
    if kind == "url_password":
        return "***"
    return value[: min(4, len(value) // 4)] + "***"


def record_texts(record: Record, trained_roles: frozenset[str]) -> list[tuple[int | str, str, str, bool]]:
    """(where, attribute, text, whether it is trained) for each text of a record: where is a message's
    index (in the conversation, or the preference's prompt then chosen then rejected) or `text`."""
    if isinstance(record, Document):
        return [("text", "text", record.text, True)]
    messages = record.messages if isinstance(record, Conversation) else [*record.prompt, record.chosen, record.rejected]
    replies = len(record.prompt) if isinstance(record, Preference) else None
    texts = []
    for i, message in enumerate(messages):
        trained = message.role in trained_roles or (replies is not None and i >= replies)
        for attribute in ("content", "reasoning_content"):
            value = getattr(message, attribute)
            if value:
                texts.append((i, attribute, value, trained))
        for j, call in enumerate(message.tool_calls or []):
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, dict | list):  # arguments given as an object rather than JSON text
                arguments = json.dumps(arguments, ensure_ascii=False)
            if isinstance(arguments, str) and arguments:
                texts.append((i, f"tool_calls[{j}].function.arguments", arguments, trained))
    return texts


def redact_record(record: Record) -> Record:
    """The record with every hit in its texts (contents, reasoning, tool call arguments) replaced by its
    placeholder; the record itself where nothing is found."""
    if isinstance(record, Document):
        text = redact(record.text)
        return record if text == record.text else Document(text)
    if isinstance(record, Conversation):
        messages = [_redact_message(m) for m in record.messages]
        same = all(a is b for a, b in zip(messages, record.messages))
        return record if same else replace(record, messages=messages)
    prompt = [_redact_message(m) for m in record.prompt]
    chosen, rejected = _redact_message(record.chosen), _redact_message(record.rejected)
    if all(a is b for a, b in zip([*prompt, chosen, rejected], [*record.prompt, record.chosen, record.rejected])):
        return record
    return replace(record, prompt=prompt, chosen=chosen, rejected=rejected)


def redact_value(value):
    """A JSON value with every hit in each of its strings replaced by its placeholder (a row left out,
    written beside the rows kept)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    return value


def _redact_message(message: Message) -> Message:
    changes = {}
    for attribute in ("content", "reasoning_content"):
        value = getattr(message, attribute)
        if value and (redacted := redact(value)) != value:
            changes[attribute] = redacted
    calls = message.tool_calls
    if calls:
        new_calls = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if arguments and (redacted := redact_value(arguments)) != arguments:
                call = {**call, "function": {**function, "arguments": redacted}}
            new_calls.append(call)
        if any(a is not b for a, b in zip(new_calls, calls)):
            changes["tool_calls"] = new_calls
    return replace(message, **changes) if changes else message
