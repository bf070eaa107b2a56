"""alerting: anomalies to SMS, at most once per alert and phone.

Modules:

- :mod:`alerting.dispatcher` - :class:`~alerting.dispatcher.Dispatcher`, the one entry point of both inputs
  (Pub/Sub ``wd:alerts:v1`` and the ``alerting`` group on ``wd:anomalies:v1``), and its durable scheduler.
- :mod:`alerting.ledger` - the Redis records that make "claim before send" and deferred work durable.
- :mod:`alerting.routing` - the TOML routing file: validation, quiet hours, escalation.
- :mod:`alerting.sms` - :class:`~alerting.sms.SmsSender`, Twilio (official ``twilio`` package) and dry run.
- :mod:`alerting.body` - SMS text within one GSM-7 segment.
- :mod:`alerting.webhook` - Twilio inbound-message webhook for ``ACK <code>`` replies.
- :mod:`alerting.ratelimit` - per-number send-rate bound.
- :mod:`alerting.metrics` - Prometheus metrics of the crew.
"""
