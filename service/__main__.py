"""``python -m service`` is the ``medvault`` command."""

from service.cli.main import main

raise SystemExit(main())
