"""spawnd.config: YAML -> frozen dataclasses, and every error with file, line and key path.

Pure and fast: files are written under tmp_path; the users, groups, programs and
directories used exist on a Debian 12 machine (nobody/nogroup/www-data, /bin/cat,
/usr/bin/php-cgi, /var/www). The one test that needs another uid runs a real Python
process as nobody.
"""

import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest
import yaml

from spawnd import config
from spawnd.config import (Backoff, Config, ConfigError, Daemon, Listen, Pool, Probe, Processes,
                           Recycle, SocketOptions, Stop, load, parse_duration, parse_listen,
                           parse_mode, parse_size)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (other users, uid-0 rules)")
# A user the children may run as: nobody when we are root, else ourselves.
USER = "nobody" if ROOT else pwd.getpwuid(os.geteuid()).pw_name


def write(dirpath, name, text):
    path = os.path.join(dirpath, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip("\n"))
    return path


def errors_of(path):
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    assert str(err) == "\n".join(err.errors)
    return err.errors


# ---------------------------------------------------------------------------------------
# Valid configurations

SPEC_EXAMPLE = """
spawnd:
  admin_socket: /run/spawnd/spawnd.sock
  admin_mode: "0600"
  admin_group: null
  include: pools.d/*.yaml
  shutdown_timeout: 30s

pools:
  php:
    command: [/usr/bin/php-cgi]
    listen: unix:/run/spawnd/php.sock
    socket: {mode: "0660", owner: www-data, group: www-data, backlog: 1024}
    processes: 4
    user: www-data
    group: www-data
    cwd: /var/www
    chroot: null
    umask: "0022"
    env: {PHP_FCGI_MAX_REQUESTS: "500"}
    inherit_env: []
    allowed_clients: [127.0.0.1, "::1"]
    rlimits: {nofile: 4096, core: 0}
    restart: always
    backoff: {initial: 100ms, max: 30s, reset_after: 10s}
    ready_after: 100ms
    stop: {signal: TERM, timeout: 10s}
    recycle: {max_age: 6h, max_rss: 512MiB, max_cpu: 90%}
    probe: {uri: /ping, interval: 10s, timeout: 2s, failures: 3, expect: 200}
"""


@needs_root
@pytest.mark.skipif(not os.path.exists("/usr/bin/php-cgi") or not os.path.isdir("/var/www"),
                    reason="needs php-cgi and /var/www")
def test_spec_example_round_trips(tmp_path):
    path = write(tmp_path, "spawnd.yaml", SPEC_EXAMPLE)
    cfg = load(path)
    www = pwd.getpwnam("www-data")
    assert cfg == Config(
        daemon=Daemon(admin_socket="/run/spawnd/spawnd.sock", admin_mode=0o600, admin_group=None,
                      include=(f"{tmp_path}/pools.d/*.yaml",), shutdown_timeout=30.0),
        pools={"php": Pool(
            name="php", command=("/usr/bin/php-cgi",),
            listen=Listen("unix", path="/run/spawnd/php.sock"),
            socket=SocketOptions(mode=0o660, uid=www.pw_uid, gid=www.pw_gid, backlog=1024),
            processes=Processes(4, 4), user="www-data", uid=www.pw_uid, gid=www.pw_gid,
            groups=tuple(os.getgrouplist("www-data", www.pw_gid)), cwd="/var/www", chroot=None,
            umask=0o022, env=(("PHP_FCGI_MAX_REQUESTS", "500"),), inherit_env=(),
            allowed_clients=("127.0.0.1", "::1"),
            rlimits=((resource.RLIMIT_NOFILE, 4096, 4096), (resource.RLIMIT_CORE, 0, 0)),
            restart="always", backoff=Backoff(0.1, 30.0, 10.0), ready_after=0.1,
            stop=Stop(signal.SIGTERM, 10.0), recycle=Recycle(6 * 3600.0, 512 << 20, 90.0),
            probe=Probe("/ping", 10.0, 2.0, 3, 200))},
        files=(path,))
    # The config is immutable all the way down.
    with pytest.raises(Exception):
        cfg.pools["php"].processes.min = 1
    with pytest.raises(TypeError):
        cfg.pools["other"] = None
    # Every key written has a location; "" is the pool's own line.
    where = cfg.pools["php"].where
    assert where[""] == f"{path}:9: pools.php"
    assert where["listen"] == f"{path}:11: pools.php.listen"
    assert where["socket.mode"] == f"{path}:12: pools.php.socket.mode"
    assert where["probe.expect"] == f"{path}:28: pools.php.probe.expect"
    assert cfg.daemon.where["shutdown_timeout"] == f"{path}:6: spawnd.shutdown_timeout"


