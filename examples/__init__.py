"""Examples that use the hand-off layer outside water telemetry."""
