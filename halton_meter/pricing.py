"""Exact prices of metered calls: the rate table (bundled, imported, configured) and its arithmetic.

Rates are USD per 1,000,000 tokens held as `Decimal`; a call costs integer nano-dollars. Model-id
resolution follows reference/pricing.md §4, the cost of one call §2, LiteLLM's file format §5.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, localcontext
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import unquote

from halton_meter.adapters.base import BILL_FREE, BILL_NONE, BILL_TOKENS, Usage
from halton_meter.config import make_private_dir

IMPORTED_FILE = "pricing-imported.json"
LAYER_BUNDLED, LAYER_IMPORTED, LAYER_CONFIG = "bundled", "imported", "config"
_LAYER_RANK = {LAYER_BUNDLED: 0, LAYER_IMPORTED: 1, LAYER_CONFIG: 2}

# Token rates of an entry, a tier or a column, in the order they are shown.
TOKEN_RATES = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h",
               "cache_write_30m", "cache_write_12h", "reasoning_output")
# Service tiers with their own rate columns; anything else non-standard is unpriced, never standard.
SERVICE_COLUMNS = ("batch", "flex", "priority", "fast", "scale")
_STANDARD_TIERS = frozenset({"", "default", "standard", "auto", "on_demand", "standard_only"})
_TIER_NAMES = {"on_demand_priority": "priority", "on_demand_flex": "flex"}  # Gemini trafficType
_ENTRY_FIELDS = frozenset(TOKEN_RATES + SERVICE_COLUMNS + (
    "provider", "tiers", "off_peak", "per_request", "aliases", "deprecation_date", "litellm_key",
    "notes", "source"))
_TIER_FIELDS = frozenset(TOKEN_RATES + ("above_input_tokens", "threshold_inclusive", "source", "note"))
_COLUMN_FIELDS = frozenset(TOKEN_RATES + ("tiers", "note", "notes"))
_OFF_PEAK_FIELDS = frozenset(TOKEN_RATES + ("windows_utc", "note", "notes"))

# Usage counters billed per token, beside output: (rate name, Usage attribute).
_COUNTERS = (("input", "input_tokens"), ("cache_read", "cache_read_tokens"),
             ("cache_write_5m", "cache_write_5m_tokens"), ("cache_write_1h", "cache_write_1h_tokens"),
             ("cache_write_30m", "cache_write_30m_tokens"), ("cache_write_12h", "cache_write_12h_tokens"))
_NANOUSD_PER_MTOK_TOKEN = Decimal(1000)  # $1 per 1M tokens is 1000 nano-dollars per token
_NANOUSD_PER_USD = Decimal(10) ** 9
_ZERO = Decimal(0)
# Wide enough that no product or sum of counters and rates is ever rounded before the final step.
_EXACT = Context(prec=80, rounding=ROUND_HALF_EVEN)
_RESOLVE_CACHE_MAX = 4096


class PricingError(ValueError):
    """A rate table, an imported file or a [pricing] override that cannot be used as written."""


@dataclass(frozen=True, slots=True)
class Quote:
    """The price of one call. cost None with no reason: nothing to price (not 'unpriced')."""

    cost_nanousd: int | None
    model_key: str | None
    rates_json: str | None
    unpriced_reason: str | None


@dataclass(frozen=True, slots=True)
class Tier:
    """Long-context rates: from this prompt size on, every token of the call bills at them."""

    above_input_tokens: int
    threshold_inclusive: bool
    rates: Mapping[str, Decimal | None]

    def reached_by(self, prompt_tokens: int) -> bool:
        if self.threshold_inclusive:
            return prompt_tokens >= self.above_input_tokens
        return prompt_tokens > self.above_input_tokens

    @property
    def label(self) -> str:
        sign = ">=" if self.threshold_inclusive else ">"
        return f"{sign}{_short_count(self.above_input_tokens)}"


@dataclass(frozen=True, slots=True)
class Window:
    """Part of the week, in UTC: ISO weekdays (1 = Monday) and [start, end) seconds of the day."""

    weekdays: frozenset[int]
    spans: tuple[tuple[int, int], ...]

    def contains(self, weekday: int, second: int) -> bool:
        return weekday in self.weekdays and any(start <= second < end for start, end in self.spans)


@dataclass(frozen=True, slots=True)
class Column:
    """Rates replacing the standard ones: a service tier (batch, flex…) or off-peak hours."""

    rates: Mapping[str, Decimal | None]
    tiers: tuple[Tier, ...] = ()
    windows: tuple[Window, ...] = ()  # off-peak only


@dataclass(frozen=True, slots=True)
class Rates:
    """One model's rates (USD per 1M tokens; per_request in USD) and where they came from."""

    key: str
    provider: str
    layer: str  # bundled | imported | config
    as_of: str | None
    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None  # None: cached tokens bill at input
    cache_write_5m: Decimal | None = None
    cache_write_1h: Decimal | None = None
    cache_write_30m: Decimal | None = None
    cache_write_12h: Decimal | None = None
    reasoning_output: Decimal | None = None  # None: reasoning bills at output
    tiers: tuple[Tier, ...] = ()
    columns: Mapping[str, Column] = field(default_factory=dict)  # batch, flex, priority…
    off_peak: Column | None = None
    per_request: Mapping[str, Decimal] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    deprecation_date: str | None = None
    entry: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)
    _plans: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def batch(self) -> Column | None:
        return self.columns.get("batch")

    @property
    def base(self) -> dict[str, Decimal | None]:
        return {name: getattr(self, name) for name in TOKEN_RATES}

    def plan(self, service_tier: str | None, prompt_tokens: int, at: float | None) -> _Plan | str:
        """The rates a call bills at, or why it cannot be priced."""
        column_name = _column_name(service_tier)
        if column_name is None:
            column = None
            if self.off_peak is not None and _is_within(self.off_peak.windows, at):
                column_name, column = "off_peak", self.off_peak
        else:
            column = self.columns.get(column_name)
            if column is None and column_name == "fast" and self.provider == "openai":
                column = self.columns.get("priority")  # OpenAI reports and bills `fast` as priority
            if column is None:
                return f"no {column_name} rates for {self.key}"
        tiers = self.tiers if column is None else column.tiers
        tier_index = _reached(tiers, prompt_tokens)
        if column is not None and not column.tiers:
            standard_tier = _reached(self.tiers, prompt_tokens)
            if standard_tier is not None:
                # The table gives no long-context rates for this column: billing the column's
                # short-context rates would under-count, so say so instead.
                limit = self.tiers[standard_tier].label
                return f"no {column_name} rates for {self.key} at {limit} prompt tokens"
        memo_key = (column_name, tier_index)
        plan = self._plans.get(memo_key)
        if plan is None:
            tier = tiers[tier_index] if tier_index is not None else None
            plan = self._plans[memo_key] = _Plan.build(self, column_name or "standard", column, tier)
        return plan


