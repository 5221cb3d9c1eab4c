"""rtcodetr.data stage."""
