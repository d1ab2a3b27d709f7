from hsmscep.cli import main

raise SystemExit(main())