@dataclass(frozen=True, slots=True)
class _Plan:
    """The effective rates of one (column, tier) of a model, nulls already resolved."""

    counter_rates: tuple[Decimal, ...]  # per _COUNTERS
    output: Decimal
    reasoning_output: Decimal | None
    per_request: Mapping[str, Decimal]
    rates_json: str
    column: str
    # Cache-write counters a service column (batch, priority…) gives no rate for: billing them at
    # the standard rate would be a guess, so such a call is unpriced instead.
    unlisted: tuple[str, ...] = ()

    def missing_rate(self, usage: Usage) -> str | None:
        for name, attribute in _COUNTERS:
            if name in self.unlisted and getattr(usage, attribute):
                return name
        return None

    @classmethod
    def build(cls, rates: Rates, column_name: str, column: Column | None, tier: Tier | None) -> _Plan:
        effective = rates.base
        unlisted: tuple[str, ...] = ()
        if column is not None:
            effective.update(column.rates)
            unlisted = tuple(name for name, _ in _COUNTERS if name.startswith("cache_write")
                             and rates.base[name] is not None and column.rates.get(name) is None)
        if tier is not None:
            effective.update(tier.rates)
        input_rate = effective["input"] if effective["input"] is not None else rates.input
        output_rate = effective["output"] if effective["output"] is not None else rates.output
        at_input = [name for name, _ in _COUNTERS if effective[name] is None]
        counter_rates = tuple(input_rate if effective[name] is None else effective[name]
                              for name, _ in _COUNTERS)
        shown = {name: _plain(rate) for (name, _), rate in zip(_COUNTERS, counter_rates)}
        shown["output"] = _plain(output_rate)
        if effective["reasoning_output"] is not None:
            shown["reasoning_output"] = _plain(effective["reasoning_output"])
        audit = {
            "key": rates.key, "provider": rates.provider, "layer": rates.layer, "as_of": rates.as_of,
            "column": column_name,
            "tier": None if tier is None else {"above_input_tokens": tier.above_input_tokens,
                                               "threshold_inclusive": tier.threshold_inclusive},
            "rates": shown, "billed_at_input": at_input,
            "per_request": {name: _plain(price) for name, price in rates.per_request.items()},
            "units": "USD per 1M tokens; per_request USD each",
        }
        return cls(counter_rates, output_rate, effective["reasoning_output"], rates.per_request,
                   json.dumps(audit, sort_keys=True, separators=(",", ":")), column_name, unlisted)

    def cost_nanousd(self, usage: Usage) -> int:
        with localcontext(_EXACT):
            total = _ZERO
            for (_, attribute), rate in zip(_COUNTERS, self.counter_rates):
                count = getattr(usage, attribute)
                if count:
                    total += rate * count
            output = usage.output_tokens
            if self.reasoning_output is not None and usage.reasoning_tokens:
                reasoning = min(usage.reasoning_tokens, output)
                total += self.reasoning_output * reasoning
                output -= reasoning
            if output:
                total += self.output * output
            nanousd = total * _NANOUSD_PER_MTOK_TOKEN
            for name, count in usage.billed_items.items():
                price = self.per_request.get(name)
                if price is not None and isinstance(count, int) and count > 0:
                    nanousd += price * count * _NANOUSD_PER_USD
            return int(nanousd.to_integral_value(rounding=ROUND_HALF_EVEN))


