"""`halton-meter pricing show [MODEL]`: the rate table as text or JSON, and how a name resolves."""

from __future__ import annotations

from decimal import Decimal
from typing import Mapping, Sequence

from halton_meter.pricing import TOKEN_RATES, PriceTable, Rates, Window, _plain

def describe(table: PriceTable, model: str | None = None) -> str:
    """Every model as an aligned table, or how one model id resolves and all its rates."""
    if model is not None:
        return _describe_model(table, model)
    rows = [("PROVIDER", "MODEL", "INPUT", "OUTPUT", "CACHE READ", "CACHE WRITE", "TIER", "SOURCE")]
    for rates in sorted(table.models.values(), key=lambda r: (r.provider, r.key)):
        rows.append((rates.provider, rates.key, _plain(rates.input), _plain(rates.output),
                     _show(rates.cache_read), _cache_writes(rates.base),
                     ",".join(t.label for t in rates.tiers) or "-", rates.layer))
    return _header(table) + "\n" + _align(rows)


def describe_json(table: PriceTable, model: str | None = None) -> dict:
    """What `describe` shows, as JSON-able data (rates as exact decimal strings)."""
    if model is None:
        return {"as_of": table.as_of, "layers": [dict(layer) for layer in table.layers],
                "units": "USD per 1M tokens; per_request USD each",
                "models": [_entry_json(rates) for rates in
                           sorted(table.models.values(), key=lambda r: (r.provider, r.key))]}
    found = table.resolve_how(model)
    if found is None:
        return {"query": model, "priced": False, "message": _not_priced(model)}
    key, how = found
    return {"query": model, "priced": True, "key": key, "resolution": how,
            "model": _entry_json(table.models[key])}


def _entry_json(rates: Rates) -> dict:
    def convert(value: object) -> object:
        if isinstance(value, Mapping):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, Decimal):
            return _plain(value)
        return value
    body = convert(dict(rates.entry))
    body.update({"key": rates.key, "provider": rates.provider, "layer": rates.layer})
    for name in TOKEN_RATES:
        body.setdefault(name, None)
    return body


def _describe_model(table: PriceTable, model: str) -> str:
    found = table.resolve_how(model)
    if found is None:
        return _not_priced(model)
    key, how = found
    rates = table.models[key]
    lines = [f"{model} → {key} ({how})" if model != key else f"{key} (exact)"]
    origin = f"from the {rates.layer} table" + (f" as of {rates.as_of}" if rates.as_of else "")
    lines.append(f"provider {rates.provider}, {origin}")
    if rates.deprecation_date:
        lines.append(f"deprecation date {rates.deprecation_date}")
    if rates.aliases:
        lines.append("aliases: " + ", ".join(rates.aliases))
    lines.append("")
    base = rates.base
    sets = [("standard", base)]
    for tier in rates.tiers:
        sets.append((f"prompt {tier.label}", {**base, **tier.rates}))
    for name, column in [*rates.columns.items(), *([("off_peak", rates.off_peak)] if rates.off_peak else [])]:
        merged = {**base, **column.rates}
        sets.append((name.replace("_", "-"), merged))
        for tier in column.tiers:
            sets.append((f"{name} {tier.label}", {**merged, **tier.rates}))
    shown = [name for name in TOKEN_RATES if any(values.get(name) is not None for _, values in sets)]
    rows = [("USD per 1M tokens", *[name.replace("_", " ") for name in shown])]
    rows += [(label, *[_show(values.get(name)) for name in shown]) for label, values in sets]
    lines.append(_align(rows))
    if any(values.get(name) is None for _, values in sets for name in shown):
        lines.append("- : no rate of its own; billed at the input rate (reasoning: at output)")
    if rates.off_peak is not None:
        lines.append("off-peak (UTC): " + "; ".join(_show_window(w) for w in rates.off_peak.windows))
    for item, price in rates.per_request.items():
        lines.append(f"per request: {item} ${_plain(price)}")
    notes = rates.entry.get("notes")
    if isinstance(notes, str):
        lines.append(f"notes: {notes}")
    return "\n".join(lines)


def _not_priced(model: str) -> str:
    return (f"{model}: not priced: no entry in the rate table matches it; add it under "
            "[pricing.models] in config.toml or run `halton-meter pricing import FILE`.")


def _header(table: PriceTable) -> str:
    return f"Rates in USD per 1M tokens; {table.describe_source()}."


def _show(rate: Decimal | None) -> str:
    return "-" if rate is None else _plain(rate)


def _cache_writes(base: Mapping[str, Decimal | None]) -> str:
    writes = [f"{name.rsplit('_', 1)[1]} {_plain(base[name])}" for name in
              ("cache_write_5m", "cache_write_1h", "cache_write_30m", "cache_write_12h")
              if base[name] is not None]
    return " / ".join(writes) or "-"


_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _show_window(window: Window) -> str:
    days = ",".join(_DAY_NAMES[d - 1] for d in sorted(window.weekdays))
    spans = ", ".join("all day" if (s, e) == (0, 86400) else f"{s // 3600:02d}:{s % 3600 // 60:02d}-"
                      f"{e // 3600:02d}:{e % 3600 // 60:02d}" for s, e in window.spans)
    return f"{days} {spans}"


def _align(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)

