"""The worker's machinery: everything ``run(EngineCls)`` needs besides the engine.

Engine code never imports from here; ``backend_common.run`` loads it lazily. Inside, the
worker (``worker``) composes discovery (``backend_common.discovery``), a request plane
(``backend_common.transport``) and these modules:

``runner``          ``run``: argv -> engine -> ``Worker(...).run()`` -> exit code
``worker``          start-up, registration, admission, graceful shutdown (named steps)
``lifecycle``       the worker's phase (INIT ... STOPPED) and its ``forced`` flag
``adapter``         one accepted request: call home, ``engine.generate``, stream, terminal
``health``          the canary payload, the canary, the idle canary and ``/health``
``status``          the system HTTP server (``/health``, ``/live``, ``/metrics``, files)
``kv_events/``      the KV event plane (NATS, ZMQ), publishers, the ``ZmqSource`` relay
``metrics``         the worker's Prometheus metrics
``engine_metrics``  the engine's global-registry / multiprocess metrics on ``/metrics``
``modelcard``       the model card published in discovery
``tracing``         the optional OpenTelemetry span around ``generate``
``log``             logging set-up

Nothing outside ``runtime`` imports it, except ``backend_common.run`` (lazily).
"""