class PriceTable:
    """Every model's rates, with the resolution of client model ids to table keys."""

    def __init__(self, models: Mapping[str, Rates], *, as_of: str | None = None,
                 source: object = None, layers: Sequence[Mapping[str, object]] = ()) -> None:
        self.models = dict(models)
        self.as_of = as_of
        self.source = source
        self.layers = tuple(layers)
        self._index: dict[str, tuple[str, bool]] = {}  # lowercase id -> (key, via an alias)
        for rates in sorted(self.models.values(), key=lambda r: _LAYER_RANK.get(r.layer, 9)):
            for alias in rates.aliases:
                self._index[alias] = (rates.key, True)  # a later layer's alias wins
        for key in self.models:
            self._index[key] = (key, False)  # a key always beats an alias
        self._resolved: dict[tuple[str, str | None], tuple[str, str] | None] = {}

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, home: Path | None = None, overrides: Mapping[str, object] | None = None) -> PriceTable:
        """The bundled table, then `<home>/pricing-imported.json`, then `[pricing.models]` from
        `<home>/config.toml`, then `overrides` ({model id: entry}); later layers replace whole
        entries. Without `home` only the bundled table and `overrides` are read."""
        text = resources.files("halton_meter").joinpath("pricing.json").read_text(encoding="utf-8")
        document = json.loads(text, parse_float=Decimal)
        models = parse_models(document, "the bundled pricing.json", LAYER_BUNDLED,
                              "reinstall halton-meter")
        layers = [{"layer": LAYER_BUNDLED, "as_of": document.get("as_of"), "models": len(models)}]
        if home is not None:
            imported_path = Path(home) / IMPORTED_FILE
            if imported_path.exists():
                imported = _read_imported(imported_path)
                layer = parse_models(imported, str(imported_path), LAYER_IMPORTED,
                                     "run `halton-meter pricing import FILE` again or delete the file")
                models.update(layer)
                layers.append({"layer": LAYER_IMPORTED, "as_of": imported.get("as_of"),
                               "path": str(imported_path), "models": len(layer)})
            config_path = Path(home) / "config.toml"
            configured = _read_config_models(config_path)
            if configured:
                layer = _parse_overrides(configured, str(config_path), models)
                models.update(layer)
                layers.append({"layer": LAYER_CONFIG, "path": str(config_path), "models": len(layer)})
        if overrides:
            layer = _parse_overrides(overrides, "the pricing overrides", models)
            models.update(layer)
            layers.append({"layer": LAYER_CONFIG, "path": None, "models": len(layer)})
        return cls(models, as_of=document.get("as_of"), source=document.get("source"), layers=layers)

    def describe_source(self) -> str:
        """One line naming the layers in use, e.g. for the `serve` banner."""
        parts = []
        for layer in self.layers:
            if layer["layer"] == LAYER_BUNDLED:
                parts.append(f"bundled table as of {layer.get('as_of')} ({layer['models']} models)")
            elif layer["layer"] == LAYER_IMPORTED:
                parts.append(f"imported {layer.get('as_of')} ({layer['models']} models)")
            else:
                parts.append(f"{layer['models']} config override(s)")
        return "; ".join(parts) or f"{len(self.models)} models"

    # ---- resolution ------------------------------------------------------------------------

    def resolve(self, model: str, provider: str | None = None) -> tuple[str, Rates] | None:
        """(table key, rates) for a model id as a client or provider wrote it, else None."""
        found = self.resolve_how(model, provider)
        return None if found is None else (found[0], self.models[found[0]])

    def resolve_how(self, model: str, provider: str | None = None) -> tuple[str, str] | None:
        """(table key, how it was found: 'exact', 'alias', 'date suffix'…), else None."""
        cache_key = (model, provider)
        try:
            return self._resolved[cache_key]
        except KeyError:
            pass
        found = self._resolve(model, provider)
        if len(self._resolved) >= _RESOLVE_CACHE_MAX:
            self._resolved.clear()  # ids come from traffic: keep a flood of junk names bounded
        self._resolved[cache_key] = found
        return found

    def _resolve(self, model: str, provider: str | None) -> tuple[str, str] | None:
        name = model.strip().lower()
        for form, steps in _forms(name, provider):
            for variant, extra in _dotted_variants(form):
                hit = self._index.get(variant)
                if hit is None:
                    continue
                key, via_alias = hit
                how = steps + extra + (("alias",) if via_alias else ())
                return key, ", ".join(how) or "exact"
        return None

    # ---- pricing ---------------------------------------------------------------------------

    def price(self, *, provider: str | None, models: Sequence[str | None], usage: Usage | None,
              billing: str, service_tier: str | None, at: float | None) -> Quote:
        """The cost of one call. `models`: response model first, then the requested one."""
        found = None
        for name in models:
            if name:
                found = self.resolve(name, provider)
                if found is not None:
                    break
        key = found[0] if found is not None else None
        if billing == BILL_FREE:
            return Quote(0, key, None, None)
        if billing == BILL_NONE or usage is None:
            return Quote(None, key, None, None)
        if billing != BILL_TOKENS:
            return Quote(None, key, None, f"unknown billing {billing}")
        if found is None:
            named = next((name for name in models if name), None)
            return Quote(None, None, None, f"unknown model {named}" if named else "no model name")
        rates = found[1]
        prompt_tokens = usage.prompt_tokens
        if usage.request_prompt_range is not None:
            # Summed requests: tiers apply per request, so every request must fall in one tier.
            smallest, largest = usage.request_prompt_range
            if _reached(rates.tiers, smallest) != _reached(rates.tiers, largest):
                return Quote(None, key, None, f"requests on both sides of {rates.key}'s long-context "
                                              "tier in one batch: price them one by one")
            prompt_tokens = largest
        plan = rates.plan(service_tier, prompt_tokens, at)
        if isinstance(plan, str):
            return Quote(None, key, None, plan)
        missing = plan.missing_rate(usage)
        if missing is not None:
            return Quote(None, key, None, f"no {missing} rate in {rates.key}'s {plan.column} rates")
        return Quote(plan.cost_nanousd(usage), key, plan.rates_json, None)


