"""The device side: converge to desired state, verify, swap atomically, serve KServe V2.

Imported as ``edgectl.agent``. Never imports torch, ``edgectl.compress`` or
``edgectl.control_plane``: agents run on Jetsons and CPU boxes with their own stack (tested).
One job per module (a test keeps this list complete):

- ``agent``: the process: wires config, state, fetcher, runtime, V2 server, MQTT link, reconcile loop.
- ``config``: typed settings: defaults < config file < environment/flags, plus ``credentials.json``.
- ``enroll``: trades a one-time token and a CSR for this device's credentials, kept 0600.
- ``mqtt_link``: the MQTT v5 link: persistent session, Last Will, thin callbacks into queues.
- ``log_ring``: recent log lines in a bounded ring, secrets redacted, for `edgectl devices logs`.
- ``diagnostics``: the agent's half of `edgectl devices bundle`: config without secrets, versions, doctor.
- ``reconcile``: the loop desired -> fetch -> verify -> stage -> load -> smoke test -> swap -> report.
- ``report``: what the agent tells the control plane: its reported state and its events.
- ``staging``: swaps that wait for a maintenance window: staged on disk, swapped when it opens.
- ``orders``: the check of every desired state: signed by a trusted fleet key, for this device,
  unexpired and newer than the last accepted; fleet-key rotation.
- ``fetch``: ``ArtifactFetcher``: the verified manifest first, then only the chunks this device lacks.
- ``transports``: byte sources of a fetch: gRPC from the control plane, or chunks over MQTT.
- ``presigned``: the third: chunks by presigned blob-store URL (HTTP(S) GET, Range resume).
- ``verify``: every check between a desired digest and a runnable model, each with a refusal reason.
- ``artifacts``: bundles on the device's disk: chunk store, staging, installed artifacts, gc.
- ``state``: ``state.json``, the atomically replaced commit point of every swap.
- ``runtime``: onnxruntime sessions with the device profile's execution-provider order and fallback.
- ``engines``: TensorRT engines: the artifact's prebuilt one when it fits this GPU, else built and cached.
- ``serving``: the served models by name, with a hot swap that never fails a request.
- ``batching``: server-side micro-batching of concurrent requests into one session run.
- ``router``: local-or-burst routing of one call, whatever protocol it came in on; inputs checked first.
- ``canary``: a candidate version on trial beside the current one: the traffic split, tallies, report.
- ``shadow``: background runs of the other version on answered inputs, CPU-bounded; their agreement.
- ``burst``: the burst endpoint's V2 client behind a circuit breaker, and the latency model.
- ``fleet_grant``: this agent run's grant of the fleet's burst budget, from the control plane.
- ``codecs``: KServe V2 tensors <-> numpy for gRPC, the datatype tables.
- ``input_check``: what a request may carry, checked from its headers against the model's inputs
  and the server's limits before any tensor is decoded.
- ``http_codec``: the HTTP half of the codec: JSON tensors and Triton's binary data extension.
- ``v2_server``: the KServe V2 gRPC servicer; agent errors to status codes in one place.
- ``http_server``: KServe V2 over HTTP/REST (aiohttp) beside gRPC, sharing registry and router.
- ``v2_triton``: Triton's ModelConfig, ModelStatistics and RepositoryIndex, built once for both.
- ``model_stats``: per model-version serving statistics in Triton's shape.
- ``tls``: TLS and credentials of the inference listeners and the burst client (0600 files).
- ``metrics``: Prometheus metrics and the rolling window behind the reported stats.
- ``errors``: the agent's named failures.
"""
