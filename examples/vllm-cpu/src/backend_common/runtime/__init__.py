"""The worker's machinery: everything ``run(EngineCls)`` needs besides the engine.

Engine code never imports from here; ``backend_common.run`` loads it lazily. Inside, the
worker (``worker``) composes discovery (``backend_common.discovery``), a request plane
(``backend_common.transport``) and these modules:

``runner``          ``run``/``serve``: argv -> engine -> ``Worker(...).run()`` -> exit code
``worker``          start-up, registration, admission, graceful shutdown
``adapter``         one accepted request: call home, ``engine.generate``, stream, terminal
``request_policy``  request checks before ``generate`` (context length, vocabulary)
``kv_routing``      hands the engine its KV event and snapshot publishers
``zmq_source``      relays an engine's own ZMQ KV event socket (``ZmqSource``)
``health``          the health canary's payload
``canary``          the health canary on an idle worker (``DYN_HEALTH_CHECK_ENABLED``)
``status``          the system HTTP server (``/health``, ``/live``, ``/metrics``, files)
``metrics``         the worker's Prometheus metrics
``engine_metrics``  the engine's global-registry / multiprocess metrics on ``/metrics``
``modelcard``       the model card published in discovery
``tracing``         the optional OpenTelemetry span around ``generate``
``log``             logging set-up

Nothing outside ``runtime`` imports it, except ``backend_common.run`` (lazily).
"""
