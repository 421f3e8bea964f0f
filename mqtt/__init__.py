"""The MQTT contract between the control plane and agents: topic names and the payload codec.

Imported as ``edgectl.mqtt``; the messages themselves are defined in ``protos/v1/mqtt.proto``.
One job per module (a test keeps this list complete):

- ``wire``: device ids, topic names and the proto3-JSON payload codec both sides use.
- ``orders``: signed orders: the canonical bytes of a desired state and of a fleet-key rotation,
  signed by the control plane and verified by the agent.
"""
