"""rtcodetr.cache_teacher stage."""
