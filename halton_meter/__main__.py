"""`python -m halton_meter` is the same CLI as `halton-meter`."""

from halton_meter.cli import main

raise SystemExit(main())
