"""Pricing: every cost component checked against hand-computed nano-dollars, model-id resolution,
the three table layers (bundled, imported, config) and LiteLLM import.

$1 per 1M tokens is 1000 nano-dollars per token, so `tokens * rate * 1000` is each expected value.
"""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from halton_meter.adapters.base import BILL_FREE, BILL_NONE, BILL_TOKENS, Usage
from halton_meter.pricing import IMPORTED_FILE, PriceTable, PricingError, Quote
from halton_meter.pricing_import import import_litellm
from halton_meter.pricing_show import describe, describe_json

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO.parent / "shared" / "reference" / "pricing-snapshot.json"
MONDAY = datetime(2026, 11, 23, tzinfo=timezone.utc)  # an ISO weekday 1
SATURDAY = datetime(2026, 11, 28, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


def quote(table: PriceTable, model: str, *, tier: str | None = None, at: float | None = None,
          billing: str = BILL_TOKENS, provider: str | None = None, **counts) -> Quote:
    return table.price(provider=provider, models=(model,), usage=Usage(**counts), billing=billing,
                       service_tier=tier, at=MONDAY.timestamp() if at is None else at)


def cost(table: PriceTable, model: str, **kwargs) -> int | None:
    return quote(table, model, **kwargs).cost_nanousd


# ---- each price component --------------------------------------------------------------------


def test_uncached_input(table):
    assert cost(table, "claude-sonnet-4-5", input_tokens=1000) == 1000 * 3 * 1000


def test_cache_read(table):
    # gpt-5.4 reads at 0.25, a tenth of its 2.5 input rate
    assert cost(table, "gpt-5.4", cache_read_tokens=10_000) == 2_500_000


def test_null_cache_read_bills_at_input(table):
    # gpt-5.4-pro has no cached rate: cached tokens are not discounted (input 30)
    assert cost(table, "gpt-5.4-pro", cache_read_tokens=1000) == 30_000_000


def test_anthropic_cache_writes_by_ttl(table):
    # claude-opus-4-7: 5-minute writes 6.25, 1-hour writes 10
    assert cost(table, "claude-opus-4-7", cache_write_5m_tokens=2000) == 12_500_000
    assert cost(table, "claude-opus-4-7", cache_write_1h_tokens=1000) == 10_000_000
    assert cost(table, "claude-opus-4-7", cache_write_5m_tokens=2000,
                cache_write_1h_tokens=1000) == 22_500_000


def test_openai_cache_writes_gpt_5_6(table):
    # gpt-5.6: 30-minute writes 5, 12-hour writes 10
    assert cost(table, "gpt-5.6", cache_write_30m_tokens=1000) == 5_000_000
    assert cost(table, "gpt-5.6", cache_write_12h_tokens=1000) == 10_000_000


def test_write_without_a_rate_bills_at_input(table):
    # gpt-4.1 has no write charge: written tokens are ordinary input (2)
    assert cost(table, "gpt-4.1", cache_write_30m_tokens=1000) == 2_000_000


def test_output_includes_reasoning_which_is_not_added_again(table):
    # 2000 billed output tokens of which 1500 reasoning: 2000 * 15
    assert cost(table, "gpt-5.4", output_tokens=2000, reasoning_tokens=1500) == 30_000_000


def test_reasoning_output_rate_when_a_model_has_one():
    table = PriceTable.load(overrides={"thinker-1": {"input": 1, "output": 10, "reasoning_output": 20}})
    # 400 reasoning tokens at 20, the other 600 output tokens at 10
    assert cost(table, "thinker-1", output_tokens=1000, reasoning_tokens=400) == 14_000_000


def test_every_component_together(table):
    # claude-sonnet-4-5: 1200*3 + 4096*0.3 + 300*3.75 + 50*6 + 900*15 = 19753.8 (USD per 1M)
    assert cost(table, "claude-sonnet-4-5", input_tokens=1200, cache_read_tokens=4096,
                cache_write_5m_tokens=300, cache_write_1h_tokens=50, output_tokens=900) == 19_753_800


# ---- long-context tiers ----------------------------------------------------------------------


def test_gpt_5_4_above_272k(table):
    assert cost(table, "gpt-5.4", input_tokens=272_000, output_tokens=1000) == 695_000_000
    # one token more: every token at the tier (5 / 22.5)
    assert cost(table, "gpt-5.4", input_tokens=272_001, output_tokens=1000) == 1_382_505_000


def test_tier_counts_cache_reads_in_the_prompt(table):
    # 100000 uncached + 172001 cached = 272001 prompt tokens: tier cache read 0.5, input 5
    assert cost(table, "gpt-5.4", input_tokens=100_000, cache_read_tokens=172_001) == 586_000_500


def test_claude_sonnet_4_5_above_200k(table):
    # 150000*6 + 50001*0.6 + 1000*22.5 = 952500.6
    assert cost(table, "claude-sonnet-4-5", input_tokens=150_000, cache_read_tokens=50_001,
                output_tokens=1000) == 952_500_600
    assert cost(table, "claude-sonnet-4-5", input_tokens=200_000) == 600_000_000


def test_grok_tier_is_inclusive_at_exactly_200000(table):
    assert cost(table, "grok-4.7", input_tokens=200_000, output_tokens=100) == 801_200_000
    assert cost(table, "grok-4.7", input_tokens=199_999, output_tokens=100) == 400_598_000


def test_haiku_5_5_above_100k(table):
    # 90000*0.5 + 10001*0.625 (tier 5m write) + 1000*2.5 = 53750.625
    assert cost(table, "claude-haiku-5-5", input_tokens=90_000, cache_write_5m_tokens=10_001,
                output_tokens=1000) == 53_750_625
    assert cost(table, "claude-haiku-5-5", input_tokens=100_000, output_tokens=1000) == 10_500_000


def test_tier_is_recorded_in_rates_json(table):
    rates = json.loads(quote(table, "gpt-5.4", input_tokens=272_001).rates_json)
    assert rates["tier"] == {"above_input_tokens": 272000, "threshold_inclusive": False}
    assert rates["rates"]["input"] == "5" and rates["rates"]["output"] == "22.5"


# ---- per-request items, service tiers, time of day -------------------------------------------


def test_web_search_per_request(table):
    assert cost(table, "claude-sonnet-4-5", billed_items={"web_search_requests": 3}) == 30_000_000
    assert cost(table, "claude-sonnet-4-5", input_tokens=1000,
                billed_items={"web_search_requests": 1}) == 13_000_000


def test_items_without_a_price_are_ignored(table):
    assert cost(table, "claude-sonnet-4-5", billed_items={"web_fetch_requests": 5}) == 0
    assert cost(table, "gpt-4.1", input_tokens=1000, billed_items={"web_search_requests": 2}) == 2_000_000


def test_batch_rates(table):
    # claude-sonnet-4-5 batch: 1.5 in, 7.5 out
    assert cost(table, "claude-sonnet-4-5", tier="batch", input_tokens=1000,
                output_tokens=1000) == 9_000_000
    rates = json.loads(quote(table, "claude-sonnet-4-5", tier="batch", input_tokens=1).rates_json)
    assert rates["column"] == "batch"


def test_batch_without_batch_rates_is_unpriced(table):
    result = quote(table, "gpt-5.3-codex", tier="batch", input_tokens=1000)
    assert (result.cost_nanousd, result.model_key) == (None, "gpt-5.3-codex")
    assert result.unpriced_reason == "no batch rates for gpt-5.3-codex"


def test_batch_above_a_tier_without_batch_tier_rates_is_unpriced(table):
    result = quote(table, "gpt-5.4", tier="batch", input_tokens=300_000)
    assert result.cost_nanousd is None
    assert result.unpriced_reason == "no batch rates for gpt-5.4 at >272k prompt tokens"


@pytest.mark.parametrize("tier", ["priority", "flex", "fast", "scale"])
def test_premium_tiers_without_rates_are_unpriced_never_standard(table, tier):
    result = quote(table, "gpt-5.4", tier=tier, input_tokens=1000)
    assert result.cost_nanousd is None
    assert result.unpriced_reason == f"no {tier} rates for gpt-5.4"


@pytest.mark.parametrize("tier", [None, "default", "standard", "auto", "on_demand", "DEFAULT"])
def test_standard_tier_names(table, tier):
    assert cost(table, "gpt-5.4", tier=tier, input_tokens=1000) == 2_500_000


def test_configured_priority_column_is_used():
    table = PriceTable.load(overrides={"gpt-x": {"provider": "openai", "input": 1, "output": 2,
                                                 "priority": {"input": 2, "output": 4}}})
    assert cost(table, "gpt-x", tier="priority", input_tokens=1000) == 2_000_000
    # OpenAI bills a `fast` request as priority
    assert cost(table, "gpt-x", tier="fast", input_tokens=1000) == 2_000_000


def at(day: datetime, hour: int, minute: int = 0, second: int = 0) -> float:
    return day.replace(hour=hour, minute=minute, second=second).timestamp()


@pytest.mark.parametrize("moment, expected", [
    (at(MONDAY, 2), 5_324_000),  # peak 01:00-04:00 UTC on weekdays
    (at(MONDAY, 8), 5_324_000),  # peak 06:00-10:00
    (at(MONDAY, 1), 5_324_000),  # the off-peak span 00:00-01:00 ends before 01:00
    (at(MONDAY, 0, 59, 59), 2_662_000),
    (at(MONDAY, 5), 2_662_000),  # 04:00-06:00 off-peak
    (at(MONDAY, 10), 2_662_000),  # 10:00 to midnight off-peak
    (at(MONDAY, 23, 59, 59), 2_662_000),
    (at(SATURDAY, 2), 2_662_000),  # weekends off-peak all day
    (at(SATURDAY, 8), 2_662_000),
])
def test_deepseek_peak_and_off_peak_by_request_time(table, moment, expected):
    # deepseek-v4-pro, 1000 each of miss/hit/output: peak 1.32 + 0.044 + 3.96; off-peak half
    assert cost(table, "deepseek-v4-pro", at=moment, input_tokens=1000, cache_read_tokens=1000,
                output_tokens=1000) == expected


def test_off_peak_is_recorded_in_rates_json(table):
    rates = json.loads(quote(table, "deepseek-v4-pro", at=at(MONDAY, 5), input_tokens=1).rates_json)
    assert rates["column"] == "off_peak" and rates["rates"]["input"] == "0.66"


# ---- billing, unknown models, rounding -------------------------------------------------------


def test_free_billing_costs_zero(table):
    result = quote(table, "claude-sonnet-4-5", billing=BILL_FREE, input_tokens=5000)
    assert (result.cost_nanousd, result.model_key, result.unpriced_reason) == (0, "claude-sonnet-4-5", None)
    assert quote(table, "no-such-model", billing=BILL_FREE, input_tokens=5).cost_nanousd == 0


def test_nothing_to_price_is_not_unpriced(table):
    none = quote(table, "claude-sonnet-4-5", billing=BILL_NONE)
    assert (none.cost_nanousd, none.unpriced_reason, none.rates_json) == (None, None, None)
    missing = table.price(provider="anthropic", models=("claude-sonnet-4-5",), usage=None,
                          billing=BILL_TOKENS, service_tier=None, at=0.0)
    assert (missing.cost_nanousd, missing.unpriced_reason) == (None, None)


def test_unknown_model(table):
    result = quote(table, "gpt-9000", input_tokens=10)
    assert result == Quote(None, None, None, "unknown model gpt-9000")


def test_response_model_first_then_requested(table):
    usage = Usage(input_tokens=1000)
    both = table.price(provider="openai", models=("gpt-4.1-2025-04-14", "gpt-5.4"), usage=usage,
                       billing=BILL_TOKENS, service_tier=None, at=0.0)
    assert (both.model_key, both.cost_nanousd) == ("gpt-4.1", 2_000_000)
    fallback = table.price(provider="openai", models=("mystery-7", "gpt-5.4"), usage=usage,
                           billing=BILL_TOKENS, service_tier=None, at=0.0)
    assert (fallback.model_key, fallback.cost_nanousd) == ("gpt-5.4", 2_500_000)
    neither = table.price(provider="openai", models=(None, "mystery-8"), usage=usage,
                          billing=BILL_TOKENS, service_tier=None, at=0.0)
    assert neither.unpriced_reason == "unknown model mystery-8"


def test_rounding_is_half_even_on_the_exact_total(table):
    # openai/gpt-oss-20b (Groq): input 0.075, cache read 0.0375 -> 75 and 37.5 nano-dollars a token
    assert cost(table, "openai/gpt-oss-20b", cache_read_tokens=1) == 38  # 37.5 -> 38
    assert cost(table, "openai/gpt-oss-20b", cache_read_tokens=3) == 112  # 112.5 -> 112
    # 75 + 37.5 = 112.5 -> 112; rounding each part first would give 113
    assert cost(table, "openai/gpt-oss-20b", input_tokens=1, cache_read_tokens=1) == 112
    # 0.0375 * 7 = 262.5 -> 262; gpt-5-nano 0.005 cache read: 5 nano a token, exact
    assert cost(table, "openai/gpt-oss-20b", cache_read_tokens=7) == 262
    assert cost(table, "gpt-5-nano", cache_read_tokens=1) == 5


def test_rates_json_is_canonical_and_exact(table):
    text = quote(table, "claude-haiku-5-5", input_tokens=10).rates_json
    rates = json.loads(text)
    assert text == json.dumps(rates, sort_keys=True, separators=(",", ":"))
    assert rates["key"] == "claude-haiku-5-5" and rates["layer"] == "bundled"
    assert rates["rates"]["cache_write_5m"] == "0.125" and rates["rates"]["input"] == "0.1"
    assert rates["per_request"] == {"web_search_requests": "0.01"}


# ---- model-id resolution (pricing.md §4) -----------------------------------------------------


@pytest.mark.parametrize("model, key", [
    ("claude-sonnet-4-5", "claude-sonnet-4-5"),
    ("CLAUDE-Sonnet-4-5", "claude-sonnet-4-5"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),  # explicit alias
    ("claude-sonnet-4-5-20991231", "claude-sonnet-4-5"),  # -YYYYMMDD
    ("gpt-4.1-2025-04-14", "gpt-4.1"),
    ("gpt-5.4-2031-01-02", "gpt-5.4"),  # -YYYY-MM-DD
    ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),  # Vertex
    ("grok-4.7-0415", "grok-4.7"),  # xAI -MMDD
    ("grok-4.20-0309", "grok-4.20"),
    ("gemini-3-flash-preview-09-2025", "gemini-3-flash-preview"),  # -MM-YYYY
    ("grok-4.3-latest", "grok-4.3"),
    ("gemini-2.5-flash-latest", "gemini-2.5-flash"),  # -latest rule, not an alias
    ("anthropic/claude-sonnet-4-5", "claude-sonnet-4-5"),
    ("openai/gpt-5.4", "gpt-5.4"),
    ("models/gemini-2.5-pro", "gemini-2.5-pro"),
    ("gemini/gemini-2.5-pro", "gemini-2.5-pro"),
    ("xai/grok-4.5", "grok-4.5"),
    ("x-ai/grok-4.5", "grok-4.5"),
    ("deepseek/deepseek-v4-pro", "deepseek-v4-pro"),
    ("mistral/mistral-large-latest", "mistral-large-latest"),
    ("openai/gpt-oss-120b", "openai/gpt-oss-120b"),  # a Groq key, not a prefix
    ("groq/openai/gpt-oss-120b", "openai/gpt-oss-120b"),
    ("anthropic/claude-sonnet-4.5", "claude-sonnet-4-5"),  # OpenRouter dotted versions
    ("anthropic/claude-opus-4.1", "claude-opus-4-1"),
    ("anthropic/claude-3.7-sonnet", "claude-3-7-sonnet"),
    ("openrouter/anthropic/claude-haiku-4.5", "claude-haiku-4-5"),
    ("anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),  # Bedrock
    ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
    ("eu.anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5"),
    ("apac.anthropic.claude-opus-4-1-20250805-v1:0", "claude-opus-4-1"),
    ("global.anthropic.claude-opus-4-6-v1", "claude-opus-4-6"),
    ("anthropic.claude-3-haiku-20240307-v2:0", "claude-3-haiku"),
    ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-sonnet-4-5-20250929-v1:0",
     "claude-sonnet-4-5"),
    ("arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-opus-4-5"
     "-20251101-v1%3A0", "claude-opus-4-5"),
    ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # priced unlike gpt-4o: its own entry
    ("deepseek-v4-flash", "deepseek-flash"),
    ("claude-sonnet-5-5[1m]", "claude-sonnet-5-5"),  # Claude Code's display marker
])
def test_resolution(table, model, key):
    found = table.resolve(model)
    assert found is not None and found[0] == key
    assert found[1].key == key


