"""Secrets never reach the ledger: query strings, captured headers and bodies are redacted."""

import base64
import json
import random
import string
import time
from pathlib import Path

import pytest

from halton_meter.redaction import CATEGORIES, merge_counts, redact_headers, redact_target, redact_text

TRANSCRIPTS = Path(__file__).parent / "transcripts"
ALNUM = string.ascii_letters + string.digits
URL_SAFE = ALNUM + "-_"
UPPER_ALNUM = string.ascii_uppercase + string.digits
HEX = "0123456789abcdef"


def fake(alphabet: str, length: int, seed: int) -> str:
    """`length` made-up characters from `alphabet`: the right shape, never a real key."""
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(length))


def marker(category: str) -> str:
    return f"[REDACTED:{category}]"


@pytest.mark.parametrize("target, stored", [
    ("/v1beta/models/gemini-2.5-flash:generateContent?key=AIzaSyA-secret",
     "/v1beta/models/gemini-2.5-flash:generateContent?key=REDACTED"),
    ("/v1/x?alt=sse&KEY=abc&beta=true", "/v1/x?alt=sse&KEY=REDACTED&beta=true"),
    ("/v1/x?X-Amz-Signature=deadbeef&X-Amz-Date=2026", "/v1/x?X-Amz-Signature=REDACTED&X-Amz-Date=2026"),
    ("/v1/messages?beta=true", "/v1/messages?beta=true"),
    ("/v1/messages", "/v1/messages"),
    ("/v1/x?key=&token", "/v1/x?key=&token"),
])
def test_redact_target(target, stored):
    assert redact_target(target) == stored


# Keys recognised by their shape alone, whatever surrounds them.
PEM = ("-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(fake(ALNUM + "+/", 64, n) for n in range(6))
       + "\n" + fake(ALNUM, 20, 6) + "==\n-----END RSA PRIVATE KEY-----")
SHAPES = [
    ("anthropic_key", "sk-ant-api03-" + fake(URL_SAFE, 93, 1) + "AA"),
    ("anthropic_key", "sk-ant-admin01-" + fake(URL_SAFE, 93, 2) + "AA"),
    ("anthropic_key", "sk-ant-oat01-" + fake(URL_SAFE, 93, 3) + "AA"),
    ("openai_key", "sk-proj-" + fake(URL_SAFE, 156, 4)),
    ("openai_key", "sk-svcacct-" + fake(URL_SAFE, 156, 5)),
    ("openai_key", "sk-admin-" + fake(URL_SAFE, 156, 6)),
    ("openai_key", "sk-" + fake(ALNUM, 20, 7) + "T3BlbkFJ" + fake(ALNUM, 20, 8)),
    ("openai_key", "sk-" + fake(URL_SAFE, 32, 9)),
    ("openrouter_key", "sk-or-v1-" + fake(HEX, 64, 10)),
    ("google_key", "AIza" + fake(URL_SAFE, 35, 11)),
    ("xai_key", "xai-" + fake(ALNUM, 80, 12)),
    ("groq_key", "gsk_" + fake(ALNUM, 52, 13)),
    ("huggingface_token", "hf_" + fake(ALNUM, 34, 14)),
    ("aws_access_key", "AKIA" + fake(UPPER_ALNUM, 16, 15)),
    ("aws_access_key", "ASIA" + fake(UPPER_ALNUM, 16, 16)),
    ("github_token", "ghp_" + fake(ALNUM, 36, 17)),
    ("github_token", "gho_" + fake(ALNUM, 36, 18)),
    ("github_token", "ghs_" + fake(ALNUM, 36, 19)),
    ("github_token", "github_pat_" + fake(ALNUM, 22, 20) + "_" + fake(ALNUM, 59, 21)),
    ("slack_token", "xoxb-" + fake(string.digits, 12, 22) + "-" + fake(string.digits, 13, 23) + "-"
     + fake(ALNUM, 24, 24)),
    ("slack_token", "xapp-1-A" + fake(UPPER_ALNUM, 10, 25) + "-" + fake(string.digits, 13, 26) + "-"
     + fake(HEX, 64, 27)),
    ("slack_token", "https://hooks.slack.com/services/T" + fake(UPPER_ALNUM, 8, 28) + "/B"
     + fake(UPPER_ALNUM, 10, 29) + "/" + fake(ALNUM, 24, 30)),
    ("stripe_key", "sk_live_" + fake(ALNUM, 99, 31)),
    ("stripe_key", "rk_live_" + fake(ALNUM, 99, 32)),
    ("stripe_key", "sk_test_" + fake(ALNUM, 24, 33)),
    ("jwt", "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwiaWF0IjoxNzAwMDAwMDAwfQ."
     + fake(URL_SAFE, 43, 34)),
    ("private_key", PEM),
    ("private_key", PEM.replace("RSA PRIVATE KEY", "OPENSSH PRIVATE KEY")),
]
# Each builds the text around a key and the same text with `[REDACTED:…]` in its place. The
# env, curl and Python lines name the key generically: the specific shape still wins.
SHAPE_CONTEXTS = {
    "prose": lambda key: f"Here is the key {key} for production, keep it safe.",
    "json": lambda key: json.dumps({"role": "user", "content": f"my key is {key}\nthanks"}),
    "json line start": lambda key: json.dumps({"content": f"keys:\n{key}\nend"}),
    "env": lambda key: f"# service\nMY_SERVICE_API_KEY={key}\nDEBUG=1\n",
    "curl": lambda key: f"curl https://api.example.com/v1/x -H \"x-api-key: {key}\" -d '{{}}'",
    "python": lambda key: f'client = Client(api_key="{key}", timeout=30)\n',
}


