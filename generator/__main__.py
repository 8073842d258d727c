"""``python -m generator <command>``: the template's tooling.

Commands:
  new DEST [key=value ...]   render a new backend project into DEST (updatable with
                             ``copier update``); project_name defaults to DEST's name,
                             author_name/author_email to ``git config user.*``
  examples                   re-render examples/ from the working tree
  check-examples             exit 1, listing the files, if examples/ is stale
  manifest                   rewrite template/src/backend_common/MANIFEST.json
  check-manifest             exit 1, listing the problems, if the manifest is stale
  demo [--dest DEST] [key=value ...]
                             generate a backend and show it answering a chat request
                             through the real Dynamo frontend (file discovery)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .examples import EXAMPLES_DIR, diff_examples, write_examples
from .manifest import check_manifest, write_manifest
from .render import parse_data, render_for_user


def _git_config(key: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "config", "--get", key], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def cmd_new(args: argparse.Namespace) -> int:
    dest = Path(args.dest).resolve()
    try:
        data = parse_data(args.data)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data.setdefault("project_name", dest.name)
    for key, git_key in (("author_name", "user.name"), ("author_email", "user.email")):
        if key not in data and (value := _git_config(git_key)):
            data[key] = value
    missing = [k for k in ("author_name", "author_email") if k not in data]
    if missing:
        print(f"error: give {', '.join(f'{k}=...' for k in missing)}", file=sys.stderr)
        return 2
    if dest.exists() and any(dest.iterdir()):
        print(f"error: {dest} exists and is not empty", file=sys.stderr)
        return 2
    try:
        render_for_user(dest, data, vcs_ref=args.vcs_ref)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Generated {dest}. Next: cd {dest} && make test")
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    for name in write_examples():
        print(f"rendered {EXAMPLES_DIR / name}")
    return 0


def cmd_check_examples(args: argparse.Namespace) -> int:
    differing = diff_examples()
    if differing:
        print("examples/ is stale; run `python -m generator examples`. Differing files:")
        for rel in differing:
            print(f"  examples/{rel}")
        return 1
    print("examples/ matches a fresh render")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    print(f"wrote {write_manifest()}")
    return 0


def cmd_check_manifest(args: argparse.Namespace) -> int:
    problems = check_manifest()
    if problems:
        print("the vendored runtime's MANIFEST.json is stale; run `python -m generator manifest`:")
        for line in problems:
            print(f"  {line}")
        return 1
    print("MANIFEST.json matches the runtime")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.dest, args.data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m generator", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="render a new backend project")
    new.add_argument("dest", help="directory to create")
    new.add_argument("data", nargs="*", help="answers as key=value (see copier.yml)")
    new.add_argument("--vcs-ref", default="HEAD", help="template version (default: HEAD)")
    new.set_defaults(func=cmd_new)
    demo = sub.add_parser("demo", help="generate a backend and chat with it via the frontend")
    demo.add_argument("--dest", default=None, help="where to generate (default build/demo-backend)")
    demo.add_argument("data", nargs="*", help="answers as key=value (see copier.yml)")
    demo.set_defaults(func=cmd_demo)
    for name, func, text in (
        ("examples", cmd_examples, "re-render examples/"),
        ("check-examples", cmd_check_examples, "fail if examples/ is stale"),
        ("manifest", cmd_manifest, "rewrite the vendored runtime's MANIFEST.json"),
        ("check-manifest", cmd_check_manifest, "fail if MANIFEST.json is stale"),
    ):
        sub.add_parser(name, help=text).set_defaults(func=func)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