def test_minimal_pool_gets_the_documented_defaults(tmp_path):
    path = write(tmp_path, "spawnd.yaml", f"""
        pools:
          app:
            command: cat
            listen: unix:app.sock
            user: {USER}
        """)
    cfg = load(path)
    assert cfg.daemon == Daemon()
    assert cfg.files == (path,)
    pool = cfg.pools["app"]
    pw = pwd.getpwnam(USER)
    assert pool.command == ("/usr/bin/cat",)           # found on the default PATH
    assert pool.listen == Listen("unix", path=f"{tmp_path}/app.sock")   # relative to the file
    assert pool.socket == SocketOptions(mode=None, uid=None, gid=None, backlog=1024)
    assert pool.processes == Processes(1, 1)
    assert (pool.user, pool.uid, pool.gid) == (USER, pw.pw_uid, pw.pw_gid)
    assert (pool.cwd, pool.chroot, pool.umask) == (None, None, None)
    assert (pool.env, pool.inherit_env, pool.allowed_clients, pool.rlimits) == ((), (), (), ())
    assert pool.restart == "always"
    assert pool.backoff == Backoff(0.1, 30.0, 10.0)
    assert pool.ready_after == 0.1
    assert pool.stop == Stop(signal.SIGTERM, 10.0)
    assert (pool.recycle, pool.probe) == (None, None)


@pytest.mark.parametrize("text", ["", "# nothing\n", "pools:\n", "pools: {}\n", "spawnd: {}\npools:\n"])
def test_empty_configs_are_valid(tmp_path, text):
    cfg = load(write(tmp_path, "spawnd.yaml", text))
    assert dict(cfg.pools) == {}
    assert cfg.daemon == Daemon()


def test_includes_merge_in_order_and_resolve_relative_paths(tmp_path):
    main = write(tmp_path, "etc/spawnd.yaml", f"""
        spawnd:
          include: [pools.d/*.yaml, /nonexistent/*.yaml, more/*.yaml]
          admin_socket: run/admin.sock
        pools:
          zeta:
            command: [/bin/cat]
            listen: tcp:127.0.0.1:9001
            user: {USER}
        """)
    b = write(tmp_path, "etc/pools.d/b.yaml", f"""
        pools:
          beta: {{command: [/bin/cat], listen: "unix:b.sock", user: {USER}}}
        """)
    a = write(tmp_path, "etc/pools.d/a.yaml", f"""
        pools:
          alpha: {{command: [/bin/cat], listen: "unix:../a.sock", user: {USER}}}
          gamma: {{command: [/bin/cat], listen: "systemd:gamma", user: {USER}}}
        """)
    empty = write(tmp_path, "etc/more/empty.yaml", "")
    write(tmp_path, "etc/pools.d/ignored.yml", "this is not: [read")
    cfg = load(main)
    etc = f"{tmp_path}/etc"
    assert cfg.daemon.include == (f"{etc}/pools.d/*.yaml", "/nonexistent/*.yaml", f"{etc}/more/*.yaml")
    assert cfg.daemon.admin_socket == f"{etc}/run/admin.sock"
    assert cfg.files == (main, empty, a, b)          # main first, then includes sorted by path
    assert list(cfg.pools) == ["zeta", "alpha", "gamma", "beta"]
    assert cfg.pools["beta"].listen.path == f"{etc}/pools.d/b.sock"
    assert cfg.pools["alpha"].listen.path == f"{etc}/a.sock"
    assert cfg.pools["alpha"].where["listen"] == f"{a}:2: pools.alpha.listen"


def test_include_glob_matching_the_main_file_does_not_read_it_twice(tmp_path):
    main = write(tmp_path, "spawnd.yaml", """
        spawnd: {include: "*.yaml"}
        pools:
        """)
    assert load(main).files == (main,)


def test_an_included_file_that_is_not_text_is_named_with_the_include_that_matched_it(tmp_path):
    """A glob that catches a binary (a backup, an editor swap file) names the file, the
    line of the bad byte, and the include line, so the admin knows which glob to fix."""
    main = write(tmp_path, "spawnd.yaml", """
        spawnd:
          include: "pools.d/*"
        pools:
        """)
    (tmp_path / "pools.d").mkdir()
    (tmp_path / "pools.d" / "web.yaml.swp").write_bytes(b"pools:\n  web: {}\n\xa4\x00b0VIM")
    with pytest.raises(ConfigError) as info:
        load(main)
    assert info.value.errors == [
        f"{tmp_path}/pools.d/web.yaml.swp:3: not UTF-8 text (byte 0xa4 at offset 17) "
        f"(matched by {main}:2: spawnd.include)"]


def test_listen_addresses_that_can_coexist(tmp_path):
    """Different ports, families or paths; [::] is IPv6-only so it does not clash with 0.0.0.0."""
    listens = ["tcp:0.0.0.0:9000", "tcp:[::]:9000", "tcp:127.0.0.1:9001", "tcp:127.0.0.2:9001",
               "tcp:[::1]:9001", "unix:a.sock", "unix:b.sock", "systemd:a", "systemd:b"]
    pools = "".join(f'  p{i}: {{command: [/bin/cat], listen: "{l}", user: {USER}}}\n'
                    for i, l in enumerate(listens))
    cfg = load(write(tmp_path, "spawnd.yaml", "pools:\n" + pools))
    assert [str(p.listen) for p in cfg.pools.values()] == [
        l.replace("unix:", f"unix:{tmp_path}/") for l in listens]


