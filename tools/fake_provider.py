"""Run the loopback fake provider (a stand-in for the internet) from a checkout or an install.

    python tools/fake_provider.py --port 9443 --ca-dir /tmp/halton-fake-ca

Then point `halton-meter serve` at it with the `--upstream` and `--upstream-ca` flags it prints.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from halton_meter.fakeprovider import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
