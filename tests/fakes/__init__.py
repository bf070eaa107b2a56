"""Fakes of services we do not own (Twilio)."""
