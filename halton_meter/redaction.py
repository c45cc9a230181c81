"""Secrets never stored: what is removed from anything halton-meter writes down.

Query strings of request targets (`redact_target`); captured headers and bodies (`redact_headers`,
`redact_text`): provider keys, tokens, private keys, URL credentials and name=value secrets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

REDACTED = "REDACTED"
# Query parameter names that carry credentials, compared case-insensitively.
_SECRET_PARAMS = frozenset({
    "key", "api_key", "apikey", "api-key", "access_token", "token", "auth", "authorization",
    "client_secret", "secret", "password", "sig", "signature", "x-goog-api-key",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
})
_PARAM = re.compile(r"([^&=]*)(=?)([^&]*)")

# Every category redact_text and redact_headers count, in the order counts are reported: HTTP
# credentials, keys by who issues them, generic token formats, then secrets known by context.
CATEGORIES: tuple[str, ...] = (
    "auth_header", "bearer_token",
    "anthropic_key", "openai_key", "openrouter_key", "google_key", "xai_key", "groq_key",
    "huggingface_token", "aws_access_key", "aws_secret_key", "github_token", "slack_token",
    "stripe_key", "jwt", "private_key",
    "url_credentials", "password_assignment", "secret_assignment",
)
_CATEGORY_SET = frozenset(CATEGORIES)

# Headers whose whole value is a credential (lower case). Organisation and project headers
# (openai-organization, x-halton-project) name an account but grant nothing, so they are kept.
_CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "x-goog-api-key", "api-key", "cookie",
    "set-cookie", "x-amz-security-token",
})


def redact_target(target: str) -> str:
    """The request target with the values of credential-carrying query parameters replaced."""
    path, question, query = target.partition("?")
    if not question:
        return target
    return f"{path}?{_PARAM.sub(_redact_param, query)}"


def redact_text(text: str) -> tuple[str, dict[str, int]]:
    """`text` with every secret replaced by `[REDACTED:<category>]`, and how many of each category
    were replaced (only categories with a count > 0 appear)."""
    counts: dict[str, int] = {}

    def replace(match: re.Match) -> str:
        return _replacement(match, counts, replace)

    redacted = _SECRETS.sub(replace, text)
    return redacted, merge_counts(counts) if counts else {}


def redact_headers(headers: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Header (name, value) pairs, names kept as given, values of credential headers replaced by
    `[REDACTED:auth_header]`; other header values still go through redact_text (a key pasted into
    a custom header is still caught)."""
    kept: list[tuple[str, str]] = []
    counts: list[dict[str, int]] = []
    for name, value in headers:
        if name.strip().lower() in _CREDENTIAL_HEADERS and value and not _is_redacted(value):
            kept.append((name, _marker("auth_header")))
            counts.append({"auth_header": 1})
        else:
            value, found = redact_text(value)
            kept.append((name, value))
            if found:
                counts.append(found)
    return kept, merge_counts(*counts) if counts else {}


def merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    """The per-category sums of `counts`, in CATEGORIES order (unknown categories after, as first
    seen), keeping only categories with a count > 0."""
    total: dict[str, int] = {}
    for found in counts:
        for category, count in found.items():
            total[category] = total.get(category, 0) + count
    known = [category for category in CATEGORIES if category in total]
    unknown = [category for category in total if category not in _CATEGORY_SET]
    return {category: total[category] for category in known + unknown if total[category] > 0}


def _redact_param(match: re.Match) -> str:
    name, equals, value = match.groups()
    if equals and value and name.lower() in _SECRET_PARAMS:
        return f"{name}={REDACTED}"
    return match.group(0)



class _Rule(NamedTuple):
    """One shape of secret. `pattern` starts with two plain characters (the second may be a
    `[…]` class) and `left` is the context required before them (see _compile); a group
    `(?P<value>…)` marks the part replaced, otherwise the whole match is."""
    category: str
    pattern: str
    left: str = ""
    is_assignment: bool = False    # a name=value: placeholders such as `os.environ[` are kept
    value_shape: re.Pattern | None = None   # the value must also fullmatch this to count


