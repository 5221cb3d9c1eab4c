"""``python -m rtcodetr.data ...`` == ``rtcodetr data ...``."""
from rtcodetr.data.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
