"""``python -m rtcodetr.train_student`` and ``accelerate launch -m rtcodetr.train_student``."""
from rtcodetr.train_student.train import main

if __name__ == "__main__":
    raise SystemExit(main())