@pytest.mark.parametrize("context", SHAPE_CONTEXTS)
@pytest.mark.parametrize("category, key", SHAPES, ids=[f"{c}-{k[:12]}" for c, k in SHAPES])
def test_key_shapes_are_redacted_in_every_context(category, key, context):
    build = SHAPE_CONTEXTS[context]
    redacted, counts = redact_text(build(key))
    assert key not in redacted and json.dumps(key)[1:-1] not in redacted
    assert redacted == build(marker(category))
    assert counts == {category: 1}


# Secrets known only by their context: (category, text, the same text redacted).
SECRET = "c0rrect-h0rse_Battery"
OPAQUE = "ya29.a0AfH6SMB" + fake(URL_SAFE, 40, 40)
AWS_SECRET = fake(ALNUM + "/+", 40, 41)
CONTEXTUAL = [
    ("bearer_token", f"Authorization: Bearer {OPAQUE}\r\n", "Authorization: Bearer {m}\r\n"),
    ("bearer_token", f"curl -H 'Authorization: Bearer {OPAQUE}' https://x.test/",
     "curl -H 'Authorization: Bearer {m}' https://x.test/"),
    ("bearer_token", f'{{"headers": {{"authorization": "bearer {OPAQUE}"}}}}',
     '{{"headers": {{"authorization": "bearer {m}"}}}}'),
    ("auth_header", "Authorization: Basic dXNlcjpodW50ZXIy\n", "Authorization: Basic {m}\n"),
    ("url_credentials", f"DATABASE_URL=postgres://app:{SECRET}@db.internal:5432/app",
     "DATABASE_URL=postgres://app:{m}@db.internal:5432/app"),
    ("url_credentials", f"redis://:{SECRET}@cache:6379/0", "redis://:{m}@cache:6379/0"),
    ("url_credentials", json.dumps({"url": f"https://bob:{SECRET}@example.com/x"}),
     '{{"url": "https://bob:{m}@example.com/x"}}'),
    ("aws_secret_key", f"aws_secret_access_key = {AWS_SECRET}\n", "aws_secret_access_key = {m}\n"),
    ("aws_secret_key", f"export AWS_SECRET_ACCESS_KEY={AWS_SECRET}", "export AWS_SECRET_ACCESS_KEY={m}"),
    ("aws_secret_key", json.dumps({"Credentials": {"SecretAccessKey": AWS_SECRET}}),
     '{{"Credentials": {{"SecretAccessKey": "{m}"}}}}'),
    ("aws_secret_key", f"secret_access_key: '{AWS_SECRET}'", "secret_access_key: '{m}'"),
    ("password_assignment", f"password={SECRET}", "password={m}"),
    ("password_assignment", f'{{"username": "bob", "password": "{SECRET}"}}',
     '{{"username": "bob", "password": "{m}"}}'),
    ("password_assignment", f'{{"password":"{SECRET}"}}', '{{"password":"{m}"}}'),
    ("password_assignment", f"DB_PASSWORD={SECRET}\nDB_HOST=db\n", "DB_PASSWORD={m}\nDB_HOST=db\n"),
    ("password_assignment", f"  passwd: {SECRET}\n", "  passwd: {m}\n"),
    ("password_assignment", f"conn = connect(host='db', pwd='{SECRET}')", "conn = connect(host='db', pwd='{m}')"),
    ("password_assignment", f"dbPassword = '{SECRET}';", "dbPassword = '{m}';"),
    ("password_assignment", f"POST /login user=bob&password={SECRET}&next=/", "POST /login user=bob&password={m}&next=/"),
    ("password_assignment", 'password = "with \\"escaped\\" quote"', 'password = "{m}"'),
    ("password_assignment", f'password: str = "{SECRET}"', 'password: str = "{m}"'),
    ("password_assignment", json.dumps({"arguments": json.dumps({"password": SECRET})}),
     '{{"arguments": "{{\\"password\\": \\"{m}\\"}}"}}'),
    ("password_assignment", json.dumps({"content": f"PASSWORD={SECRET}\nUSER=bob"}),
     '{{"content": "PASSWORD={m}\\nUSER=bob"}}'),
    ("secret_assignment", f"client_secret={SECRET}&grant_type=client_credentials",
     "client_secret={m}&grant_type=client_credentials"),
    ("secret_assignment", f'{{"api_key": "{SECRET}"}}', '{{"api_key": "{m}"}}'),
    ("secret_assignment", f"apikey: {SECRET}", "apikey: {m}"),
    ("secret_assignment", f"clientSecret: '{SECRET}',", "clientSecret: '{m}',"),
    ("secret_assignment", f"SECRET_KEY = '{SECRET}'", "SECRET_KEY = '{m}'"),
    ("secret_assignment", f"GET /cb?access_token={SECRET}&state=1", "GET /cb?access_token={m}&state=1"),
    ("secret_assignment", f'auth_token => "{SECRET}"', 'auth_token => "{m}"'),
    ("secret_assignment", f'{{"refresh_token": "{SECRET}"}}', '{{"refresh_token": "{m}"}}'),
    ("secret_assignment", f"X-Api-Key: {SECRET}\n", "X-Api-Key: {m}\n"),
    ("secret_assignment", f"token={OPAQUE}", "token={m}"),
    ("secret_assignment", f'{{"token": "{OPAQUE}"}}', '{{"token": "{m}"}}'),
    ("secret_assignment", f"NPM_TOKEN={OPAQUE}", "NPM_TOKEN={m}"),
    # Names in any case; values that only look like placeholders are still secrets.
    ("password_assignment", f"PASSWORD: {SECRET}", "PASSWORD: {m}"),
    ("secret_assignment", f"const ApiKey = '{SECRET}'", "const ApiKey = '{m}'"),
    ("secret_assignment", f"API-KEY={SECRET}", "API-KEY={m}"),
    ("password_assignment", "password=this-is-my-password", "password={m}"),
    ("password_assignment", "password=None123", "password={m}"),
    ("password_assignment", "pwd=configure99", "pwd={m}"),
]


