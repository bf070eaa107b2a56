"""Tests of the alerting crew."""
