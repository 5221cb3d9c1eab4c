"""rtcodetr.cache_teacher: run a teacher detector once and cache its features and predictions (zarr v3).

Writer: ``run(CacheConfig) -> dict`` (``rtcodetr cache-teacher``); reader: ``TeacherCache``; tools: ``cache_info``,
``verify``, ``export_hdf5``. Heavy imports (torch, transformers, accelerate) happen only when they are used.
"""
from rtcodetr.cache_teacher.config import CacheConfig, GeometryConfig
from rtcodetr.cache_teacher.manifest import CacheCorruptError, CacheMismatchError, CacheNotFoundError
from rtcodetr.cache_teacher.reader import TeacherCache


def run(cfg: CacheConfig, **kwargs):
    """See ``rtcodetr.cache_teacher.runner.run``."""
    from rtcodetr.cache_teacher.runner import run as _run

    return _run(cfg, **kwargs)


def main(argv=None) -> int:
    from rtcodetr.cache_teacher.cli import main as _main

    return _main(argv)


__all__ = ["CacheConfig", "GeometryConfig", "CacheMismatchError", "CacheCorruptError", "CacheNotFoundError",
           "TeacherCache", "run", "main"]