@pytest.mark.parametrize("category, text, redacted", CONTEXTUAL)
def test_secrets_known_by_their_context_are_redacted(category, text, redacted):
    assert redact_text(text) == (redacted.format(m=marker(category)), {category: 1})


def test_every_category_has_samples():
    covered = {category for category, _ in SHAPES} | {category for category, _, _ in CONTEXTUAL}
    assert covered == set(CATEGORIES)
    assert len(CATEGORIES) == len(set(CATEGORIES))


@pytest.mark.parametrize("text, redacted, counts", [
    # A key given a generic name counts once, as the key it is.
    ('api_key = "sk-ant-api03-' + fake(URL_SAFE, 93, 50) + 'AA"', 'api_key = "[REDACTED:anthropic_key]"',
     {"anthropic_key": 1}),
    ("Authorization: Bearer ghp_" + fake(ALNUM, 36, 51), "Authorization: Bearer [REDACTED:github_token]",
     {"github_token": 1}),
    ("https://x-access-token:ghs_" + fake(ALNUM, 36, 52) + "@github.com/o/r.git",
     "https://x-access-token:[REDACTED:github_token]@github.com/o/r.git", {"github_token": 1}),
    ('"private_key": ' + json.dumps(PEM + "\n"), '"private_key": "[REDACTED:private_key]"', {"private_key": 1}),
    # A user that is a token is caught as well as the password.
    ("https://ghp_" + fake(ALNUM, 36, 53) + ":x-oauth-basic@github.com",
     "https://[REDACTED:github_token]:[REDACTED:url_credentials]@github.com",
     {"github_token": 1, "url_credentials": 1}),
    # A value that is not itself a secret is still searched for one.
    ('{"token": "mine is xai-' + fake(ALNUM, 80, 54) + '"}', '{"token": "mine is [REDACTED:xai_key]"}',
     {"xai_key": 1}),
    # JSON may escape the slashes of a webhook URL.
    ('{"url": "https:\\/\\/hooks.slack.com\\/services\\/T0AB12CD3\\/B0EF45GH6\\/' + fake(ALNUM, 24, 55) + '"}',
     '{"url": "[REDACTED:slack_token]"}', {"slack_token": 1}),
    # A body cut at the capture limit does not leak half a secret.
    ('{"messages": [{"content": "x"}], "password": "hunt', '{"messages": [{"content": "x"}], "password": "'
     '[REDACTED:password_assignment]', {"password_assignment": 1}),
    (PEM[:200], "[REDACTED:private_key]", {"private_key": 1}),
    # A URL escape separates like a space does.
    ("GET /x?q=Bearer%20sk-proj-" + "Ab1" * 20 + "&y=1", "GET /x?q=Bearer%20[REDACTED:openai_key]&y=1",
     {"openai_key": 1}),
    # The same key twice is counted twice.
    ("gsk_" + "a1" * 26 + " and again gsk_" + "a1" * 26, "[REDACTED:groq_key] and again [REDACTED:groq_key]",
     {"groq_key": 2}),
])
def test_specific_cases(text, redacted, counts):
    assert redact_text(text) == (redacted, counts)