# Left contexts, checked after a rule's first two characters (hence the `..`). A key starts a
# word: not after a letter, digit, `_` or `-` (so not inside base64url data), except that a JSON
# escape (`\n`) or a URL escape (`%20`) right before it separates. A name may follow `_`, `-`
# or `.` (DB_PASSWORD, --api-key, self.token); a capitalised one may also follow a lower-case
# letter (dbPassword, clientSecret).
_ESCAPED = r"(?<=\\[nrt]..)|(?<=%[0-9A-Fa-f]{2}..)"
_KEY_START = rf"(?:(?<![A-Za-z0-9_-]..)|{_ESCAPED})"
_NAME_START = rf"(?:(?<![A-Za-z0-9]..)|{_ESCAPED})"
_CAMEL_START = rf"(?:(?<![A-Za-z0-9]..)|{_ESCAPED}|(?<=[a-z0-9]..))"

# Between a name and its value: the name's closing quote (also `\"`, JSON inside a JSON string),
# then `=`, `:`, `=>` or `:=`, or a type annotation before `=` (`api_key: str | None = None`).
_SEPARATOR = (
    r"""(?:\\?["'])?[ \t]{0,8}+"""
    r"""(?:=>|:=|:[ \t]*[A-Za-z_][\w.\[\], |]{0,40}?[ \t]+=(?!=)|:(?![:/=])|=(?!=))[ \t]{0,8}+"""
)
# A value: quoted, up to its closing quote with backslash escapes honoured (or up to the end of
# the text: a body cut at the capture limit must not leak half a password); unquoted, up to
# whitespace, a quote, a backtick, `&`, `,`, `;` or a backslash (a JSON `\n`), and never a
# `{…}` or `[…]` structure (a JSON schema's `"password": {"type": …}`) nor a PEM block, which
# has spaces in it and is left to its own rule.
_VALUE = (
    r"""(?P<value>"[^"\\\n]*+(?:\\.[^"\\\n]*+)*+(?:"|\Z)"""
    r"""|'[^'\\\n]*+(?:\\.[^'\\\n]*+)*+(?:'|\Z)"""
    r"""|\\"[^"\\\n]*+(?:\\[^"\n][^"\\\n]*+)*+(?:\\"|\Z)"""
    r"""|(?!-----)[^\s"'`&,;\\{\[][^\s"'`&,;\\]*+)"""
)
# A bare `token` is also the logprobs field of OpenAI responses (`{"token": " Hello", …}`), so
# its value counts only if it looks like a credential: 16+ URL-safe characters with a digit.
_CREDENTIAL_LIKE = re.compile(r"(?=[^0-9]*+[0-9])[A-Za-z0-9._~+/=-]{16,}+")


def _cased(category: str, name: str, tail: str, lower_left: str = _NAME_START,
           upper_left: str = _CAMEL_START, **options) -> list[_Rule]:
    """`name` (a case-insensitive pattern starting with two letters) then `tail`, as one rule per
    case of the first letter (password, Password, PASSWORD): a rule starts with a literal."""
    first, second, rest = name[0], name[1], name[2:]
    return [_Rule(category, f"{letter}[{second.lower()}{second.upper()}](?i:{rest}){tail}", left,
                  **options)
            for letter, left in ((first.lower(), lower_left), (first.upper(), upper_left))]


def _assignments(category: str, *names: str, **options) -> list[_Rule]:
    return [rule for name in names
            for rule in _cased(category, name, _SEPARATOR + _VALUE, is_assignment=True, **options)]


