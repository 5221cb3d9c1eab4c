"""rtcodetr.evaluate stage."""