def test_mixed_document_counts_each_category():
    anthropic = "sk-ant-api03-" + fake(URL_SAFE, 93, 60) + "AA"
    google = "AIza" + fake(URL_SAFE, 35, 61)
    text = json.dumps({"messages": [
        {"role": "user", "content": f"export ANTHROPIC_API_KEY={anthropic}\nexport GEMINI_API_KEY={google}"},
        {"role": "assistant", "content": f"Don't paste keys. Also rotate {anthropic} and password: {SECRET}"},
    ]})
    redacted, counts = redact_text(text)
    assert anthropic not in redacted and google not in redacted and SECRET not in redacted
    assert counts == {"anthropic_key": 2, "google_key": 1, "password_assignment": 1}
    assert list(counts) == [c for c in CATEGORIES if c in counts]
    assert json.loads(redacted)["messages"][1]["content"] == (
        "Don't paste keys. Also rotate [REDACTED:anthropic_key] and password: [REDACTED:password_assignment]")


IDEMPOTENCE_INPUTS = (
    [build(key) for _, key in SHAPES for build in SHAPE_CONTEXTS.values()]
    + [text for _, text, _ in CONTEXTUAL]
    + ["?api_key=REDACTED&key=REDACTED", "password=REDACTED"]
)


@pytest.mark.parametrize("text", IDEMPOTENCE_INPUTS)
def test_redacting_twice_changes_nothing_more(text):
    once, _ = redact_text(text)
    assert redact_text(once) == (once, {})