# Ordered: at one position the first rule that matches wins, so specific shapes come before
# the generic ones they overlap (sk-ant- before sk-, aws_secret_access_key before secret).
_SHAPE_RULES: list[_Rule] = [
    # PEM blocks (openssl, ssh-keygen, gpg --armor). The body holds base64, RFC 1421 headers
    # (Proc-Type: 4,ENCRYPTED) and line breaks, raw or JSON-escaped, and is bounded: a missing
    # END stops at the first other character, never eating the text after it. A block cut off
    # by the capture limit still counts.
    _Rule("private_key",
          r"-----BEGIN[A-Z ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
          r"(?:[A-Za-z0-9+/=\s\\:,]|-(?!----)){1,16384}+"
          r"(?:-----END[A-Z ]{0,40}PRIVATE KEY(?: BLOCK)?-----|\Z)"),
    # RFC 7519: base64url header (always `{"…`, so eyJ), payload, signature.
    _Rule("jwt", r"eyJ[A-Za-z0-9_-]{7,}+\.[A-Za-z0-9_-]{10,}+\.[A-Za-z0-9_-]{10,}+", _KEY_START),
    # Anthropic console keys sk-ant-api03-…, admin keys sk-ant-admin01-…, OAuth sk-ant-oat01-….
    _Rule("anthropic_key", r"sk-ant-[A-Za-z0-9_-]{20,}+", _KEY_START),
    # OpenRouter: sk-or-v1- and 64 hex digits.
    _Rule("openrouter_key", r"sk-or-v[0-9]+-[0-9a-f]{32,}+", _KEY_START),
    # OpenAI: project, service-account and admin keys, the classic sk- + 48, then any other
    # sk- + 20 that holds a digit (which "sk-learn-compatible-estimators" does not).
    _Rule("openai_key", r"sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}+", _KEY_START),
    _Rule("openai_key", r"sk-[A-Za-z0-9]{48}(?![A-Za-z0-9_-])", _KEY_START),
    _Rule("openai_key", r"sk-(?=[A-Za-z_-]*+[0-9])[A-Za-z0-9_-]{20,}+", _KEY_START),
    # Stripe secret and restricted keys (publishable pk_ keys are public by design).
    _Rule("stripe_key", r"sk_(?:live|test)_[A-Za-z0-9]{16,}+", _KEY_START),
    _Rule("stripe_key", r"rk_(?:live|test)_[A-Za-z0-9]{16,}+", _KEY_START),
    # Google API keys (Gemini, Maps…): AIza + 35, 39 characters in all.
    _Rule("google_key", r"AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])", _KEY_START),
    # AWS access key ids: AKIA long-term, ASIA from STS, ABIA and ACCA other partitions.
    _Rule("aws_access_key", r"A[KSB]IA[A-Z0-9]{16}(?![A-Za-z0-9])", _KEY_START),
    _Rule("aws_access_key", r"ACCA[A-Z0-9]{16}(?![A-Za-z0-9])", _KEY_START),
    _Rule("xai_key", r"xai-[A-Za-z0-9]{20,}+", _KEY_START),
    _Rule("groq_key", r"gsk_[A-Za-z0-9]{20,}+", _KEY_START),
    _Rule("huggingface_token", r"hf_[A-Za-z0-9]{30,}+", _KEY_START),
    # GitHub personal, OAuth, user-to-server, server-to-server and refresh tokens; fine-grained PATs.
    _Rule("github_token", r"gh[pousr]_[A-Za-z0-9]{36,}+", _KEY_START),
    _Rule("github_token", r"github_pat_[A-Za-z0-9_]{22,}+", _KEY_START),
    # Slack bot, user, app-level, refresh and legacy tokens, and incoming-webhook URLs (the URL
    # is the credential; `\/` is how JSON may escape its slashes).
    _Rule("slack_token", r"xox[bpars]-[A-Za-z0-9-]{10,}+", _KEY_START),
    _Rule("slack_token", r"xapp-[A-Za-z0-9-]{10,}+", _KEY_START),
    _Rule("slack_token",
          r"https:(?:\\?/){2}hooks\.slack\.com(?:\\?/)services(?:\\?/)T[A-Z0-9]{6,}+(?:\\?/)"
          r"B[A-Z0-9]{6,}+(?:\\?/)[A-Za-z0-9]{16,}+"),
]

