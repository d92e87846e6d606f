"""The `corral` command line."""

from __future__ import annotations

import argparse
import sys

import trio

from .errors import CorralError
from .logging import configure_logging


def _base_image(args: argparse.Namespace) -> int:
    from .baseimage import BASE_REF, build_base_image
    from .engine import open_engine

    async def main() -> None:
        async with open_engine(args.engine) as engine:
            def progress(line: str) -> None:
                print(f"  {line}", file=sys.stderr, flush=True)
            if args.if_missing:
                print(f"[corral] ensuring {BASE_REF} exists", file=sys.stderr)
            image_id = await build_base_image(engine, mirror=args.mirror, if_missing=args.if_missing,
                                              progress=progress)
            print(f"{BASE_REF} {image_id}")
    trio.run(main)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corral", description=__doc__)
    p.add_argument("--engine", default=None, help="engine URL (default: $DOCKER_HOST or unix:///var/run/docker.sock)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", action="store_true", default=None, help="JSON logs even on a TTY")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("base-image", help="build corral/worker-base offline from Debian packages")
    b.add_argument("--mirror", default=None, help="Debian mirror (default: $CORRAL_DEBIAN_MIRROR or apt sources)")
    b.add_argument("--if-missing", action="store_true", help="do nothing if the image exists")
    b.set_defaults(fn=_base_image)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)
    try:
        return args.fn(args)
    except CorralError as exc:
        print(f"corral: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
