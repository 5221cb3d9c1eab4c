"""rtcodetr: offline knowledge distillation for real-time object detection.

Stages (each a sub-package with ``run(config)`` and ``main(argv)``): ``data``, ``cache_teacher``, ``train_student``,
``evaluate``. Model presets live in ``rtcodetr.models``.
"""
__version__ = "0.1.0"
