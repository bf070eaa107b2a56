"""Sub-commands of the waterdoctor CLI, one module each."""
