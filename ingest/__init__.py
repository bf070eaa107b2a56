"""The ingest crew: MQTT sensors and gateways into ``wd:readings:v1``, with no loss after the broker took a message.

* :mod:`ingest.validate`: strict validation into normalized readings and quarantine reasons;
* :mod:`ingest.store`: the dedupe-and-append script and quarantine writes;
* :mod:`ingest.mqtt`: paho-mqtt 2 intake with late PUBACKs;
* :mod:`ingest.ratelimit`: per-device token buckets;
* :mod:`ingest.crew`: the loop that ties them together (``waterdoctor ingest``).
"""

from ingest.crew import IngestConfig, IngestCrew, IngestStats
from ingest.validate import validate_message

__all__ = ["IngestConfig", "IngestCrew", "IngestStats", "validate_message"]