def test_credential_headers_are_replaced_and_others_scanned():
    anthropic = "sk-ant-api03-" + fake(URL_SAFE, 93, 70) + "AA"
    headers = [
        ("Host", "api.anthropic.com"),
        ("X-Api-Key", anthropic),
        ("authorization", "Bearer abc"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("x-goog-api-key", "AIza" + fake(URL_SAFE, 35, 71)),
        ("api-key", "0123456789abcdef0123456789abcdef"),
        ("Cookie", "session=abc; theme=dark"),
        ("Set-Cookie", "session=abc; HttpOnly"),
        ("X-Amz-Security-Token", "IQoJb3JpZ2luX2VjEJr"),
        ("anthropic-version", "2023-06-01"),
        ("OpenAI-Organization", "org-abc123"),
        ("x-halton-project", "billing"),
        ("x-debug-note", f"forwarded {anthropic}"),
    ]
    kept, counts = redact_headers(headers)
    assert kept == [
        ("Host", "api.anthropic.com"),
        ("X-Api-Key", "[REDACTED:auth_header]"),
        ("authorization", "[REDACTED:auth_header]"),
        ("Proxy-Authorization", "[REDACTED:auth_header]"),
        ("x-goog-api-key", "[REDACTED:auth_header]"),
        ("api-key", "[REDACTED:auth_header]"),
        ("Cookie", "[REDACTED:auth_header]"),
        ("Set-Cookie", "[REDACTED:auth_header]"),
        ("X-Amz-Security-Token", "[REDACTED:auth_header]"),
        ("anthropic-version", "2023-06-01"),
        ("OpenAI-Organization", "org-abc123"),
        ("x-halton-project", "billing"),
        ("x-debug-note", "forwarded [REDACTED:anthropic_key]"),
    ]
    assert counts == {"auth_header": 8, "anthropic_key": 1}
    assert redact_headers(kept) == (kept, {})


def test_no_headers():
    assert redact_headers([]) == ([], {})


BASE64_IMAGE = base64.b64encode(random.Random(80).randbytes(60_000)).decode()
NOT_SECRETS = [
    "The quick brown fox jumps over the lazy dog. Send the key in the Authorization header; "
    "the bearer of bad news is not a token, and a password should be long.",
    "request 3f2b8c1e-9a4d-4e6b-8f0a-1c2d3e4f5a6b failed",
    "fixed in commit 9fceb02d0ae598e95dc970b74767f19372d61af8 (sha256 "
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855)",
    json.dumps({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": BASE64_IMAGE}}),
    json.dumps({"inlineData": {"mimeType": "image/jpeg",
                               "data": base64.urlsafe_b64encode(random.Random(81).randbytes(60_000)).decode()}}),
    '{"model": "claude-sonnet-4-5", "max_tokens": 1024}',
    "models: claude-opus-4-1-20250805, gpt-4o-mini, gemini-2.5-flash, grok-4, llama-3.3-70b-versatile",
    '{"id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message"}',
    '{"id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion"}',
    '{"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather"}',
    '{"id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b", "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}',
    "Use sk-learn for a task-based, disk-based, risk-free pipeline: sk-learn-compatible-estimators-api.",
    '{"usage": {"input_tokens": 12, "output_tokens": 340, "cache_read_input_tokens": 0}, "token_count": 5}',
    '{"usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}',
    '{"logprobs": {"content": [{"token": " Hello", "logprob": -0.31, "top_logprobs": []}]}}',
    '{"NextToken": "AAAAAKxmYWtlLXBhZ2luYXRpb24tdG9rZW4x", "next_token": "c2Vjb25kLXBhZ2U0Mg", "MAX_TOKEN": 4096}',
    'client = OpenAI(api_key=os.environ["OPENAI_API_KEY"])',
    'api_key = os.getenv("ANTHROPIC_API_KEY")',
    "def connect(host: str, password: str, api_key: str | None = None) -> None:",
    "    token: Optional[str] = None",
    '{"password": null, "api_key": "<your-api-key>", "secret": "***"}',
    'password = getpass.getpass("Password: ")\nlogin(user, password)\n',
    "pwd = self.pwd\ndef read(self, name, pwd=None):",
    "OPENAI_API_KEY=$OPENAI_API_KEY\nexport ANTHROPIC_API_KEY=${ANTHROPIC_API_KEY}",
    "const client = new Anthropic({ apiKey: process.env.ANTHROPIC_API_KEY });",
    'curl -H "Authorization: Bearer $OPENAI_API_KEY" -H "Authorization: Bearer YOUR_TOKEN_HERE"',
    '{"properties": {"password": {"type": "string"}, "api_key": {"type": "string"}}}',
    "https://api.anthropic.com/v1/messages http://localhost:8080/health git@github.com:org/repo.git",
    "if password == expected: return",
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    "pk_live_" + fake(ALNUM, 24, 82),
]


@pytest.mark.parametrize("text", NOT_SECRETS, ids=[text[:40] for text in NOT_SECRETS])
def test_ordinary_text_is_left_alone(text):
    assert redact_text(text) == (text, {})


def test_recorded_transcripts_have_nothing_to_redact():
    for path in sorted(TRANSCRIPTS.iterdir()):
        text = path.read_bytes().decode("utf-8", errors="replace")
        assert redact_text(text) == (text, {}), path.name


@pytest.mark.parametrize("text", [
    "a" * 500_000,
    '"password":"' + "x" * 500_000,
    "-----BEGIN RSA PRIVATE KEY-----" + "A" * 500_000,
    "eyJ" + "a." * 200_000,
    "-----BEGIN RSA PRIVATE KEY-----\n" * 16_000,
    '"password": "x' * 40_000,
    "sk-" * 170_000,
    "://a:" * 100_000,
    "Bearer " * 70_000,
    "\\" * 500_000,
    "password: str = " * 30_000,
], ids=["a", "unclosed quote", "PEM without END", "eyJ dots", "many BEGINs", "many passwords", "sk-", "://",
        "Bearer", "backslashes", "annotations"])
def test_pathological_inputs_take_linear_time(text):
    start = time.perf_counter()
    redacted, _ = redact_text(text)
    assert time.perf_counter() - start < 2.0
    assert redact_text(redacted)[1] == {}


def test_a_missing_end_does_not_swallow_the_body():
    text = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n" + "x" * 20_000 + "\n-----END RSA PRIVATE KEY-----"
    assert redact_text(text) == (text, {})


def test_merge_counts():
    assert merge_counts() == {}
    merged = merge_counts({"jwt": 1, "auth_header": 2}, {}, {"jwt": 2, "stripe_key": 0}, {"future_kind": 1})
    assert merged == {"auth_header": 2, "jwt": 3, "future_kind": 1}
    assert list(merged) == ["auth_header", "jwt", "future_kind"]