def with_batch_hour_writes(entry: dict) -> dict:
    """Anthropic's batch discount stacks with the prompt-caching multipliers (the snapshot's batch
    5 m writes are exactly half the standard ones); LiteLLM lists no batch 1 h write rate, so it is
    derived the same way rather than left to fall back to the standard rate."""
    batch = entry.get("batch")
    if not isinstance(batch, dict) or batch.get("cache_write_1h") is not None:
        return entry
    if entry.get("cache_write_1h") is None or not entry.get("input") or batch.get("input") is None:
        return entry
    batch = dict(batch, cache_write_1h=entry["cache_write_1h"] * batch["input"] / entry["input"])
    notes = entry.get("notes")
    derived = "batch cache_write_1h derived by halton-meter (batch discount x 1 h write rate)"
    return dict(entry, batch=batch, notes=f"{notes}; {derived}" if notes else derived)


# ---- model ids (pricing.md §4) ---------------------------------------------------------------

# Prefixes clients and gateways put before a model id (OpenRouter slugs, LiteLLM routes, Gemini
# resource paths). Stripping is safe because only exact keys and aliases are ever matched.
_PREFIXES = frozenset({
    "anthropic", "openai", "models", "gemini", "google", "xai", "x-ai", "deepseek", "mistral",
    "mistralai", "meta-llama", "groq", "qwen", "openrouter", "vertex_ai", "bedrock",
})
# On Groq, `openai/…`, `qwen/…` and `meta-llama/…` are the provider's own ids, not prefixes.
_KEEP_PREFIXES = {"groq": frozenset({"openai", "qwen", "meta-llama"})}
_OPENROUTER_VARIANTS = (":thinking", ":online", ":nitro", ":floor", ":extended", ":beta", ":exacto")
_MARKER = re.compile(r"\[[a-z0-9]+\]$")  # Claude Code's `[1m]` display marker
_BEDROCK = re.compile(r"^(?:[a-z]{2,7}(?:-[a-z]+)?\.)?anthropic\.(claude-[a-z0-9.-]+?)"
                      r"(?:-v\d+(?::\d+)?)?(?::\d+k)?$")
