"""`halton-meter pricing import`: LiteLLM's model_prices_and_context_window.json into our rates.

The result is written to `<home>/pricing-imported.json` in the bundled table's schema, where
`PriceTable.load` layers it over the bundled rates (reference/pricing.md §5 maps the fields).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Mapping

from halton_meter.pricing import (IMPORTED_FILE, LAYER_IMPORTED, SERVICE_COLUMNS, TOKEN_RATES, PriceTable,
                                  PricingError, _canon, _plain, _Where, _windows, _write_atomically,
                                  dumps_exact, parse_entry, to_decimal,
                                  with_batch_hour_writes)

_TOKEN_MODES = frozenset({"chat", "responses", "completion", "embedding"})
# Clouds reselling other companies' models: never allowed to replace a first-party entry.
# Providers selling their own models at list price. Everyone else (clouds such as azure, bedrock,
# vertex_ai; gateways; other hosts of open models; chatgpt subscriptions) only fills gaps.
_FIRST_PARTY = frozenset({"anthropic", "openai", "text-completion-openai", "gemini", "xai", "groq",
                          "deepseek", "mistral"})
_OUR_PROVIDER = {"text-completion-openai": "openai", "bedrock_converse": "bedrock"}
_LITELLM_RATE = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read",
    "output_cost_per_reasoning_token": "reasoning_output",
    "cache_creation_input_token_cost": "cache_write",  # 5m (Anthropic) or 30m (OpenAI)
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
    "cache_creation_input_token_cost_above_12hr": "cache_write_12h",
}
_LITELLM_COLUMNS = {"_batches": "batch", "_priority": "priority", "_flex": "flex"}
_LITELLM_FIELD = re.compile(r"^(?P<base>[a-z0-9_]+?)(?:_above_(?P<n>\d+(?:\.\d+)?)(?P<unit>[km])_tokens)?"
                            r"(?P<column>_batches|_priority|_flex)?$")
_BEDROCK_ROUTE = re.compile(r"^(?:[a-z]{2}(?:-gov)?-[a-z]+-\d+/|invoke/|converse/)+")


@dataclass(frozen=True, slots=True)
class ImportSummary:
    path: Path  # the written <home>/pricing-imported.json
    imported: int
    skipped: Mapping[str, int]  # reason -> entries
    added: tuple[str, ...]  # keys the bundled table does not have
    changed: tuple[str, ...]  # keys whose rates differ from the bundled table's
    unchanged: int
    warnings: tuple[str, ...] = ()


def import_litellm(path: Path, home: Path) -> ImportSummary:
    """Convert LiteLLM's model_prices_and_context_window.json into `<home>/pricing-imported.json`."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise PricingError(f"Cannot read {path} ({exc.strerror or exc}); pass the path of LiteLLM's "
                           "model_prices_and_context_window.json.") from exc
    except ValueError as exc:
        raise PricingError(f"{path} is not JSON ({exc}); pass LiteLLM's "
                           "model_prices_and_context_window.json.") from exc
    if not isinstance(data, dict):
        raise PricingError(f"{path} is not a JSON object keyed by model id; pass LiteLLM's "
                           "model_prices_and_context_window.json.")
    bundled = PriceTable.load()
    skipped: dict[str, int] = {}
    warnings: list[str] = []

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    first_party: dict[str, tuple[bool, int, dict]] = {}  # key -> (is the bare id, order, entry)
    others: list[tuple[bool, int, str, dict]] = []
    for order, (litellm_id, spec) in enumerate(data.items()):
        if litellm_id == "sample_spec":
            skip("sample_spec")
            continue
        if not isinstance(spec, dict):
            skip("not an object")
            continue
        mode = spec.get("mode")
        if mode not in _TOKEN_MODES:
            skip(f"mode {mode}" if isinstance(mode, str) else "no mode")
            continue
        provider = spec.get("litellm_provider")
        if not isinstance(provider, str) or not provider:
            skip("no litellm_provider")
            continue
        entry = _litellm_entry(litellm_id, spec, provider, warnings)
        if entry is None:
            skip("no token rates")
            continue
        if entry.get("provider") == "anthropic":
            entry = with_batch_hour_writes(entry)
        key = _litellm_key(litellm_id, provider)
        try:
            parse_entry(key, entry, origin=str(path), layer=LAYER_IMPORTED, fix="")
        except PricingError:
            skip("invalid values")
            continue
        bare = key == litellm_id.lower()  # the bare id beats a routed copy of it
        if provider not in _FIRST_PARTY:
            others.append((not bare, order, key, entry))
            continue
        previous = first_party.get(key)
        if previous is not None:
            skip("duplicate id")
            if previous[0] or not bare:
                continue
        first_party[key] = (bare, order, entry)
    # azure/gpt-4.1, Bedrock and Vertex Claude ids or together_ai/openai/gpt-oss-120b are priced
    # by their host, not the maker: they never replace a first-party entry, imported or bundled.
    known = PriceTable({**bundled.models, **{
        key: parse_entry(key, entry, origin=str(path), layer=LAYER_IMPORTED, fix="")
        for key, (_, _, entry) in first_party.items()}})
    chosen = {key: (order, entry) for key, (_, order, entry) in first_party.items()}
    for _, order, key, entry in sorted(others, key=lambda other: other[:2]):
        if known.resolve(key) is not None:
            skip("copy of a first-party model")
        elif key in chosen:
            skip("duplicate id")
        else:
            chosen[key] = (order, entry)

    models = {key: _with_bundled_identity(key, entry, bundled)
              for key, (_, entry) in sorted(chosen.items(), key=lambda item: item[1][0])}
    added, changed, unchanged = [], [], 0
    for key, entry in models.items():
        if key not in bundled.models:
            added.append(key)
        elif _rate_signature(entry) != _rate_signature(bundled.models[key].entry):
            changed.append(key)
        else:
            unchanged += 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    document = {
        "schema": "halton-meter pricing v1: USD per 1,000,000 tokens; per_request in USD",
        "as_of": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "source": {"imported_from": str(path.resolve()), "file_sha256": digest,
                   "format": "LiteLLM model_prices_and_context_window.json"},
        "models": models,
    }
    target = Path(home) / IMPORTED_FILE
    _write_atomically(target, dumps_exact(document) + "\n")
    return ImportSummary(target, len(models), dict(sorted(skipped.items())), tuple(added),
                         tuple(changed), unchanged, tuple(warnings))


