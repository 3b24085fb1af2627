from scheduler_service.cli import main

raise SystemExit(main())