@pytest.mark.parametrize("model", [
    "claude-opus-4",  # never a longest-prefix guess (claude-opus-4-8, claude-opus-4-0)
    "claude-opus-4-9",
    "gpt-5.4-turbo",
    "claude-sonnet",
    "gpt",
    "anthropic/claude-sonnet-4.9",
    "azure/gpt-4.1",  # clouds price differently: not stripped
    "claude-sonnet-4-5-2025",
    "",
])
def test_never_crosses_families(table, model):
    assert table.resolve(model) is None


def test_prefix_cannot_turn_one_model_into_another(table):
    assert table.resolve("gpt-5.4-pro")[0] == "gpt-5.4-pro"
    assert table.resolve("gpt-5.4-pro-2026-03-05")[0] == "gpt-5.4-pro"
    assert table.resolve("openai/gpt-5.4-mini-2099-01-01")[0] == "gpt-5.4-mini"
    assert table.resolve("claude-opus-4-8-20991231")[0] == "claude-opus-4-8"


def test_groq_ids_keep_their_prefix(table):
    # On Groq `openai/...` is the model's own name: never read as OpenAI's model
    assert table.resolve("openai/gpt-4.1", provider="groq") is None
    assert table.resolve("openai/gpt-4.1", provider="openrouter")[0] == "gpt-4.1"
    assert table.resolve("openai/gpt-oss-20b", provider="groq")[0] == "openai/gpt-oss-20b"


