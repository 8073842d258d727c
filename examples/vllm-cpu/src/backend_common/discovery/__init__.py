"""Discovery backends: how a worker makes itself known to the Dynamo frontend.

``create_discovery(config)`` picks the backend named by
``WorkerConfig.discovery_backend`` (``etcd``, ``file`` or ``kubernetes``); record and key helpers
live in ``base``. See ``base.Discovery`` for the call contract.
"""

from __future__ import annotations

from ..config import WorkerConfig
from .base import (
    Discovery,
    ReregisteredHook,
    endpoint_record,
    instance_key,
    instance_path,
    model_key,
    model_record,
    nats_transport,
    tcp_transport,
)

__all__ = [
    "Discovery",
    "ReregisteredHook",
    "create_discovery",
    "endpoint_record",
    "instance_key",
    "instance_path",
    "model_key",
    "model_record",
    "nats_transport",
    "tcp_transport",
]


def create_discovery(config: WorkerConfig) -> Discovery:
    """The backend for ``config``; not connected yet (call ``connect()``).

    etcd: ``config.etcd_endpoints`` and ``config.etcd`` (lease TTL, default 10 s; user and
    password; for ``https://`` endpoints the TLS CA and client certificate, PEM file paths
    or PEM text; see ``etcd.EtcdTls``).
    file: ``config.file_kv`` (``DYN_FILE_KV``), else ``$TMPDIR/dynamo_store_kv``.
    kubernetes: the pod identity (``POD_NAME``, ``POD_UID``, ``POD_NAMESPACE``, container mode)
    and ``config.kubeconfig``; see ``kube.KubeDiscovery``. Raises ``InvalidArgument`` when the
    pod identity is incomplete.
    """
    if config.discovery_backend == "etcd":
        from .etcd import EtcdDiscovery

        return EtcdDiscovery.from_options(config.etcd_endpoints, config.etcd)
    if config.discovery_backend == "kubernetes":
        from .kube import KubeDiscovery

        return KubeDiscovery.from_config(config)
    # WorkerConfig accepts only "etcd", "file" and "kubernetes" (it raises for anything else).
    from .file import FileDiscovery, default_root

    return FileDiscovery(config.file_kv or default_root())
