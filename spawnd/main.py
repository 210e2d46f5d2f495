"""spawnd: the daemon's command line.

Exit status: 0 after a clean shutdown (or a valid config with -t), 1 when the config is
invalid or a pool's socket cannot be set up (nothing is started then), 2 on usage errors.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .log import log

DEFAULT_CONFIG = "/etc/spawnd/spawnd.yaml"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="spawnd",
        description="Supervise FastCGI back ends: bind each pool's socket once, start its "
                    "children with the socket on fd 0, restart them, stop them cleanly.",
        epilog="Signals: TERM/INT stop every pool and exit 0; HUP reloads the config; "
               "USR1 reopens log files. See spawnd(8) and spawnd.yaml(5).")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"configuration file (default: {DEFAULT_CONFIG})")
    p.add_argument("-t", "--check", action="store_true",
                   help="validate the configuration and its includes, then exit; "
                        "binds nothing, starts nothing")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    p.add_argument("-V", "--version", action="version", version=f"spawnd {__version__}")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from . import config as configmod
    from .supervisor import Supervisor
    if args.debug:
        log.level = log.DEBUG
    try:
        config = configmod.load(args.config)
    except configmod.ConfigError as e:
        for line in e.errors:
            log.error(line)
        log.error(f"{args.config}: configuration invalid; nothing started")
        return 1
    if args.check:
        print("configuration OK")
        return 0
    from . import systemd
    try:
        passed = systemd.listen_fds()
    except systemd.SystemdError as e:
        log.error(f"socket activation: {e}")
        return 1
    sup = Supervisor(config, os.path.abspath(args.config), passed=passed,
                     notify=systemd.Notifier.from_environ())
    errors = sup.bind_all() or sup.open_admin() or sup.open_metrics()
    if errors:
        for line in errors:
            log.error(line)
        for pool in sup.pools.values():
            pool.bound.close()
        if sup.admin is not None:
            sup.admin.close()
        log.error("cannot set up every socket; nothing started")
        return 1
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
