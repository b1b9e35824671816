from ocm_cli.main import main

raise SystemExit(main())
