"""The MQTT contract between the control plane and agents: topic names and the payload codec.

Imported as ``edgectl.mqtt``; the messages themselves are defined in ``protos/v1/mqtt.proto``.
"""