_CONTEXT_RULES: list[_Rule] = [
    # RFC 6750 b64token after the scheme; a digit is required so that prose ("Bearer
    # responsibilities", "Bearer YOUR_TOKEN_HERE") is left alone.
    *_cased("bearer_token", "bearer",
            r"[ \t]+(?P<value>(?=[A-Za-z._~+/-]*+[0-9])[A-Za-z0-9._~+/-]{16,}+=*+)",
            upper_left=_NAME_START),
    # An `Authorization: Basic …` header pasted into text (curl -v output, a reproduction).
    *_cased("auth_header", "authorization",
            _SEPARATOR + r"""\\?["']?(?i:basic)[ \t]+(?P<value>[A-Za-z0-9+/]{4,}+=*+)"""),
    # RFC 3986 userinfo: scheme://user:password@host (the user may be empty: redis://:pw@host).
    _Rule("url_credentials",
          r"""://(?<=[A-Za-z0-9+.-]://)[^\s:/?#@"'\\]{0,256}+:(?P<value>[^\s/?#@"'\\]{1,256}+)@"""),
    # The AWS secret key has no prefix of its own; it is known by the name it is given.
    *[rule for name in ("aws[_-]?secret[_-]?access[_-]?key", "secret[_-]?access[_-]?key")
      for rule in _cased("aws_secret_key", name, _SEPARATOR
                         + r"""\\?["']?(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])""")],
    *_assignments("password_assignment", "pass(?:word|wd|phrase)", "pwd"),
    *_assignments("secret_assignment", "secret(?:[_-]?(?:access[_-]?)?key)?", "private[_-]?key",
                  "api[_-]?(?:key|token)", "access[_-]?token", "auth[_-]?token",
                  "refresh[_-]?token", "session[_-]?token", "id[_-]?token", "bearer[_-]?token",
                  "bot[_-]?token"),
    # `token` alone: a whole word (not max_tokens, token_count, next_token, nextToken) except in
    # the env-file style FOO_TOKEN=…, and only with a credential-like value.
    *_assignments("secret_assignment", "token", value_shape=_CREDENTIAL_LIKE,
                  lower_left=rf"(?:(?<![A-Za-z0-9_-]..)|{_ESCAPED})",
                  upper_left=rf"(?:(?<![A-Za-z0-9-]..)|{_ESCAPED})"),
]

# Values of an assignment that say where a secret comes from rather than being one: a type or
# a null (`password: str`, `pwd=None):`), an environment or attribute reference (`$API_KEY`,
# `self.password`), a call or subscript (`os.environ[`), a template slot or a mask. Code sent
# to a model is full of them; redacting them would report secrets that are not there.
_PLACEHOLDER = re.compile(
    r"(?:None|null|nil|true|false|True|False|undefined|str|string|bytes|int|bool|SecretStr"
    r"|Optional\[[\w.\[\], |]*)[)\]},:;]*"
    r"|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|%[A-Za-z_][A-Za-z0-9_]*%"
    r"|(?:process\.env|self|cls|this|settings|config)\.[\w.]+"
    r"|[A-Za-z_][\w.]*[(\[].*"
    r"|<[^<>]*>|\*+|\.\.\.|…"
)
# Whitespace, raw or as JSON escapes, around a value that is a key shape (`"-----BEGIN …\n"`).
_SPACING = re.compile(r"(?:\s|\\[nrt])*+")
# A rule's first two characters: a literal, then a literal or a class.
_HEAD = re.compile(r"[^\\()\[\]{}.*+?|^$](?:[^\\()\[\]{}.*+?|^$]|\[[^\]\\]+\])")