def test_resolution_is_cached(table):
    table.resolve("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "bedrock")
    assert table._resolved[("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "bedrock")] == (
        "claude-sonnet-4-5", "Bedrock id, alias")


# ---- config.toml overrides -------------------------------------------------------------------


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text, encoding="utf-8")


def test_config_overrides(tmp_path):
    write_config(tmp_path, """
[proxy]
port = 8090

[pricing.models."my-model"]
provider = "custom"
input = 1.1
output = 2.2
cache_read = 0.11

[pricing.models."gpt-4.1"]
input = 0.1
output = 0.3
tiers = [{ above_input_tokens = 1000, input = 0.2, output = 0.6 }]

[pricing.models."int-and-string"]
input = 3
output = "0.0001"
""")
    table = PriceTable.load(tmp_path)
    key, rates = table.resolve("my-model")
    assert rates.input == Decimal("1.1") and rates.layer == "config"
    # exactly 1.1, not the binary float 1.100000000000000088…
    assert cost(table, "my-model", input_tokens=1000, cache_read_tokens=1000) == 1_210_000
    # the whole gpt-4.1 entry is replaced; the provider carries over
    gpt = table.models["gpt-4.1"]
    assert (gpt.provider, gpt.batch, gpt.aliases) == ("openai", None, ())
    assert cost(table, "gpt-4.1-2025-04-14", input_tokens=1000) == 100_000  # date rule still finds it
    assert cost(table, "gpt-4.1", input_tokens=1001) == 200_200
    assert table.models["int-and-string"].input == Decimal(3)
    assert table.models["int-and-string"].output == Decimal("0.0001")
    assert cost(table, "int-and-string", output_tokens=5) == 0  # 0.5 nano-dollars, half to even
    assert cost(table, "int-and-string", output_tokens=15) == 2  # 1.5
    assert "1 config override" not in describe(table)
    assert "3 config override(s)" in describe(table)


def test_overrides_argument_is_the_top_layer(tmp_path):
    write_config(tmp_path, '[pricing.models."m1"]\ninput = 1\noutput = 1\n')
    table = PriceTable.load(tmp_path, overrides={"m1": {"input": 0.5, "output": 1}})
    assert table.models["m1"].input == Decimal("0.5")


@pytest.mark.parametrize("body, words", [
    ('[pricing.models."bad-model"]\ninput = "abc"\noutput = 1\n', ["bad-model", "input", "'abc'"]),
    ('[pricing.models."bad-model"]\ninput = -1\noutput = 1\n', ["bad-model", "non-negative"]),
    ('[pricing.models."bad-model"]\ninput = 1\n', ["bad-model", "output"]),
    ('[pricing.models."bad-model"]\ninput = 1\noutput = 1\ncache_reed = 0.1\n', ["bad-model", "cache_reed"]),
    ('[pricing.models."bad-model"]\ninput = 1\noutput = 1\ntiers = [{ input = 2 }]\n',
     ["bad-model", "above_input_tokens"]),
    ('[pricing.models."bad-model"]\ninput = 1\noutput = 1\nbatch = 5\n', ["bad-model", "batch"]),
    ('[pricing]\nmodels = 3\n', ["pricing.models"]),
    ('[pricing.models."x"\n', ["TOML"]),
])
def test_malformed_override_raises_pricing_error(tmp_path, body, words):
    write_config(tmp_path, body)
    with pytest.raises(PricingError) as raised:
        PriceTable.load(tmp_path)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    for word in words:
        assert word in message
    assert str(tmp_path / "config.toml") in message


# ---- LiteLLM import --------------------------------------------------------------------------

LITELLM_SAMPLE = {
    "sample_spec": {
        "max_input_tokens": "max input tokens, if the provider specifies it",
        "input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
        "litellm_provider": "one of https://docs.litellm.ai/docs/providers",
        "mode": "one of: chat, embedding, completion, image_generation, audio_transcription",
    },
    "claude-sonnet-4-5": {
        "litellm_provider": "anthropic", "mode": "chat",
        "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
        "cache_read_input_token_cost": 3e-07, "cache_creation_input_token_cost": 3.75e-06,
        "cache_creation_input_token_cost_above_1hr": 6e-06,
        "input_cost_per_token_above_200k_tokens": 6e-06, "output_cost_per_token_above_200k_tokens": 2.25e-05,
        "cache_read_input_token_cost_above_200k_tokens": 6e-07,
        "cache_creation_input_token_cost_above_200k_tokens": 7.5e-06,
        "cache_creation_input_token_cost_above_1hr_above_200k_tokens": 1.2e-05,
        "input_cost_per_token_batches": 1.5e-06, "output_cost_per_token_batches": 7.5e-06,
        "cache_read_input_token_cost_batches": 1.5e-07, "cache_creation_input_token_cost_batches": 1.875e-06,
        "search_context_cost_per_query": {"search_context_size_low": 0.01, "search_context_size_medium": 0.01,
                                          "search_context_size_high": 0.01},
        "deprecation_date": "2026-11-30", "supports_vision": True, "max_input_tokens": 200000,
    },
    "gpt-4.1": {
        "litellm_provider": "openai", "mode": "chat",
        "input_cost_per_token": 1.9e-06, "output_cost_per_token": 8e-06, "cache_read_input_token_cost": 5e-07,
        "input_cost_per_token_batches": 1e-06, "output_cost_per_token_batches": 4e-06,
        "input_cost_per_token_priority": 3.5e-06, "output_cost_per_token_priority": 1.4e-05,
    },
    "azure/gpt-4.1": {
        "litellm_provider": "azure", "mode": "chat",
        "input_cost_per_token": 2.2e-06, "output_cost_per_token": 8.8e-06,
    },
    "azure/gpt-4.1-azure-only": {
        "litellm_provider": "azure", "mode": "chat",
        "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
    },
    "gpt-5.6": {
        "litellm_provider": "openai", "mode": "responses",
        "input_cost_per_token": 4e-06, "output_cost_per_token": 2e-05, "cache_read_input_token_cost": 4e-07,
        "cache_creation_input_token_cost": 5e-06, "cache_creation_input_token_cost_above_12hr": 1e-05,
        "input_cost_per_token_above_272k_tokens": 8e-06, "output_cost_per_token_above_272k_tokens": 3e-05,
        "cache_creation_input_token_cost_above_12hr_above_272k_tokens": 2e-05,
    },
    "gemini/gemini-9-pro": {
        "litellm_provider": "gemini", "mode": "chat",
        "input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
        "output_cost_per_reasoning_token": 1e-05,
        "input_cost_per_token_above_200k_tokens": 2.5e-06, "output_cost_per_token_above_200k_tokens": 1.5e-05,
    },
    "xai/grok-9": {
        "litellm_provider": "xai", "mode": "chat",
        "input_cost_per_token": 2e-06, "output_cost_per_token": 6e-06,
        "input_cost_per_token_above_200k_tokens": 4e-06, "output_cost_per_token_above_200k_tokens": 1.2e-05,
    },
    "deepseek/deepseek-v9": {
        "litellm_provider": "deepseek", "mode": "chat",
        "input_cost_per_token": 3e-07, "output_cost_per_token": 1.2e-06, "input_cost_per_token_cache_hit": 6e-09,
        "off_peak_pricing": {
            "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07, "cache_read_input_token_cost": 3e-09,
            "windows": [{"hours_utc": ["00:00-01:00", "04:00-06:00", "10:00-00:00"], "weekdays": [1, 2, 3, 4, 5]},
                        {"hours_utc": "00:00-00:00", "weekdays": [6, 7]}],
        },
    },
    "groq/openai/gpt-oss-120b": {
        "litellm_provider": "groq", "mode": "chat",
        "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07, "cache_read_input_token_cost": 7.5e-08,
    },
    "text-embedding-9": {
        "litellm_provider": "openai", "mode": "embedding", "input_cost_per_token": 2e-08,
    },
    "dall-e-3": {"litellm_provider": "openai", "mode": "image_generation", "output_cost_per_image": 0.04},
    "whisper-1": {"litellm_provider": "openai", "mode": "audio_transcription", "input_cost_per_second": 0.0001},
    "anthropic.claude-sonnet-4-5-20250929-v1:0": {
        "litellm_provider": "bedrock_converse", "mode": "chat",
        "input_cost_per_token": 3.3e-06, "output_cost_per_token": 1.65e-05,
    },
    "vertex_ai/claude-sonnet-4-5@20250929": {
        "litellm_provider": "vertex_ai-anthropic_models", "mode": "chat",
        "input_cost_per_token": 3.3e-06, "output_cost_per_token": 1.65e-05,
    },
    "together_ai/openai/gpt-oss-120b": {
        "litellm_provider": "together_ai", "mode": "chat",
        "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07,
    },
    "chatgpt/gpt-4.1": {
        "litellm_provider": "chatgpt", "mode": "responses",
        "input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
    },
    "chat-no-rates": {"litellm_provider": "openai", "mode": "chat", "output_cost_per_token": 1e-06},
}


@pytest.fixture()
def imported(tmp_path):
    source = tmp_path / "model_prices_and_context_window.json"
    source.write_text(json.dumps(LITELLM_SAMPLE), encoding="utf-8")
    home = tmp_path / "home"
    return import_litellm(source, home), home


def test_import_summary(imported):
    summary, home = imported
    assert summary.path == home / IMPORTED_FILE and summary.path.exists()
    assert summary.imported == 9
    assert summary.skipped == {"copy of a first-party model": 5, "mode audio_transcription": 1,
                               "mode image_generation": 1, "no token rates": 1, "sample_spec": 1}
    # gpt-4.1: input 2 -> 1.9 and a priority column; gpt-5.6: no batch rates, fewer tier rates
    assert summary.changed == ("gpt-4.1", "gpt-5.6")
    assert set(summary.added) == {"gemini-9-pro", "grok-9", "deepseek-v9", "text-embedding-9",
                                  "gpt-4.1-azure-only"}
    assert summary.unchanged == 2  # claude-sonnet-4-5 and openai/gpt-oss-120b, same as bundled
    assert not list(home.glob(".*.tmp"))


def test_load_sees_the_imported_layer(imported):
    summary, home = imported
    table = PriceTable.load(home)
    gpt = table.models["gpt-4.1"]
    assert (gpt.input, gpt.layer) == (Decimal("1.9"), "imported")
    assert cost(table, "gpt-4.1-2025-04-14", input_tokens=1000) == 1_900_000  # bundled aliases kept
    assert cost(table, "gpt-4.1", tier="priority", input_tokens=1000) == 3_500_000
    assert cost(table, "gpt-4.1", tier="batch", input_tokens=1000) == 1_000_000
    # per-token floats became exact per-million decimals
    sonnet = table.models["claude-sonnet-4-5"]
    assert (sonnet.cache_write_5m, sonnet.cache_write_1h) == (Decimal("3.75"), Decimal("6"))
    assert sonnet.tiers[0].rates["cache_write_1h"] == Decimal("12")
    assert sonnet.per_request == {"web_search_requests": Decimal("0.01")}
    # OpenAI writes map to 30m / 12h, with the 12h tier
    assert cost(table, "gpt-5.6", cache_write_30m_tokens=1000) == 5_000_000
    assert cost(table, "gpt-5.6", input_tokens=272_000, cache_write_12h_tokens=1) == 8 * 272_000 * 1000 + 20_000
    # the prefix is gone from the key, the xAI tier is inclusive
    assert cost(table, "grok-9", input_tokens=200_000) == 800_000_000
    assert cost(table, "gemini-9-pro", input_tokens=200_001) == 500_002_500
    assert table.models["gemini-9-pro"].reasoning_output is None  # equal to output: dropped
    # DeepSeek's older cache-hit name and off-peak windows
    assert table.models["deepseek-v9"].cache_read == Decimal("0.006")
    assert cost(table, "deepseek-v9", at=at(MONDAY, 5), input_tokens=1000) == 150_000
    assert cost(table, "deepseek-v9", at=at(MONDAY, 2), input_tokens=1000) == 300_000
    # a cloud-only model keeps its own key; cloud copies never replace first-party rates
    assert table.models["gpt-4.1-azure-only"].input == Decimal("2.5")
    assert table.resolve("anthropic.claude-sonnet-4-5-20250929-v1:0")[0] == "claude-sonnet-4-5"
    assert table.models["claude-sonnet-4-5"].input == Decimal("3")
    assert table.models["openai/gpt-oss-120b"].provider == "groq"  # not Together's copy
    assert table.models["openai/gpt-oss-120b"].cache_read == Decimal("0.075")
    assert table.models["text-embedding-9"].output == Decimal("0")
    # bundled models LiteLLM did not list are still there
    assert table.models["claude-opus-4-1"].layer == "bundled"
    assert "imported" in describe(table)


def test_config_beats_imported(imported):
    _, home = imported
    write_config(home, '[pricing.models."gpt-4.1"]\ninput = 7\noutput = 8\n')
    assert PriceTable.load(home).models["gpt-4.1"].input == Decimal("7")


@pytest.mark.parametrize("content", ["not json {", "[1, 2, 3]", '"text"'])
def test_import_rejects_files_that_are_not_litellm_objects(tmp_path, content):
    source = tmp_path / "prices.json"
    source.write_text(content, encoding="utf-8")
    with pytest.raises(PricingError, match="prices.json"):
        import_litellm(source, tmp_path / "home")
    assert not (tmp_path / "home" / IMPORTED_FILE).exists()


def test_import_of_a_missing_file(tmp_path):
    with pytest.raises(PricingError, match="Cannot read"):
        import_litellm(tmp_path / "absent.json", tmp_path)


@pytest.mark.parametrize("content, words", [
    ("{broken", [IMPORTED_FILE, "halton-meter pricing import"]),
    ('{"models": {"m": {"input": "x", "output": 1}}}', [IMPORTED_FILE, "'m'", "input"]),
    ('{"as_of": "2026-01-01"}', [IMPORTED_FILE, "models"]),
])
def test_malformed_imported_file_raises(tmp_path, content, words):
    (tmp_path / IMPORTED_FILE).write_text(content, encoding="utf-8")
    with pytest.raises(PricingError) as raised:
        PriceTable.load(tmp_path)
    for word in words:
        assert word in str(raised.value)


# ---- describe --------------------------------------------------------------------------------


def test_describe_all(table):
    text = describe(table)
    lines = text.splitlines()
    assert lines[0] == (f"Rates in USD per 1M tokens; bundled table as of 2026-11-23 "
                        f"({len(table.models)} models).")
    assert lines[1].split() == ["PROVIDER", "MODEL", "INPUT", "OUTPUT", "CACHE", "READ", "CACHE",
                                "WRITE", "TIER", "SOURCE"]
    row = next(line for line in lines if line.split()[:2] == ["anthropic", "claude-sonnet-4-5"])
    assert row.split() == ["anthropic", "claude-sonnet-4-5", "3", "15", "0.3", "5m", "3.75", "/", "1h",
                           "6", ">200k", "bundled"]
    grok = next(line for line in lines if line.split()[:2] == ["xai", "grok-4.7"])
    assert ">=200k" in grok
    providers = [line.split()[0] for line in lines[2:]]
    assert providers == sorted(providers)
    assert len(lines) == 2 + len(table.models)


def test_describe_one_model(table):
    text = describe(table, "claude-sonnet-4-5-20250929")
    assert text.splitlines()[0] == "claude-sonnet-4-5-20250929 → claude-sonnet-4-5 (alias)"
    assert "prompt >200k       6      22.5" in text
    assert "batch" in text and "web_search_requests $0.01" in text
    dated = describe(table, "gpt-4.1-2099-01-01")
    assert dated.splitlines()[0] == "gpt-4.1-2099-01-01 → gpt-4.1 (date suffix)"
    deepseek = describe(table, "deepseek-v4-pro")
    assert "off-peak (UTC): Mon,Tue,Wed,Thu,Fri 00:00-01:00, 04:00-06:00, 10:00-24:00; Sat,Sun all day" in deepseek


def test_describe_unknown_model(table):
    text = describe(table, "mystery-9")
    assert "not priced" in text and "[pricing.models]" in text and "halton-meter pricing import FILE" in text


def test_describe_json(table):
    one = describe_json(table, "us.anthropic.claude-haiku-4-5-20251001-v1:0")
    assert (one["priced"], one["key"], one["resolution"]) == (True, "claude-haiku-4-5", "Bedrock id, alias")
    assert one["model"]["input"] == "1" and one["model"]["batch"]["input"] == "0.5"
    assert one["model"]["layer"] == "bundled"
    json.dumps(one)
    everything = describe_json(table)
    assert everything["as_of"] == "2026-11-23" and len(everything["models"]) == len(table.models)
    json.dumps(everything)
    assert describe_json(table, "nope")["priced"] is False


# ---- the bundled table -----------------------------------------------------------------------


def test_bundled_table_rates_are_exact(table):
    assert table.models["gpt-5.4-mini"].cache_read == Decimal("0.075")
    assert table.models["openai/gpt-oss-20b"].cache_read == Decimal("0.0375")
    assert all(r.per_request == {"web_search_requests": Decimal("0.01")}
               for r in table.models.values() if r.provider == "anthropic")
    assert all(not r.per_request for r in table.models.values() if r.provider != "anthropic")


@pytest.mark.skipif(not SNAPSHOT.exists(), reason="the shared pricing snapshot is not present")
def test_bundled_json_is_what_build_pricing_generates():
    spec = importlib.util.spec_from_file_location("build_pricing", REPO / "tools" / "build_pricing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bundled = (REPO / "halton_meter" / "pricing.json").read_text(encoding="utf-8")
    assert module.render(SNAPSHOT) == bundled
    snapshot = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    assert set(snapshot["models"]) <= set(json.loads(bundled)["models"])


# ---- service columns and summed batch results (review findings) --------------------------------


def test_anthropic_batch_hour_writes_are_discounted_like_the_rest(table):
    usage = Usage(cache_write_1h_tokens=100_000)
    assert table.price(provider="anthropic", models=["claude-sonnet-4-5"], usage=usage, billing=BILL_TOKENS,
                       service_tier="batch", at=None).cost_nanousd == 100_000 * 3000  # $6 standard, $3 batch


def test_a_write_rate_missing_from_a_service_column_is_unpriced_not_standard(table):
    usage = Usage(input_tokens=10, cache_write_12h_tokens=100)
    got = table.price(provider="openai", models=["gpt-5.6"], usage=usage, billing=BILL_TOKENS,
                      service_tier="batch", at=None)
    assert got.cost_nanousd is None and "cache_write_12h" in got.unpriced_reason
    without = table.price(provider="openai", models=["gpt-5.6"], usage=Usage(input_tokens=10), billing=BILL_TOKENS,
                          service_tier="batch", at=None)
    assert without.cost_nanousd == 10 * 2000


def test_summed_batch_results_are_tiered_per_request_not_on_the_sum(table):
    # 40 requests of 3,000 prompt tokens: 120k in all, but each is far below haiku 5.5's 100k tier.
    usage = Usage(input_tokens=120_000, output_tokens=4_000, request_prompt_range=(3_000, 3_000))
    got = table.price(provider="anthropic", models=["claude-haiku-5-5"], usage=usage, billing=BILL_TOKENS,
                      service_tier="batch", at=None)
    assert got.cost_nanousd == 120_000 * 50 + 4_000 * 250
    straddling = Usage(input_tokens=300_000, request_prompt_range=(3_000, 150_000))
    got = table.price(provider="anthropic", models=["claude-haiku-5-5"], usage=straddling, billing=BILL_TOKENS,
                      service_tier="batch", at=None)
    assert got.cost_nanousd is None and "both sides" in got.unpriced_reason
