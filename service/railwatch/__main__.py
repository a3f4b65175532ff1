"""`python -m railwatch`."""

from __future__ import annotations

from railwatch.cli import main

raise SystemExit(main())