_MONTH_DAY = r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
_DATE_SUFFIXES = (
    (re.compile(rf"-20\d\d{_MONTH_DAY}$"), "date suffix"),  # Anthropic -YYYYMMDD
    (re.compile(r"-20\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])$"), "date suffix"),  # OpenAI
    (re.compile(rf"@20\d\d{_MONTH_DAY}$"), "Vertex version"),  # claude-sonnet-4-5@20250929
    (re.compile(r"-(?:0[1-9]|1[0-2])-20\d\d$"), "date suffix"),  # Gemini previews -MM-YYYY
    (re.compile(r"-latest$"), "-latest suffix"),
)
_GROK_DATE = re.compile(rf"^grok-.+(-{_MONTH_DAY})$")  # xAI -MMDD


def _forms(name: str, provider: str | None):
    """The id, then the id with platform wrapping, prefixes and one date suffix taken off."""
    yield name, ()
    steps: tuple[str, ...] = ()
    form = name
    if "%" in form:
        form = unquote(form)  # Bedrock puts the URL-encoded model id or ARN in the path
    if _MARKER.search(form):
        form = _MARKER.sub("", form)
        steps += ("display marker",)
    if form.startswith("arn:"):
        form = form.rsplit("/", 1)[-1]  # …:inference-profile/us.anthropic.claude-…
        steps += ("ARN",)
    bedrock = _BEDROCK.match(form)
    if bedrock:
        form = bedrock.group(1)
        steps += ("Bedrock id",)
    if "/models/" in form:
        form = form.rsplit("/models/", 1)[1]  # projects/…/publishers/google/models/gemini-…
        steps += ("resource path",)
    if form.endswith(_OPENROUTER_VARIANTS):
        form = form.rsplit(":", 1)[0]
        steps += ("OpenRouter variant",)
    if form != name:
        yield form, steps
    keep = _KEEP_PREFIXES.get(provider or "", frozenset())
    while "/" in form:
        head, rest = form.split("/", 1)
        if head not in _PREFIXES or head in keep:
            break
        form = rest
        if "provider prefix" not in steps:
            steps += ("provider prefix",)
        yield form, steps
    for pattern, label in _DATE_SUFFIXES:
        if pattern.search(form):
            yield pattern.sub("", form), steps + (label,)
            return
    grok = _GROK_DATE.match(form)
    if grok:
        yield form[: -len(grok.group(1))], steps + ("date suffix",)


