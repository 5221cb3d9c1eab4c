"""``python -m rtcodetr.cache_teacher`` / ``accelerate launch -m rtcodetr.cache_teacher``."""
from rtcodetr.cache_teacher.cli import main

raise SystemExit(main())
