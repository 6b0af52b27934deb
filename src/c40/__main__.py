from c40.cli import main

raise SystemExit(main())