def _litellm_key(litellm_id: str, provider: str) -> str:
    """`gemini/gemini-2.5-pro` -> `gemini-2.5-pro`; `groq/openai/gpt-oss-120b` -> `openai/gpt-oss-120b`."""
    key = litellm_id.strip().lower()
    head, sep, rest = key.partition("/")
    route = provider.lower()
    if sep and head in (route, route.split("-", 1)[0], route.split("_", 1)[0]):
        key = rest
    if route.startswith("bedrock"):
        key = _BEDROCK_ROUTE.sub("", key)
    return key


def _litellm_entry(litellm_id: str, spec: dict, provider: str, warnings: list[str]) -> dict | None:
    """Our entry for one LiteLLM entry, or None without token rates."""
    lowered = litellm_id.lower()
    is_claude = provider == "anthropic" or "claude" in lowered
    is_openai = provider in ("openai", "text-completion-openai", "chatgpt") or provider.startswith("azure")
    write_name = "cache_write_5m" if is_claude else "cache_write_30m" if is_openai else None
    # (column, tier threshold) -> {rate: Decimal}
    found: dict[tuple[str | None, int | None], dict[str, Decimal]] = {}
    for name, value in spec.items():
        match = _LITELLM_FIELD.match(name)
        if match is None or match["base"] not in _LITELLM_RATE:
            continue
        rate = _LITELLM_RATE[match["base"]]
        if rate == "cache_write":
            if write_name is None:
                continue
            rate = write_name
        number = _per_million(value)
        if number is None:
            continue
        threshold = None
        if match["n"]:
            threshold = int(Decimal(match["n"]) * (1000 if match["unit"] == "k" else 1_000_000))
        column = _LITELLM_COLUMNS.get(match["column"] or "")
        found.setdefault((column, threshold), {})[rate] = number
    base = found.get((None, None), {})
    cache_hit = _per_million(spec.get("input_cost_per_token_cache_hit"))
    if "cache_read" not in base and cache_hit is not None:
        base["cache_read"] = cache_hit  # DeepSeek's older name for the same rate
    if "input" not in base:
        return None
    if "output" not in base:
        if spec.get("mode") != "embedding":
            return None
        base["output"] = Decimal(0)
    if base.get("reasoning_output") == base["output"]:
        del base["reasoning_output"]  # Gemini lists it equal to output: no separate rate
    inclusive = provider == "xai"  # LiteLLM _INCLUSIVE_THRESHOLD_PROVIDERS
    ours = "vertex" if provider.startswith("vertex_ai") else _OUR_PROVIDER.get(provider, provider)
    entry: dict[str, object] = {"provider": ours}
    entry.update({rate: base[rate] for rate in TOKEN_RATES if rate in base})

    def tiers_of(column: str | None) -> list[dict]:
        tiers = []
        for threshold in sorted(t for (col, t) in found if col == column and t is not None):
            rates = found[(column, threshold)]
            tier: dict[str, object] = {"above_input_tokens": threshold}
            if inclusive:
                tier["threshold_inclusive"] = True
            tier.update({rate: rates[rate] for rate in TOKEN_RATES if rate in rates})
            tiers.append(tier)
        return tiers

    standard_tiers = tiers_of(None)
    if standard_tiers:
        entry["tiers"] = standard_tiers
    for column in ("batch", "priority", "flex"):
        rates = found.get((column, None))
        column_tiers = tiers_of(column)
        if rates or column_tiers:
            body: dict[str, object] = {rate: rates[rate] for rate in TOKEN_RATES if rate in (rates or {})}
            if column_tiers:
                body["tiers"] = column_tiers
            entry[column] = body
    off_peak = _litellm_off_peak(spec.get("off_peak_pricing"))
    if off_peak is not None:
        entry["off_peak"] = off_peak
    elif spec.get("off_peak_pricing") is not None:
        warnings.append(f"{litellm_id}: off_peak_pricing not understood, peak rates kept")
    if is_claude:
        search = spec.get("search_context_cost_per_query")
        if isinstance(search, dict):
            price = search.get("search_context_size_medium", search.get("search_context_size_low"))
            price = to_decimal(price)
            if price is not None:
                entry["per_request"] = {"web_search_requests": price}
    if isinstance(spec.get("deprecation_date"), str):
        entry["deprecation_date"] = spec["deprecation_date"]
    entry["litellm_key"] = litellm_id
    return entry


