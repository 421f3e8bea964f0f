"""gRPC services, durable state and the rollout controller that drives the fleet over MQTT.

Imported as ``edgectl.control_plane``.
"""
