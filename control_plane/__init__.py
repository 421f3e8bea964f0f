"""gRPC services, durable state and the rollout controller that drives the fleet over MQTT.

Imported as ``edgectl.control_plane``. One job per module (a test keeps this list complete):

- ``config``: a replica's settings (`control-plane serve`'s flags) and the start-up checks that read them.
- ``server``: assembles a replica (``ControlPlane``): listeners, store, bus, leader.
- ``__main__``: ``python -m edgectl.control_plane serve``, the same command as ``edgectl control-plane serve``.
- ``servicers``: thin gRPC servicers: validate, convert, call the domain object.
- ``rpc``: what every servicer call goes through: domain errors to status codes (the one place),
  failure counts, the audit entry of each mutation, the caller's identity, paging.
- ``store``, ``db``, ``migrations``: SQLite (WAL, one writer) or pooled PostgreSQL behind one SQL layer,
  migrated on start (or by ``edgectl control-plane migrate``).
- ``artifacts``: verified uploads into the blob store, lookups, downloads, deletes.
- ``artifact_records``: what is kept of an artifact, an upload plan, a piece of a download (data only).
- ``chunk_urls``: presigned blob-store URLs for chunks (S3), so bytes bypass the control plane.
- ``fleet``: enrollment, labels, decommissioning, live device state from MQTT.
- ``device_state``: what is known of one device: its record, its models, the MQTT observations (data only).
- ``identity``: what a device proves itself with: scrypt-hashed passwords, hashed enrollment tokens,
  the ``DeviceIdentities`` interface that issues and revokes certificates.
- ``security``: a secured replica's secrets from one directory: fleet CA, token key, TLS
  credentials, the broker admin link that provisions device identities.
- ``revocations``: revoked bearer tokens in the state store, so every replica refuses them.
- ``fleet_key``: the Ed25519 key that signs every desired state, and the chain of its rotations.
- ``limits``: per-caller bounds: open streams per identity, per-peer budgets (failed enrollments,
  chunk bytes over MQTT).
- ``rollouts``, ``rollout_store``: operator intent and its persistence (waves, progress, event log).
- ``controller``: the leader's wave-by-wave health-gated rollout and automatic rollback.
- ``verdict``: what one device's reported state means for its rollout (healthy, failed, skipped, waiting).
- ``controller_loop``: the leader's thread that steps every active rollout when woken or on each tick.
- ``trial_gate``: the soak gate of a canary or shadow rollout (agreement, p99 ratio, not yet known).
- ``follow``: a continuous rollout after its waves: late joiners one by one, leavers sent back.
- ``desired``: desired state written before it is published, republished on (re)connect.
- ``bus``: the MQTT connection: retained desired state out, device reports in.
- ``ingest``: the leader's MQTT loop: batched report and event ingest.
- ``stored_reports``: the last report stored per device, so an unchanged heartbeat is not decoded or
  written; last-seen times written in bulk.
- ``burst_grants``: the fleet's burst budget: shares granted to agents, refilled as they spend.
- ``chunk_server``: artifact chunks over MQTT for broker-only sites, bounded per request and device.
- ``leader``: one controller per fleet (PostgreSQL advisory lock, or a file lock for SQLite).
- ``strategy``: rollout strategies and device selectors, shared with the CLI.
- ``convert``: domain records to protobuf messages and back.
- ``audit``: the audit log of mutating calls.
- ``metrics``: Prometheus metrics on a registry of the replica's own.
- ``fleet_metrics``: ``edgectl_fleet_*`` aggregates folded from the devices' reported states at scrape time.
- ``device_logs``: remote diagnostics: a device's recent log lines over MQTT request/response.
- ``console``: the read-only web console (``--console-listen``): views over the domain objects, an
  aiohttp server with token login and live updates, static pages built with DOM APIs only.
- ``health_port``: the health service alone on a plaintext port, for kubelet's gRPC probes.
- ``logs``: plain-text or JSON-lines logging.
- ``errors``: the package's named failures, one status code each.
"""
