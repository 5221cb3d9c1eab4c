from rtcodetr.cli import main

raise SystemExit(main())