def _dotted_variants(form: str):
    """The form, and for Claude ids with dotted versions (OpenRouter) the dashed form."""
    yield form, ()
    if form.startswith("claude-") and "." in form:
        yield re.sub(r"(?<=\d)\.(?=\d)", "-", form), ("dotted version",)


# ---- service tiers, tiers, off-peak ----------------------------------------------------------


def _column_name(service_tier: str | None) -> str | None:
    """None for standard rates, else the rate column a service tier bills at."""
    if service_tier is None:
        return None
    name = service_tier.strip().lower()
    if name in _STANDARD_TIERS:
        return None
    return _TIER_NAMES.get(name, name)


def _reached(tiers: tuple[Tier, ...], prompt_tokens: int) -> int | None:
    """Index of the highest tier the prompt reaches (tiers are sorted by threshold)."""
    reached = None
    for index, tier in enumerate(tiers):
        if tier.reached_by(prompt_tokens):
            reached = index
    return reached


def _is_within(windows: tuple[Window, ...], at: float | None) -> bool:
    if at is None:
        return False  # no request time: the base (peak) rates, an upper bound
    try:
        moment = datetime.fromtimestamp(at, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return False
    second = moment.hour * 3600 + moment.minute * 60 + moment.second
    weekday = moment.isoweekday()
    return any(window.contains(weekday, second) for window in windows)


# ---- parsing and validation ------------------------------------------------------------------


def parse_models(document: object, origin: str, layer: str, fix: str) -> dict[str, Rates]:
    """The `models` of a table document ({"as_of", "source", "models": {key: entry}})."""
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise PricingError(f"{origin} has no \"models\" object; {fix}.")
    as_of = document.get("as_of")
    as_of = as_of if isinstance(as_of, str) else None
    models: dict[str, Rates] = {}
    for key, raw in document["models"].items():
        rates = parse_entry(str(key), raw, origin=origin, layer=layer, fix=fix, as_of=as_of)
        models[rates.key] = rates
    return models


def parse_entry(key: str, raw: object, *, origin: str, layer: str, fix: str,
                as_of: str | None = None, default_provider: str = "custom") -> Rates:
    """One model's entry, validated; errors name the file and the model and say how to fix."""
    key = key.strip().lower()
    where = _Where(origin, key, fix)
    if not key:
        raise PricingError(f"{origin} has a model with an empty name; {fix}.")
    if not isinstance(raw, Mapping):
        where.fail("is not a table of rates")
    unknown = sorted(set(raw) - _ENTRY_FIELDS)
    if unknown:
        where.fail(f"has unknown field {unknown[0]!r} (known: input, output, cache_read, "
                   "cache_write_5m, cache_write_1h, cache_write_30m, cache_write_12h, tiers, batch, …)")
    if raw.get("input") is None or raw.get("output") is None:
        where.fail("needs both an input and an output rate")
    base = {name: _rate(raw.get(name), where, name) for name in TOKEN_RATES}
    provider = raw.get("provider", default_provider)
    if not isinstance(provider, str) or not provider.strip():
        where.fail("has a provider that is not a name")
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        where.fail("has aliases that are not a list of model ids")
    deprecation = raw.get("deprecation_date")
    if deprecation is not None and not isinstance(deprecation, str):
        where.fail("has a deprecation_date that is not a YYYY-MM-DD string")
    columns = {}
    for name in SERVICE_COLUMNS:
        if raw.get(name) is not None:
            columns[name] = _column(raw[name], where, name, _COLUMN_FIELDS)
    off_peak = None
    if raw.get("off_peak") is not None:
        off_peak = _column(raw["off_peak"], where, "off_peak", _OFF_PEAK_FIELDS)
    per_request = raw.get("per_request") or {}
    if not isinstance(per_request, Mapping):
        where.fail("has a per_request that is not a table of {item: USD}")
    per_request = {str(item): _rate(price, where, f"per_request.{item}", required=True)
                   for item, price in per_request.items()}
    entry = _canonical_entry(raw)
    return Rates(
        key=key, provider=provider.strip().lower(), layer=layer, as_of=as_of,
        **base,
        tiers=_tiers(raw.get("tiers"), where, "tiers"), columns=columns, off_peak=off_peak,
        per_request=per_request, aliases=tuple(a.strip().lower() for a in aliases),
        deprecation_date=deprecation, entry=entry,
    )


class _Where:
    """Where a bad value is, for one-sentence errors."""

    def __init__(self, origin: str, key: str, fix: str) -> None:
        self.origin, self.key, self.fix = origin, key, fix

    def fail(self, problem: str):
        raise PricingError(f"{self.origin}: model {self.key!r} {problem}; {self.fix}.")


def _rate(value: object, where: _Where, name: str, required: bool = False) -> Decimal | None:
    if value is None and not required:
        return None
    number = to_decimal(value)
    if number is None or number < 0:
        shown = repr(value) if isinstance(value, str) else str(value)
        where.fail(f"has {name} = {shown}, which is not a non-negative number")
    return number


def to_decimal(value: object) -> Decimal | None:
    """An exact Decimal from JSON (Decimal/int), TOML or Python floats (via repr) or a string."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, Decimal):
            number = value
        elif isinstance(value, int):
            number = Decimal(value)
        elif isinstance(value, float):
            number = Decimal(repr(value))
        elif isinstance(value, str):
            number = Decimal(value.strip())
        else:
            return None
    except InvalidOperation:
        return None
    if not number.is_finite():
        return None
    return _canon(number)


def _canon(number: Decimal) -> Decimal:
    """The same value written without trailing zeros or exponent (3.000000 -> 3, 1E+1 -> 10)."""
    return Decimal(_plain(number))


def _plain(number: Decimal) -> str:
    text = format(number.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _column(raw: object, where: _Where, name: str, allowed: frozenset[str]) -> Column:
    if not isinstance(raw, Mapping):
        where.fail(f"has a {name} that is not a table of rates")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        where.fail(f"has unknown field {unknown[0]!r} in {name}")
    rates = {rate: _rate(raw[rate], where, f"{name}.{rate}") for rate in TOKEN_RATES if rate in raw}
    windows = ()
    if name == "off_peak":
        windows = _windows(raw.get("windows_utc"), where)
    return Column(rates, _tiers(raw.get("tiers"), where, f"{name}.tiers"), windows)


def _tiers(raw: object, where: _Where, name: str) -> tuple[Tier, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        where.fail(f"has {name} that is not a list of tiers")
    tiers = []
    for item in raw:
        if not isinstance(item, Mapping):
            where.fail(f"has a tier in {name} that is not a table")
        unknown = sorted(set(item) - _TIER_FIELDS)
        if unknown:
            where.fail(f"has unknown field {unknown[0]!r} in a tier")
        threshold = to_decimal(item.get("above_input_tokens"))
        if threshold is None or threshold < 0 or threshold != threshold.to_integral_value():
            where.fail(f"has a tier in {name} without a whole above_input_tokens")
        inclusive = item.get("threshold_inclusive", False)
        if not isinstance(inclusive, bool):
            where.fail(f"has a tier in {name} whose threshold_inclusive is not true or false")
        rates = {rate: _rate(item[rate], where, f"tier {rate}") for rate in TOKEN_RATES if rate in item}
        tiers.append(Tier(int(threshold), inclusive, rates))
    return tuple(sorted(tiers, key=lambda tier: (tier.above_input_tokens, tier.threshold_inclusive)))


def _windows(raw: object, where: _Where) -> tuple[Window, ...]:
    """`windows_utc`: [{hours_utc: "HH:MM-HH:MM" or a list of them, weekdays: [1..7]}].

    An end of 00:00 (or 24:00) is midnight at the end of the day; start == end is the whole day;
    a span that wraps past midnight is split in two on the same weekdays.
    """
    if not isinstance(raw, list) or not raw:
        where.fail("has an off_peak without a windows_utc list")
    windows = []
    for item in raw:
        if not isinstance(item, Mapping):
            where.fail("has an off_peak window that is not a table")
        days = item.get("weekdays")
        if not isinstance(days, list) or not days or not all(
                isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 7 for d in days):
            where.fail("has an off_peak window whose weekdays are not ISO weekdays 1-7")
        hours = item.get("hours_utc")
        hours = [hours] if isinstance(hours, str) else hours
        if not isinstance(hours, list) or not hours:
            where.fail("has an off_peak window without hours_utc")
        spans: list[tuple[int, int]] = []
        for text in hours:
            span = _span(text)
            if span is None:
                where.fail(f"has an off_peak span {text!r} that is not HH:MM-HH:MM")
            start, end = span
            if end <= start:
                spans.append((start, 86400))
                if end > 0:
                    spans.append((0, end))
            else:
                spans.append((start, end))
        windows.append(Window(frozenset(days), tuple(spans)))
    return tuple(windows)


_SPAN = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def _span(text: object) -> tuple[int, int] | None:
    match = _SPAN.match(text) if isinstance(text, str) else None
    if match is None:
        return None
    h1, m1, h2, m2 = (int(part) for part in match.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
        return None
    start, end = h1 * 3600 + m1 * 60, h2 * 3600 + m2 * 60
    return start, (0 if end == 86400 else end)


def _canonical_entry(raw: Mapping) -> dict[str, object]:
    """The (validated) entry as given, every rate an exact Decimal: what `describe_json` shows."""
    def convert(value: object, is_rate: bool = False) -> object:
        if isinstance(value, Mapping):
            return {str(k): convert(v, k in TOKEN_RATES) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if is_rate and value is not None:
            return to_decimal(value)
        return value
    entry = convert(raw)
    if isinstance(raw.get("per_request"), Mapping):
        entry["per_request"] = {str(k): to_decimal(v) for k, v in raw["per_request"].items()}
    return entry


def _read_imported(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PricingError(f"{path} is not a readable JSON rate table ({exc}); run "
                           "`halton-meter pricing import FILE` again or delete the file.") from exc
    return document


def _read_config_models(path: Path) -> Mapping[str, object]:
    """`[pricing.models."<id>"]` tables of config.toml (floats read as exact decimals)."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PricingError(f"{path} is not valid TOML ({exc}); fix or remove the file.") from exc
    pricing = data.get("pricing", {})
    if not isinstance(pricing, dict) or not isinstance(pricing.get("models", {}), dict):
        raise PricingError(f"{path}: [pricing.models] must be a table of "
                           "[pricing.models.\"<model id>\"] tables; see the README's pricing section.")
    return pricing.get("models", {})


def _parse_overrides(overrides: Mapping[str, object], origin: str,
                     earlier: Mapping[str, Rates]) -> dict[str, Rates]:
    if not isinstance(overrides, Mapping):
        raise PricingError(f'{origin} is not a table of models; write [pricing.models."<id>"] tables.')
    layer = {}
    for key, raw in overrides.items():
        fix = f'fix or remove [pricing.models."{key}"] in config.toml'
        previous = earlier.get(str(key).strip().lower())
        rates = parse_entry(str(key), raw, origin=origin, layer=LAYER_CONFIG, fix=fix,
                            as_of=None, default_provider=previous.provider if previous else "custom")
        layer[rates.key] = rates
    return layer


# ---- writing exact JSON ----------------------------------------------------------------------


def dumps_exact(value: object, level: int = 0) -> str:
    """JSON with Decimals written as exact plain numbers (json.dumps cannot), indented by two."""
    pad, end = "  " * (level + 1), "  " * level
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {dumps_exact(v, level + 1)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        if not any(isinstance(v, (Mapping, list, tuple)) for v in value):
            return "[" + ", ".join(dumps_exact(v, level + 1) for v in value) + "]"
        return "[\n" + ",\n".join(pad + dumps_exact(v, level + 1) for v in value) + "\n" + end + "]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (Decimal, float)):
        return _plain(to_decimal(value))
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)


def _write_atomically(path: Path, text: str) -> None:
    make_private_dir(path.parent)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise

def _short_count(tokens: int) -> str:
    if tokens % 1_000_000 == 0 and tokens:
        return f"{tokens // 1_000_000}m"
    if tokens % 1000 == 0 and tokens:
        return f"{tokens // 1000}k"
    return str(tokens)
