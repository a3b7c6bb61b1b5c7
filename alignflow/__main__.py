"""`python -m alignflow ...`: the `alignflow` command."""
from alignflow.flows.cli import main

raise SystemExit(main())
