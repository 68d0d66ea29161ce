"""`python -m parallel_dispatch`."""

from .cli import main

raise SystemExit(main())
