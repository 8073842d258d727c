"""Record what Dynamo 1.6.1's own worker sends to a Kubernetes API server.

Produces ``tests/fixtures/kube-wire-dynamo-1.6.1.json``, the reference the Kubernetes
discovery wire tests compare our worker's requests with. How: the stand-in API server
(``kube_apiserver``), the real 1.6.1 frontend and Dynamo's own mocker
(``python -m dynamo.mocker``), both with ``DYN_DISCOVERY_BACKEND=kubernetes`` and a
``KUBECONFIG`` pointing at the stand-in; the test side publishes an EndpointSlice with the
mocker's pod as a ready endpoint, waits until the frontend lists the model, sends one chat
request, then stops the mocker. Sanitized: the stand-in's random port and the pod uid are
replaced by placeholders, model-card checksums and paths by ``<...>``.

Run: ``DYNAMO_FRONTEND_PYTHON=.venv-dynamo/bin/python python tests/capture_kube_wire.py``.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "template" / "src"))

from kube_apiserver import KubeApiServer  # noqa: E402

from backend_common.devstack.frontend import Frontend, find_frontend_python, hermetic_env  # noqa: E402
from backend_common.devstack.services import ManagedProcess  # noqa: E402
from backend_common.devstack.tinymodel import write_tiny_model  # noqa: E402

NS = "dyn"
POD = "mocker-worker-abc"
POD_UID = "22222222-2222-2222-2222-222222222222"
OUT = Path(__file__).resolve().parent / "fixtures" / "kube-wire-dynamo-1.6.1.json"


def endpoint_slice(pod: str, uid: str, ready: bool) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "backend-abcde",
            "namespace": NS,
            "labels": {
                "nvidia.com/dynamo-discovery-backend": "kubernetes",
                "nvidia.com/dynamo-discovery-enabled": "true",
            },
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["127.0.0.1"],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": NS, "uid": uid},
            }
        ],
    }


def main() -> int:
    python = find_frontend_python()
    assert python, "set DYNAMO_FRONTEND_PYTHON"
    work = Path(tempfile.mkdtemp(prefix="kubecap-"))
    model = write_tiny_model(work / "tiny")
    with KubeApiServer() as api:
        kubeconfig = api.write_kubeconfig(work / "kubeconfig", NS)
        pod_env = {"KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": NS}
        fe = Frontend(
            workdir=work / "fe",
            python=python,
            discovery_backend="kubernetes",
            kubeconfig=kubeconfig,
            extra_env={**pod_env, "POD_NAME": "frontend-0", "POD_UID": "frontend-uid"},
        )
        fe.start()
        env = hermetic_env(
            {
                "DYN_DISCOVERY_BACKEND": "kubernetes",
                "DYN_REQUEST_PLANE": "tcp",
                "DYN_TCP_RPC_HOST": "127.0.0.1",
                "DYN_SYSTEM_HOST": "127.0.0.1",
                "DYN_SYSTEM_PORT": "29123",
                "HF_HUB_OFFLINE": "1",
                "HOME": str(work / "home"),
                **pod_env,
                "POD_NAME": POD,
                "POD_UID": POD_UID,
            }
        )
        argv = [python, "-m", "dynamo.mocker", "--model-path", str(model)]
        argv += ["--model-name", "tiny-mock"]
        mocker = ManagedProcess(argv, env=env, log_path=work / "mocker.log").start()
        try:
            deadline = time.monotonic() + 60
            while not api.requests_to("dynamoworkermetadatas", "PATCH"):
                assert time.monotonic() < deadline, (work / "mocker.log").read_text()[-3000:]
                time.sleep(0.2)
            time.sleep(2)
            api.put_object(
                "apis/discovery.k8s.io/v1", "endpointslices", endpoint_slice(POD, POD_UID, True)
            )
            fe.wait_for_model("tiny-mock", timeout=60, watch=[mocker])
            req = urllib.request.Request(
                fe.base_url + "/v1/chat/completions",
                data=json.dumps(
                    {
                        "model": "tiny-mock",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 3,
                    }
                ).encode(),
                headers={"Content-Type": "application/json"},
            )
            chat = json.loads(urllib.request.urlopen(req, timeout=30).read())
            mocker.terminate(timeout=15)
        finally:
            mocker.terminate(timeout=5)
            fe.stop()
        log = (work / "mocker.log").read_text()
        ids = sorted(set(re.findall(r"instance_id=([0-9a-f]+)", log)))
        records = []
        for r in api.requests:
            headers = {
                k.lower(): v
                for k, v in r.headers.items()
                if k.lower() in ("content-type", "accept", "user-agent")
            }
            records.append(
                {
                    "method": r.method,
                    "path": r.path,
                    "query": r.query,
                    "headers": headers,
                    "body": r.body,
                    "status": r.status,
                }
            )
    text = json.dumps(
        {
            "produced_by": __doc__.strip().splitlines()[0],
            "pod_name": POD,
            "pod_uid": POD_UID,
            "namespace": NS,
            "instance_ids_logged": ids,
            "chat_choices": len(chat.get("choices", [])),
            "requests": records,
        },
        indent=1,
        sort_keys=True,
    )
    text = re.sub(r'"checksum": "blake3:[0-9a-f]+"', '"checksum": "blake3:<checksum>"', text)
    text = text.replace(str(work), "<workdir>")
    OUT.write_text(text + "\n")
    print(f"wrote {OUT} ({len(records)} requests); logged ids {ids}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
