"""Installing and uninstalling halton-meter: shell rc blocks, CA trust, the system proxy."""
