"""Build halton_meter/pricing.json, the bundled rate table, from the pricing snapshot.

    python tools/build_pricing.py [SNAPSHOT] [--output PATH] [--check]

SNAPSHOT defaults to ../shared/reference/pricing-snapshot.json beside the repository. The output
is deterministic: the snapshot's models in its order, numbers written as exact decimals, plus the
per-request prices of billed server tools (reference/pricing.md §2).
"""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from halton_meter.pricing import PricingError, dumps_exact, parse_models, with_batch_hour_writes  # noqa: E402

DEFAULT_SNAPSHOT = REPO.parent / "shared" / "reference" / "pricing-snapshot.json"
DEFAULT_OUTPUT = REPO / "halton_meter" / "pricing.json"

# Anthropic bills web search at $10 per 1,000 searches for current Claude models (LiteLLM
# search_context_cost_per_query; reference/pricing.md §2).
ANTHROPIC_PER_REQUEST = {"web_search_requests": Decimal("0.01")}

# Dated snapshots priced unlike their base model. Without an entry of their own, the date-suffix
# rule (pricing.md §4) would bill them at the base model's rates. Rates from the snapshot's own note
# on gpt-4o ("gpt-4o-2024-05-13 is priced differently (5/15, no cached rate) and is NOT an alias").
EXTRA_MODELS = {
    "gpt-4o-2024-05-13": {
        "provider": "openai", "input": Decimal(5), "output": Decimal(15), "cache_read": None,
        "notes": "added by tools/build_pricing.py from the snapshot's gpt-4o note (pricing.md §3): "
                 "priced 5 / 15 with no cached rate, so it must not fall back to gpt-4o",
    },
}


def build(snapshot: dict) -> dict:
    """The bundled table document from a parsed snapshot (floats parsed as Decimal)."""
    models = {}
    for key, entry in snapshot["models"].items():
        entry = dict(entry)
        if entry.get("provider") == "anthropic":
            if "per_request" not in entry:
                entry["per_request"] = dict(ANTHROPIC_PER_REQUEST)
            entry = with_batch_hour_writes(entry)
        models[key] = entry
    for key, entry in EXTRA_MODELS.items():
        models.setdefault(key, dict(entry))
    conventions = dict(snapshot.get("conventions", {}))
    conventions["per_request"] = ("USD per billed item (Usage.billed_items), e.g. Anthropic "
                                  "server_tool_use.web_search_requests; added by tools/build_pricing.py")
    return {
        "schema": "halton-meter pricing v1: USD per 1,000,000 tokens; per_request in USD",
        "units": snapshot.get("units", "USD per 1,000,000 tokens"),
        "as_of": snapshot["as_of"],
        "source": snapshot.get("source"),
        "conventions": conventions,
        "models": models,
    }


def render(snapshot_path: Path) -> str:
    snapshot = json.loads(Path(snapshot_path).read_text(encoding="utf-8"), parse_float=Decimal)
    document = build(snapshot)
    parse_models(document, str(snapshot_path), "bundled", "fix the snapshot")  # fail before writing
    return dumps_exact(document) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshot", nargs="?", type=Path, default=DEFAULT_SNAPSHOT)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the output file differs from what would be written")
    args = parser.parse_args(argv)
    try:
        text = render(args.snapshot)
    except (OSError, ValueError, KeyError) as exc:
        reason = exc if isinstance(exc, PricingError) else f"{type(exc).__name__}: {exc}"
        print(f"Cannot build from {args.snapshot}: {reason}", file=sys.stderr)
        return 1
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date; run python tools/build_pricing.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(document_models(text))} models)")
    return 0


def document_models(text: str) -> dict:
    return json.loads(text, parse_float=Decimal)["models"]


if __name__ == "__main__":
    sys.exit(main())
