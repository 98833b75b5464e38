from stapo.cli import main

raise SystemExit(main())
