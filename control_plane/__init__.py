"""gRPC services, durable state and the rollout controller that drives the fleet over MQTT.

Imported as ``edgectl.control_plane``. One job per module:

- ``server``: assembles a replica (``ControlPlane``, ``ControlPlaneConfig``); ``__main__`` serves it.
- ``servicers``: thin gRPC servicers; domain errors become status codes there only; audit of every mutation.
- ``store``, ``db``, ``migrations``: SQLite (WAL) or PostgreSQL behind one SQL layer, migrated on start.
- ``artifacts``: verified uploads into the blob store, lookups, downloads, deletes.
- ``fleet``: enrollment, credentials (scrypt), labels, live device state from MQTT.
- ``rollouts``, ``rollout_store``: operator intent and its persistence (waves, progress, event log).
- ``controller``: the leader's wave-by-wave health-gated rollout and automatic rollback.
- ``desired``: desired state written before it is published, republished on (re)connect.
- ``bus``, ``ingest``: the MQTT connection, batched report ingest, chunk transfer over MQTT.
- ``leader``: one controller per fleet (PostgreSQL advisory lock, or a file lock for SQLite).
- ``metrics``, ``logs``, ``audit``, ``convert``, ``strategy``, ``errors``.
"""
