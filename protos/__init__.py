"""The wire contracts: gRPC services, MQTT payloads and KServe V2, generated from ``*.proto``.

Imported as ``edgectl.protos``. Regenerate with ``make proto``; a test proves the
committed modules match the ``.proto`` files.
"""

# ``edgectl.protos.inference`` defines the standard ``inference.*`` V2 messages, as
# tritonclient's and KServe's own generated modules do; protobuf refuses two definitions of
# one name in a process, so a process uses one of them (the wire format is the same).