def test_forms_of_values(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "myapp").write_text("#!/bin/sh\n")
    path = write(tmp_path, "spawnd.yaml", f"""
        pools:
          a:
            command: "myapp --name 'two words' 3"
            env: {{PATH: "{bindir}:/usr/bin", N: 5, F: 1.5}}
            listen: tcp:[::1]:9000
            processes: {{min: 0, max: 16}}
            user: {USER}
            rlimits:
              nofile: {{soft: 1024, hard: 4096}}
              core: unlimited
              stack: 8MiB
            stop: {{signal: 3}}
            recycle: {{max_cpu: 150}}
            ready_after: 0
            backoff: {{initial: 1.5, max: 1m30s}}
          b:
            command: [./bin/myapp, 1]
            listen: tcp:0.0.0.0:9001
            processes: {{max: 4}}
            user: {USER}
            stop: {{signal: sigquit, timeout: 250ms}}
          c:
            command: [cat]
            env: {{PATH: "bin:/usr/bin"}}
            listen: tcp:localhost:9002
            processes: 0
            user: {USER}
        """)
    cfg = load(path)
    a, b, c = cfg.pools["a"], cfg.pools["b"], cfg.pools["c"]
    assert a.command == (f"{bindir}/myapp", "--name", "two words", "3")
    assert a.env == (("PATH", f"{bindir}:/usr/bin"), ("N", "5"), ("F", "1.5"))
    assert (str(a.listen), a.listen.family, a.listen.host) == ("tcp:[::1]:9000", socket.AF_INET6, "::1")
    assert a.processes == Processes(0, 16)
    inf = resource.RLIM_INFINITY
    assert a.rlimits == ((resource.RLIMIT_NOFILE, 1024, 4096), (resource.RLIMIT_CORE, inf, inf),
                         (resource.RLIMIT_STACK, 8 << 20, 8 << 20))
    assert a.stop.signal == signal.SIGQUIT and a.stop.timeout == 10.0
    assert a.recycle == Recycle(max_age=None, max_rss=None, max_cpu=150.0)
    assert a.ready_after == 0.0
    assert a.backoff == Backoff(initial=1.5, max=90.0, reset_after=10.0)
    assert b.command == (f"{bindir}/myapp", "1")         # relative to the file's directory
    assert (str(b.listen), b.listen.family) == ("tcp:0.0.0.0:9001", socket.AF_INET)
    assert b.processes == Processes(1, 4)                # min defaults to 1
    assert b.stop == Stop(signal.SIGQUIT, 0.25)
    assert c.command == ("/usr/bin/cat",)                # resolved through the pool's PATH
    assert c.processes == Processes(0, 0)
    assert c.listen.host in ("127.0.0.1", "::1")          # resolved at load time


def test_yaml_merge_keys_share_settings(tmp_path):
    path = write(tmp_path, "spawnd.yaml", f"""
        pools:
          a: &common
            command: [/bin/cat]
            listen: tcp:127.0.0.1:9000
            user: {USER}
            processes: 3
          b:
            <<: *common
            listen: tcp:127.0.0.1:9001
        """)
    cfg = load(path)
    assert cfg.pools["b"].processes == Processes(3, 3)
    assert str(cfg.pools["b"].listen) == "tcp:127.0.0.1:9001"
    assert cfg.pools["b"].where["processes"] == f"{path}:6: pools.b.processes"   # where it is written


def test_merge_key_in_flow_style_as_documented(tmp_path):
    path = write(tmp_path, "spawnd.yaml", f"""
        pools:
          a: &php {{command: [cat], listen: "unix:a.sock", user: {USER}, processes: 4}}
          b: {{<<: *php, listen: "unix:b.sock"}}
        """)
    cfg = load(path)
    assert [(str(p.listen), p.processes.max, p.command) for p in cfg.pools.values()] == [
        (f"unix:{tmp_path}/a.sock", 4, ("/usr/bin/cat",)), (f"unix:{tmp_path}/b.sock", 4, ("/usr/bin/cat",))]


def test_chroot_finds_the_program_and_cwd_inside_it(tmp_path):
    jail = tmp_path / "jail"
    (jail / "bin").mkdir(parents=True)
    (jail / "srv").mkdir()
    (jail / "bin" / "app").write_text("")
    path = write(tmp_path, "spawnd.yaml", f"""
        pools:
          jailed:
            command: [app]
            env: {{PATH: /bin}}
            chroot: {jail}
            cwd: srv
            listen: unix:/run/jailed.sock
            user: {USER}
        """)
    if not ROOT:
        assert any("chroot needs root" in e for e in errors_of(path))
        return
    pool = load(path).pools["jailed"]
    assert (pool.command, pool.chroot, pool.cwd) == (("/bin/app",), str(jail), "/srv")


