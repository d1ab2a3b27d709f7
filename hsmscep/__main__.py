from hsmscep.cli.main import main

raise SystemExit(main())
