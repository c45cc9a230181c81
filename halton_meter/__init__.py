"""halton-meter: a local proxy that meters LLM API spend into a SQLite ledger."""

__version__ = "0.1.0"