@needs_root
def test_explicit_root_user_and_supplementary_groups(tmp_path):
    path = write(tmp_path, "spawnd.yaml", """
        pools:
          r: {command: [/bin/cat], listen: "tcp:127.0.0.1:9000", user: root}
          w: {command: [/bin/cat], listen: "tcp:127.0.0.1:9001", user: www-data, group: nogroup}
        """)
    cfg = load(path)
    assert (cfg.pools["r"].uid, cfg.pools["r"].gid) == (0, 0)
    w = cfg.pools["w"]
    assert (w.uid, w.gid) == (pwd.getpwnam("www-data").pw_uid, 65534)
    assert w.groups == tuple(os.getgrouplist("www-data", 65534))


@needs_root
def test_when_not_root_other_users_and_chroot_need_root(tmp_path):
    """Load a config in a real process running as nobody."""
    shared = tempfile.mkdtemp(prefix="spawnd-config-")
    try:
        os.chmod(shared, 0o755)
        path = write(shared, "spawnd.yaml", """
            pools:
              mine: {command: [/bin/cat], listen: "tcp:127.0.0.1:9000"}
              other: {command: [/bin/cat], listen: "tcp:127.0.0.1:9001", user: www-data}
              jail: {command: [/bin/cat], listen: "tcp:127.0.0.1:9002", user: nobody, chroot: /}
              sock: {command: [/bin/cat], listen: "unix:s.sock", user: nobody, socket: {owner: www-data}}
            """)
        os.chmod(path, 0o644)
        code = textwrap.dedent(f"""
            from spawnd import config
            try:
                config.load({path!r})
            except config.ConfigError as e:
                print(e)
        """)
        out = subprocess.run([sys.executable, "-c", code], user=65534, group=65534, extra_groups=[],
                             cwd="/", capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines == [
            f"{path}:3: pools.other.user: user 'www-data' needs root (spawnd runs as uid 65534)",
            f"{path}:4: pools.jail.chroot: chroot needs root",
            f"{path}:5: pools.sock.socket.owner: owner 'www-data' needs root",
        ], out.stdout + out.stderr
    finally:
        shutil.rmtree(shared)


# ---------------------------------------------------------------------------------------
# Malformed configurations: each names its file, line and key path

POOL = f"""\
pools:
  web:
    command: [/bin/cat]
    listen: tcp:127.0.0.1:9000
    user: {USER}
"""   # line 1..5; cases append from line 6

# (id, {file: text}, file that has the error, line, key path, text in the message)
CASES = [
    ("yaml-syntax", {"m": POOL + "    processes: [1, 2\n    restart: never\n"}, "m", 7, "syntax error", "expected ',' or ']'"),
    ("yaml-flow-end", {"m": POOL.replace("[/bin/cat]", "[/bin/cat]]")}, "m", 3, "syntax error", "expected <block end>"),
    ("colon-at-end", {"m": POOL.replace("tcp:127.0.0.1:9000", "unix:")}, "m", 4, "syntax error",
     "quote the value"),
    ("tab-indent", {"m": POOL + "\tprocesses: 2\n"}, "m", 6, "syntax error", "tabs cannot indent YAML"),
    ("unknown-top", {"m": POOL + "pool:\n  x: 1\n"}, "m", 6, "pool", "unknown key 'pool' (did you mean 'pools'?)"),
    ("unknown-pool-key", {"m": POOL + "    proceses: 2\n"}, "m", 6, "pools.web.proceses",
     "unknown key 'proceses' (did you mean 'processes'?)"),
    ("unknown-nested", {"m": POOL.replace("tcp:127.0.0.1:9000", "unix:/tmp/w.sock") + '    socket: {mdoe: "0660"}\n'},
     "m", 6, "pools.web.socket.mdoe", "did you mean 'mode'?"),
    ("unknown-daemon-key", {"m": "spawnd:\n  admin_sockets: /tmp/a.sock\n" + POOL}, "m", 2,
     "spawnd.admin_sockets", "did you mean 'admin_socket'?"),
    ("type-processes", {"m": POOL + "    processes: many\n"}, "m", 6, "pools.web.processes",
     "expected a whole number, got 'many'"),
    ("type-env", {"m": POOL + "    env: [A=1]\n"}, "m", 6, "pools.web.env", "expected a mapping of NAME: value, got a list"),
    ("type-env-value", {"m": POOL + "    env:\n      DEBUG: yes\n"}, "m", 7, "pools.web.env.DEBUG",
     "expected a string or number, got a boolean (true)"),
    ("type-command-item", {"m": POOL.replace("[/bin/cat]", "[/bin/cat, {a: 1}]")}, "m", 3, "pools.web.command[1]",
     "expected a string, got a mapping"),
    ("type-pools", {"m": "pools: [web]\n"}, "m", 1, "pools", "expected a mapping of pool names, got a list"),
    ("bad-duration", {"m": POOL + "    ready_after: 10x\n"}, "m", 6, "pools.web.ready_after", "bad duration '10x'"),
    ("zero-duration", {"m": POOL + "    stop: {timeout: 0s}\n"}, "m", 6, "pools.web.stop.timeout", "must be greater than 0"),
    ("bad-size", {"m": POOL + "    recycle:\n      max_rss: 12XB\n"}, "m", 7, "pools.web.recycle.max_rss", "bad size '12XB'"),
    ("mode-unquoted", {"m": POOL.replace("tcp:127.0.0.1:9000", "unix:/tmp/w.sock") + "    socket: {mode: 0660}\n"},
     "m", 6, "pools.web.socket.mode", 'octal modes must be quoted: YAML read this as the number 432; '
                                      'if you meant octal 0660, write "0660"'),
    ("umask-unquoted", {"m": POOL + "    umask: 022\n"}, "m", 6, "pools.web.umask", 'if you meant octal 0022, write "0022"'),
    ("admin-mode-unquoted", {"m": "spawnd:\n  admin_mode: 0600\n" + POOL}, "m", 2, "spawnd.admin_mode", "must be quoted"),
    ("umask-bad", {"m": POOL + '    umask: "0999"\n'}, "m", 6, "pools.web.umask", "bad octal mode '0999'"),
    ("unknown-user", {"m": POOL.replace(f"user: {USER}", "user: no-such-user-xyz")}, "m", 5, "pools.web.user",
     "unknown user 'no-such-user-xyz'"),
    ("unknown-group", {"m": POOL + "    group: no-such-group-xyz\n"}, "m", 6, "pools.web.group",
     "unknown group 'no-such-group-xyz'"),
    ("unknown-socket-group", {"m": POOL.replace("tcp:127.0.0.1:9000", "unix:/tmp/w.sock") + "    socket:\n      group: nogrp\n"},
     "m", 7, "pools.web.socket.group", "unknown group 'nogrp'"),
    ("bad-pool-name", {"m": POOL.replace("  web:", "  Web.App:")}, "m", 2, "pools.Web.App", "bad pool name 'Web.App'"),
    ("listen-no-scheme", {"m": POOL.replace("tcp:127.0.0.1:9000", "/run/web.sock")}, "m", 4, "pools.web.listen",
     "did you mean unix:/run/web.sock?"),
    ("listen-no-scheme-tcp", {"m": POOL.replace("tcp:127.0.0.1:9000", "127.0.0.1:9000")}, "m", 4, "pools.web.listen",
     "did you mean tcp:127.0.0.1:9000?"),
    ("listen-port-range", {"m": POOL.replace("9000", "70000")}, "m", 4, "pools.web.listen", "bad port '70000' (1-65535)"),
    ("listen-v6-brackets", {"m": POOL.replace("tcp:127.0.0.1:9000", '"tcp:::1:9000"')}, "m", 4, "pools.web.listen",
     "an IPv6 address needs brackets, e.g. tcp:[::1]:9000"),
    ("listen-empty-unix", {"m": POOL.replace("tcp:127.0.0.1:9000", '"unix:"')}, "m", 4, "pools.web.listen",
     "empty unix socket path"),
    ("listen-not-a-string", {"m": POOL.replace("tcp:127.0.0.1:9000", "9000")}, "m", 4, "pools.web.listen",
     "got a number (9000)"),
    ("mode-on-tcp", {"m": POOL + '    socket: {mode: "0660"}\n'}, "m", 6, "pools.web.socket.mode",
     "only applies to unix sockets, not tcp:127.0.0.1:9000"),
    ("min-over-max", {"m": POOL + "    processes: {min: 5, max: 2}\n"}, "m", 6, "pools.web.processes",
     "min (5) is greater than max (2)"),
    ("backlog-range", {"m": POOL + "    socket: {backlog: 0}\n"}, "m", 6, "pools.web.socket.backlog", "0 is out of range (1-65535)"),
    ("dup-pool-across-includes", {
        "m": "spawnd: {include: 'p/*.yaml'}\n",
        "p/a.yaml": POOL,
        "p/b.yaml": "# second\n" + POOL.replace("9000", "9001")}, "p/b.yaml", 3, "pools.web",
     "duplicate pool 'web' (already defined at {p/a.yaml}:2)"),
    ("dup-key", {"m": POOL + "    listen: tcp:127.0.0.1:9001\n"}, "m", 6, "pools.web.listen",
     "duplicate key 'listen' (first written at line 4)"),
    ("dup-listen", {"m": POOL + f"  api:\n    command: [/bin/cat]\n    listen: tcp:127.0.0.1:9000\n    user: {USER}\n"},
     "m", 8, "pools.api.listen", "address tcp:127.0.0.1:9000 is already used by pool 'web' ({m}:4: pools.web.listen)"),
    ("dup-listen-wildcard", {"m": POOL + f"  api:\n    command: [/bin/cat]\n    listen: tcp:0.0.0.0:9000\n    user: {USER}\n"},
     "m", 8, "pools.api.listen", "is already used by pool 'web'"),
    ("dup-listen-unix", {"m": POOL.replace("tcp:127.0.0.1:9000", "unix:/run/x.sock")
                         + f"  api:\n    command: [/bin/cat]\n    listen: unix:/run/../run/x.sock\n    user: {USER}\n"},
     "m", 8, "pools.api.listen", "address unix:/run/x.sock is already used by pool 'web'"),
    ("command-not-found", {"m": POOL.replace("[/bin/cat]", "[no-such-program-xyz, -b]")}, "m", 3, "pools.web.command",
     "program 'no-such-program-xyz' not found on PATH"),
    ("command-abs-not-found", {"m": POOL.replace("[/bin/cat]", "/usr/bin/no-such-xyz")}, "m", 3, "pools.web.command",
     "program /usr/bin/no-such-xyz not found"),
    ("command-empty", {"m": POOL.replace("[/bin/cat]", "[]")}, "m", 3, "pools.web.command", "empty command"),
    ("command-missing", {"m": POOL.replace("    command: [/bin/cat]\n", "")}, "m", 2, "pools.web",
     "missing required key 'command'"),
    ("bad-signal", {"m": POOL + "    stop: {signal: TERMINATE}\n"}, "m", 6, "pools.web.stop.signal", "bad signal 'TERMINATE'"),
    ("bad-rlimit-name", {"m": POOL + "    rlimits:\n      nofiles: 10\n"}, "m", 7, "pools.web.rlimits.nofiles",
     "unknown key 'nofiles' (did you mean 'nofile'?)"),
    ("bad-rlimit-value", {"m": POOL + "    rlimits: {nofile: 1KiB}\n"}, "m", 6, "pools.web.rlimits.nofile",
     "expected a number or 'unlimited' for rlimit nofile"),
    ("rlimit-soft-over-hard", {"m": POOL + "    rlimits: {core: {soft: 2MiB, hard: 1MiB}}\n"}, "m", 6,
     "pools.web.rlimits.core", "soft limit (2097152) is above the hard limit (1048576)"),
    ("bad-restart", {"m": POOL + "    restart: sometimes\n"}, "m", 6, "pools.web.restart",
     "expected one of always, on-failure, never, got 'sometimes'"),
    ("bad-client", {"m": POOL + "    allowed_clients:\n      - 127.0.0.1\n      - localhost\n"}, "m", 8,
     "pools.web.allowed_clients[1]", "expected an IP address, got 'localhost'"),
    ("bad-env-name", {"m": POOL + "    env: {1ST: x}\n"}, "m", 6, "pools.web.env.1ST", "bad environment variable name '1ST'"),
    ("cwd-missing", {"m": POOL + "    cwd: /no/such/dir\n"}, "m", 6, "pools.web.cwd", "directory /no/such/dir does not exist"),
    ("probe-uri", {"m": POOL + "    probe: {uri: ping}\n"}, "m", 6, "pools.web.probe.uri", "starting with '/'"),
    ("backoff-order", {"m": POOL + "    backoff: {initial: 1m, max: 10s}\n"}, "m", 6, "pools.web.backoff.initial",
     "initial (60.0s) is greater than max (10.0s)"),
    ("spawnd-in-include", {"m": "spawnd: {include: 'p/*.yaml'}\n", "p/a.yaml": "spawnd: {}\n" + POOL}, "p/a.yaml", 1,
     "spawnd", "the spawnd: section belongs in the main file only"),
    ("include-syntax", {"m": "spawnd: {include: 'p/*.yaml'}\n", "p/a.yaml": POOL + "    user: [\n"}, "p/a.yaml", 7,
     "syntax error", ""),
    ("empty-pool", {"m": "pools:\n  web:\n"}, "m", 2, "pools.web", "empty pool: at least command and listen are required"),
    ("top-is-list", {"m": "- a\n- b\n"}, "m", 1, "(top level)", "expected a mapping with spawnd: and pools:, got a list"),
]
if ROOT:
    CASES.append(("uid0-without-user", {"m": POOL.replace(f"    user: {USER}\n", "")}, "m", 2, "pools.web",
                  "children would run as root; set user: NAME (or user: root to allow it)"))
    CASES.append(("uid0-user-null", {"m": POOL.replace(f"    user: {USER}\n", "    user: null\n")}, "m", 2, "pools.web",
                  "children would run as root"))


@pytest.mark.parametrize("files, bad_file, line, key_path, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_config_is_reported_with_file_line_and_key(tmp_path, files, bad_file, line, key_path, message):
    paths = {name: write(tmp_path, "spawnd.yaml" if name == "m" else name, text) for name, text in files.items()}
    for name, path in paths.items():
        message = message.replace("{%s}" % name, path)
    errors = errors_of(paths["m"])
    prefix = f"{paths[bad_file]}:{line}: {key_path}"
    matching = [e for e in errors if e.startswith(prefix + ":") and message in e]
    assert matching, f"no error starting {prefix!r} containing {message!r}; got:\n" + "\n".join(errors)


def test_table_covers_enough_cases():
    assert len(CASES) >= 22


def test_every_error_in_every_file_is_reported(tmp_path):
    main = write(tmp_path, "spawnd.yaml", f"""
        spawnd:
          include: pools.d/*.yaml
          shutdown_timeout: soon
        pools:
          one:
            command: [/bin/cat]
            listen: tcp:127.0.0.1:99999
            user: {USER}
            processes: -1
            restart: sometimes
          Two:
            command: [/bin/cat]
            listen: tcp:127.0.0.1:9001
            user: {USER}
          four:
            restart: maybe
            listen: tcp:127.0.0.1:9002
            user: no-such-user-xyz
        """)
    inc = write(tmp_path, "pools.d/x.yaml", f"""
        pools:
          three:
            command: [/bin/cat]
            listen: "unix:"
            user: {USER}
            stop: {{signal: NOPE, timeout: -1}}
        """)
    errors = errors_of(main)
    assert errors == [
        f"{main}:3: spawnd.shutdown_timeout: bad duration 'soon' (expected e.g. 250ms, 10s, 5m, 1h, 1m30s)",
        f"{main}:7: pools.one.listen: bad listen address 'tcp:127.0.0.1:99999': bad port '99999' (1-65535)",
        f"{main}:9: pools.one.processes: -1 must be >= 0",
        f"{main}:10: pools.one.restart: expected one of always, on-failure, never, got 'sometimes'",
        f"{main}:11: pools.Two: bad pool name 'Two' (lowercase letters, digits, '_' and '-' only)",
        f"{main}:15: pools.four: missing required key 'command'",
        f"{main}:16: pools.four.restart: expected one of always, on-failure, never, got 'maybe'",
        f"{main}:18: pools.four.user: unknown user 'no-such-user-xyz'",
        f"{inc}:4: pools.three.listen: bad listen address 'unix:': empty unix socket path",
        f"{inc}:6: pools.three.stop.signal: bad signal 'NOPE' (expected a name such as TERM, QUIT, INT, "
        "HUP, USR1, USR2, or a number)",
        f"{inc}:6: pools.three.stop.timeout: bad duration '-1' (must be a finite value >= 0)",
    ]


def test_missing_main_file_is_an_error(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert errors_of(missing) == [f"{missing}: file not found"]


def test_bad_value_skips_dependent_checks(tmp_path):
    """One mistake, one error: a bad chroot does not also make command/cwd 'not found'."""
    path = write(tmp_path, "spawnd.yaml", f"""
        pools:
          web:
            command: [app]
            listen: unix:/tmp/x.sock
            chroot: /no/such/jail
            cwd: /srv
            user: {USER}
        """)
    assert errors_of(path) == [f"{path}:5: pools.web.chroot: directory /no/such/jail does not exist"]


# ---------------------------------------------------------------------------------------
# The scalar parsers

@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("1m30s", 90.0), ("1h0m5s", 3605.0),
    ("1.5s", 1.5), ("2d", 172800.0), (3, 3.0), (0.5, 0.5), ("7", 7.0), (0, 0.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10x", "s", "1 h", "-5s", "5s10", True, None, [1], "nan", -1])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("text, size", [
    ("512KiB", 512 << 10), ("256MiB", 256 << 20), ("1GiB", 1 << 30), ("1G", 1 << 30), ("4k", 4096),
    ("100B", 100), (1000, 1000), ("1.5KiB", 1536), ("2TiB", 2 << 40), ("0", 0)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "12XB", "MiB", "-1KiB", "1 KiB B", True, 1.5, -3, None])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_parse_mode():
    assert parse_mode("0660") == 0o660
    assert parse_mode("600") == 0o600
    assert parse_mode("0o2775") == 0o2775
    with pytest.raises(ValueError, match="YAML read this as the number 432"):
        parse_mode(432)
    for bad in ("0888", "12345", "rw-r--r--", "", None, True):
        with pytest.raises(ValueError):
            parse_mode(bad)


@pytest.mark.parametrize("text, canonical, family", [
    ("unix:/run/x.sock", "unix:/run/x.sock", socket.AF_UNIX),
    ("unix:x.sock", "unix:/base/x.sock", socket.AF_UNIX),
    ("unix:../run//x.sock", "unix:/run/x.sock", socket.AF_UNIX),
    ("tcp:127.0.0.1:9000", "tcp:127.0.0.1:9000", socket.AF_INET),
    ("tcp:0.0.0.0:1", "tcp:0.0.0.0:1", socket.AF_INET),
    ("tcp:[::1]:9000", "tcp:[::1]:9000", socket.AF_INET6),
    ("tcp:[::]:65535", "tcp:[::]:65535", socket.AF_INET6),
    ("tcp:[0:0:0:0:0:0:0:1]:80", "tcp:[::1]:80", socket.AF_INET6),
    ("systemd:web", "systemd:web", None),
])
def test_parse_listen(text, canonical, family):
    listen = parse_listen(text, "/base")
    assert str(listen) == canonical
    assert listen.family == family


@pytest.mark.parametrize("bad, why", [
    ("/run/x.sock", "did you mean unix:/run/x.sock?"),
    ("localhost:9000", "did you mean tcp:localhost:9000?"),
    ("http://x", "expected unix:PATH"),
    ("unix:", "empty unix socket path"),
    ("unix:/" + "a" * 120, "longer than 107 bytes"),
    ("tcp:127.0.0.1", "missing port"),
    ("tcp:[::1]", "missing port"),
    ("tcp:127.0.0.1:0", "bad port '0'"),
    ("tcp:127.0.0.1:http", "bad port 'http'"),
    ("tcp:::1:9000", "needs brackets"),
    ("tcp::9000", "missing host"),
    ("tcp:[127.0.0.1]:9000", "brackets are for IPv6 addresses only"),
    ("tcp:[nonsense]:9000", "is not an IPv6 address"),
    ("systemd:", "systemd:NAME needs a name"),
    ("systemd:a:b", "systemd:NAME needs a name"),
    (9000, "got a number (9000)"),
])
def test_parse_listen_rejects(bad, why):
    with pytest.raises(ValueError) as info:
        parse_listen(bad, "/base")
    assert why in str(info.value)


def test_config_error_lists_every_error():
    err = ConfigError(["a:1: x: one", "b:2: y: two"])
    assert err.errors == ["a:1: x: one", "b:2: y: two"]
    assert str(err) == "a:1: x: one\nb:2: y: two"


def test_public_names_exist():
    for name in config.__all__:
        assert hasattr(config, name), name


# ---------------------------------------------------------------------------------------
# Robustness: whatever the file holds, load() returns a Config or raises ConfigError.

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_KEYS = st.sampled_from(["spawnd", "pools", "web", "command", "listen", "user", "socket", "mode",
                         "processes", "min", "max", "env", "rlimits", "nofile", "stop", "signal",
                         "include", "probe", "uri", "allowed_clients", "chroot", "cwd", "x"])
_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
            | st.text(max_size=12) | st.sampled_from(["unix:/tmp/x.sock", "tcp:127.0.0.1:9000", "/bin/cat",
                                                       "nobody", "0660", "10s", "1GiB", "TERM", "\0"]))
_TREES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(_KEYS, inner, max_size=5), max_leaves=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(st.sampled_from(["spawnd", "pools", "other"]), _TREES, max_size=3))
def test_any_structure_gives_a_config_or_a_config_error(tmp_path, tree):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml_dump(tree))
    try:
        load(str(path))
    except ConfigError as e:
        # Each error is about this file, or about a file its include matched (the trees
        # can name /bin/cat) and then says which include line matched it.
        assert e.errors and all(err.startswith(f"{path}:") or f"(matched by {path}:" in err
                                for err in e.errors), e.errors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(list("pools:web\n -[]{}'\"&*<!\t#|>,0x")
                                       + ["command: ", "listen: ", "<<: ", "\n    "]), max_size=60))
def test_any_text_gives_a_config_or_a_config_error(tmp_path, pieces):
    path = tmp_path / "fuzz.yaml"
    path.write_text("".join(pieces))
    try:
        load(str(path))
    except ConfigError as e:
        assert e.errors and all(err.startswith(str(path)) for err in e.errors), e.errors


def yaml_dump(tree):
    return yaml.safe_dump(tree, allow_unicode=True)


@pytest.mark.parametrize("value, message", [
    (5, "expected an IP address, got a number (5)"),
    ("10.0.0.0/8", "expected an IP address, got '10.0.0.0/8'"),
])
def test_allowed_clients_are_addresses_only(tmp_path, value, message):
    path = write(tmp_path, "spawnd.yaml", POOL + f"    allowed_clients: [{value!r}]\n")
    assert errors_of(path) == [f"{path}:6: pools.web.allowed_clients[0]: {message}"]


def test_deep_nesting_is_an_error_not_a_crash(tmp_path):
    path = write(tmp_path, "spawnd.yaml", "pools: " + "[" * 5000 + "]" * 5000 + "\n")
    assert errors_of(path) == [f"{path}:1: syntax error: nested too deeply"]
