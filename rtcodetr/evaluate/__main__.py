"""``python -m rtcodetr.evaluate`` / ``accelerate launch -m rtcodetr.evaluate``: same as ``rtcodetr evaluate``."""
from rtcodetr.evaluate.cli import main

raise SystemExit(main())
