"""waterdoctor."""