def _litellm_off_peak(raw: object) -> dict | None:
    if not isinstance(raw, dict):
        return None
    rates = {}
    for litellm_name, rate in (("input_cost_per_token", "input"), ("output_cost_per_token", "output"),
                               ("cache_read_input_token_cost", "cache_read")):
        number = _per_million(raw.get(litellm_name))
        if number is not None:
            rates[rate] = number
    windows = raw.get("windows")
    if not rates or not isinstance(windows, list):
        return None
    converted = []
    for window in windows:
        if not isinstance(window, dict):
            return None
        converted.append({"hours_utc": window.get("hours_utc"), "weekdays": window.get("weekdays")})
    off_peak = {**rates, "windows_utc": converted}
    try:
        _windows(converted, _Where("", "", ""))
    except PricingError:
        return None
    return off_peak


def _per_million(value: object) -> Decimal | None:
    """LiteLLM's USD-per-token float as exact USD per 1M tokens (Decimal(repr(x)) * 10**6)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = to_decimal(value)
    if number is None or number < 0:
        return None
    return _canon(number * 10**6)


def _with_bundled_identity(key: str, entry: dict, bundled: PriceTable) -> dict:
    """Keep the bundled entry's aliases and per-request prices, which LiteLLM does not carry."""
    known = bundled.models.get(key)
    if known is None:
        return entry
    entry = dict(entry)
    if known.aliases and "aliases" not in entry:
        entry["aliases"] = list(known.aliases)
    if known.per_request and "per_request" not in entry:
        entry["per_request"] = dict(known.per_request)
    return entry


def _rate_signature(entry: Mapping[str, object]) -> str:
    """What an entry bills, ignoring names, notes and provenance: for 'changed vs bundled'."""
    def strip(value: object) -> object:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in sorted(value.items())
                    if v is not None and k not in ("source", "note", "notes")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, (Decimal, float)) and not isinstance(value, bool):
            return _plain(to_decimal(value))
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value
    billed = {k: v for k, v in entry.items() if k in TOKEN_RATES + SERVICE_COLUMNS
              or k in ("tiers", "off_peak", "per_request")}
    return json.dumps(strip(billed), sort_keys=True)


