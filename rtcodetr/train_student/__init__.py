"""rtcodetr.train_student stage."""