def _compile(rules: list[_Rule]) -> re.Pattern:
    """One alternation over `rules`, each branch tagged with an empty group `rule<i>` so that
    `match.lastgroup` names the rule that matched.

    CPython's engine skips straight to candidate positions only when every top-level branch
    starts with a literal, and rejects a branch without running it when its first item is a
    literal or class that differs. So rules are grouped under their first character, and the
    left context (a lookbehind, dearer) goes after the second: a 512 KiB chat body takes about
    15 ms, against over 100 ms for a plain alternation of named groups. Order within a group
    is kept.
    """
    by_first: dict[str, list[str]] = {}
    for index, rule in enumerate(rules):
        head = _HEAD.match(rule.pattern)
        if head is None:
            raise ValueError(f"rule {index} ({rule.category}) must start with two plain characters")
        head_length = head.end() if rule.left else 1
        rest = rule.pattern[head_length:].replace("(?P<value>", f"(?P<value{index}>")
        by_first.setdefault(rule.pattern[0], []).append(
            f"{rule.pattern[1:head_length]}{rule.left}{rest}(?P<rule{index}>)")
    return re.compile("|".join(f"{re.escape(first)}(?:{'|'.join(branches)})"
                               for first, branches in by_first.items()))


_RULES = _SHAPE_RULES + _CONTEXT_RULES
_SECRETS = _compile(_RULES)
_SHAPES = _compile(_SHAPE_RULES)
# The value group of each rule, or None where the whole match is the secret.
_VALUE_GROUPS = [f"value{index}" if "(?P<value>" in rule.pattern else None
                 for index, rule in enumerate(_RULES)]


def _replacement(match: re.Match, counts: dict[str, int],
                 replace: Callable[[re.Match], str]) -> str:
    """What replaces one match of _SECRETS, counted in `counts`; `replace` is redact_text's own
    callback, for rescanning parts of the match that are not the secret."""
    index = int(match.lastgroup[4:])
    rule, group = _RULES[index], _VALUE_GROUPS[index]
    if group is None:
        counts[rule.category] = counts.get(rule.category, 0) + 1
        return _marker(rule.category)
    whole, offset = match.group(0), match.start()
    start, end = match.start(group) - offset, match.end(group) - offset
    before, value, after = whole[:start], whole[start:end], whole[end:]
    if rule.category == "url_credentials":
        # The user can be a token itself: https://ghp_…:x-oauth-basic@github.com.
        before = _SECRETS.sub(replace, before)
    opening, closing = _quote_lengths(value) if rule.is_assignment else (0, 0)
    secret = value[opening:len(value) - closing]
    if (not secret or _is_redacted(secret)
            or (rule.is_assignment and _PLACEHOLDER.fullmatch(secret))
            or (rule.value_shape is not None and not rule.value_shape.fullmatch(secret))):
        # Not a secret itself, but it may hold one ("token": "mine is sk-ant-…").
        return before + _SECRETS.sub(replace, value) + after
    category = _shape_category(secret) or rule.category
    counts[category] = counts.get(category, 0) + 1
    return before + value[:opening] + _marker(category) + value[len(value) - closing:] + after


def _shape_category(secret: str) -> str | None:
    """The category of the key shape `secret` is, give or take surrounding whitespace: a key
    given a generic name still counts as the key it is."""
    start = _SPACING.match(secret).end()
    shape = _SHAPES.match(secret, start)
    if shape is None or not _SPACING.fullmatch(secret, shape.end()):
        return None
    return _SHAPE_RULES[int(shape.lastgroup[4:])].category


def _quote_lengths(value: str) -> tuple[int, int]:
    """How many characters of `value` are its opening and closing quote."""
    for quote in ('\\"', '"', "'"):
        if value.startswith(quote):
            closed = len(value) >= 2 * len(quote) and value.endswith(quote)
            return len(quote), len(quote) if closed else 0
    return 0, 0


def _is_redacted(value: str) -> bool:
    return value.startswith("[REDACTED:") or value == REDACTED


def _marker(category: str) -> str:
    return f"[REDACTED:{category}]"
