"""Packaging: systemd units, man pages, and the .deb/.rpm that packaging/build.sh makes.

The build tools (debhelper, dh-python, rpm, lintian, rpmlint, mandoc, ...) are installed
by `packaging/build.sh deps check` (idempotent; apt-get when something is missing, as
root). The .deb is really installed, removed and purged on this machine: there is no
running systemd here, and the maintainer scripts must cope with that.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "packaging", "build.sh")
UNITS = os.path.join(ROOT, "packaging", "systemd")
MAN = os.path.join(ROOT, "docs", "man")
PAGES = {"spawnd": "8", "spawnctl": "1", "spawnd-wsgi": "1", "spawnd-fcgi": "1",
         "spawnd.yaml": "5"}
PROGRAMS = ["spawnd", "spawnctl", "spawnd-wsgi", "spawnd-fcgi"]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
IS_ROOT = os.geteuid() == 0


def run(cmd, *, check=True, env=None, timeout=300, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=env if env is not None else {**os.environ, "PATH": SYSTEM_PATH}, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def version():
    with open(os.path.join(ROOT, "spawnd", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


@pytest.fixture(scope="module")
def tools():
    """The packaging and lint tools, installed once (a no-op when present)."""
    r = run([BUILD, "deps", "check"], check=False, timeout=900)
    if r.returncode != 0:
        pytest.fail(f"cannot install the packaging tools:\n{r.stderr}")


# ---------------------------------------------------------------------------------------
# man pages

@pytest.mark.parametrize("page", sorted(PAGES))
def test_man_page_renders_without_warnings(page, tools):
    path = os.path.join(MAN, f"{page}.{PAGES[page]}")
    r = run(["groff", "-man", "-Tutf8", "-ww", "-z", path])
    assert r.stderr == "", r.stderr
    r = run(["mandoc", "-T", "lint", "-W", "all", path], check=False)
    assert (r.returncode, r.stdout + r.stderr) == (0, ""), r.stdout + r.stderr
    text = run(["man", "-l", path], env={**os.environ, "PATH": SYSTEM_PATH, "MANWIDTH": "80"}).stdout
    name_line = text.split("NAME", 1)[1].strip().splitlines()[0]
    assert name_line.startswith(f"{page} - "), name_line


def test_every_program_and_the_config_have_a_page():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        scripts = re.findall(r'^([a-z-]+) = "spawnd[.\w]*:main"', f.read(), re.M)
    assert sorted(scripts) == sorted(PROGRAMS)
    assert sorted(os.listdir(MAN)) == sorted(f"{p}.{s}" for p, s in PAGES.items())


# ---------------------------------------------------------------------------------------
# systemd units

def unit_settings(path):
    settings = {}
    with open(path) as f:
        for line in f:
            if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
                key, _, value = line.strip().partition("=")
                settings.setdefault(key, []).append(value)
    return settings


def verify_units(tmp_path, edit=lambda text: text):
    """systemd-analyze verify on copies of the units whose /usr/bin programs point at this
    checkout's installed scripts (the real paths are checked after dpkg -i)."""
    bindir = os.path.dirname(sys.executable)
    assert os.path.exists(os.path.join(bindir, "spawnctl")), f"no spawnctl in {bindir}"
    for name in ("spawnd.service", "spawnd@.socket"):
        with open(os.path.join(UNITS, name)) as f:
            text = f.read().replace("/usr/bin/spawn", f"{bindir}/spawn")
        (tmp_path / name).write_text(edit(text))
    (tmp_path / "spawnd@php.socket").write_text((tmp_path / "spawnd@.socket").read_text())
    return run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "spawnd.service"),
                str(tmp_path / "spawnd@php.socket")], check=False)


def test_units_verify_without_a_word(tmp_path):
    r = verify_units(tmp_path)
    assert r.stderr == "" and r.returncode == 0, r.stderr


def test_unit_verification_does_catch_mistakes(tmp_path):
    # systemd-analyze exits 0 on many errors; only stderr tells: make sure we would see it.
    r = verify_units(tmp_path, lambda t: t.replace("KillMode=mixed", "KillMode=mixed\nKilMode=x"))
    assert "KilMode" in r.stderr, (r.returncode, r.stderr)


def test_service_unit_contract():
    s = unit_settings(os.path.join(UNITS, "spawnd.service"))
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == ["/usr/bin/spawnd -c /etc/spawnd/spawnd.yaml"]
    assert s["ExecReload"] == ["/usr/bin/spawnctl reload"]
    assert s["KillMode"] == ["mixed"]
    assert s["RuntimeDirectory"] == ["spawnd"] and s["RuntimeDirectoryPreserve"] == ["restart"]
    assert int(s["FileDescriptorStoreMax"][0]) > 0 and s["WatchdogSec"]
    # the supervisor must keep what it needs to start children as other users
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert caps >= {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE",
                    "CAP_SYS_CHROOT", "CAP_SYS_RESOURCE", "CAP_DAC_OVERRIDE", "CAP_FOWNER"}
    assert "NoNewPrivileges" not in s and "PrivateTmp" not in s
    sock = unit_settings(os.path.join(UNITS, "spawnd@.socket"))
    assert sock["FileDescriptorName"] == ["%i"] and sock["Service"] == ["spawnd.service"]


CAP_PROBE = r"""
import os, subprocess, sys
target = int(sys.argv[1]); path = sys.argv[2]
with open(f"/proc/{target}/syscall") as f:          # idle/busy detection (health.py)
    f.read()
os.chown(path, 65534, 65534)                         # socket owner
out = subprocess.run(["/usr/bin/id", "-u"], user=65534, group=65534, extra_groups=[],
                     capture_output=True, text=True).stdout.strip()
assert out == "65534", out                           # children as another user
os.kill(target, 0)                                   # signal a child of another user
print("ok")
"""


@pytest.mark.skipif(not IS_ROOT or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_capability_bounding_set_lets_root_run_children_as_others(tmp_path):
    caps = unit_settings(os.path.join(UNITS, "spawnd.service"))["CapabilityBoundingSet"][0].split()
    keep = ",".join("+" + c[len("CAP_"):].lower() for c in caps)
    probe = tmp_path / "probe.py"
    probe.write_text(CAP_PROBE)
    target = tmp_path / "owned"
    target.write_text("")
    child = subprocess.Popen(["/bin/sleep", "60"], user=65534, group=65534, extra_groups=[])
    try:
        def attempt(bounding):
            return run(["setpriv", f"--bounding-set=-all,{bounding}", "/usr/bin/python3", "-I",
                        str(probe), str(child.pid), str(target)], check=False)
        r = attempt(keep)
        assert r.stdout.strip() == "ok", r.stderr
        # and the probe notices a missing capability (CAP_SYS_PTRACE for /proc/PID/syscall)
        r = attempt(",".join(c for c in keep.split(",") if c != "+sys_ptrace"))
        assert "PermissionError" in r.stderr, (r.stdout, r.stderr)
    finally:
        child.kill()
        child.wait()


def test_shipped_config_is_valid():
    r = run([sys.executable, "-m", "spawnd.main", "-t", "-c",
             os.path.join(ROOT, "packaging", "spawnd.yaml")], env=None, check=False)
    assert (r.returncode, r.stdout.strip()) == (0, "configuration OK"), r.stderr


def test_build_script_refuses_bad_requests():
    r = run([BUILD, "tarball"], check=False)
    assert r.returncode == 2 and "deb|rpm|all" in r.stderr, r.stderr
    r = run([BUILD, "-o", ROOT, "deb"], check=False)
    assert r.returncode == 1 and "refusing" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------
# the packages (slow: they are really built, linted, installed and purged)

@pytest.fixture(scope="module")
def packages(tools, tmp_path_factory):
    out = tmp_path_factory.mktemp("packages")
    r = run([BUILD, "-o", str(out), "all"], timeout=600)
    v = version()
    deb, rpm = out / f"spawnd_{v}_all.deb", out / f"spawnd-{v}.noarch.rpm"
    assert sorted(os.listdir(out)) == sorted([deb.name, rpm.name]), r.stdout + r.stderr
    assert r.stdout.split() == [str(deb), str(rpm)]
    return str(deb), str(rpm)


@pytest.mark.slow
def test_lintian_finds_no_error_or_warning(packages):
    deb, _ = packages
    r = run(["lintian", "--fail-on", "error,warning", "--display-level", ">=warning", deb],
            check=False)
    problems = [line for line in r.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert r.returncode == 0 and problems == [], r.stdout + r.stderr
    # an override is allowed only with a comment saying why
    for path in glob.glob(os.path.join(ROOT, "packaging", "debian", "*lintian-overrides")):
        lines = open(path).read().splitlines()
        for i, line in enumerate(lines):
            if line.strip() and not line.startswith("#"):
                assert i > 0 and lines[i - 1].startswith("#"), f"{path}:{i + 1}: no comment"


def spawnd_paths():
    """Every path on this machine that names spawnd, outside the work trees."""
    found = set()
    for top in ("/etc", "/usr", "/lib", "/var/lib/systemd", "/var/lib/dpkg/info", "/run"):
        for dirpath, dirnames, filenames in os.walk(top):
            for n in dirnames + filenames:
                if "spawnd" in n:
                    found.add(os.path.join(dirpath, n))
    return found


def dpkg(*args):
    return run(["dpkg", *args], env={**os.environ, "PATH": SYSTEM_PATH,
                                     "DEBIAN_FRONTEND": "noninteractive"})


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="installs a package")
def test_deb_installs_works_and_purges_without_a_trace(packages, tmp_path):
    deb, _ = packages
    if run(["dpkg-query", "-W", "-f=${Status}", "spawnd"], check=False).stdout.endswith("installed"):
        dpkg("-P", "spawnd")                # left over by an interrupted run of this test
    before = spawnd_paths()
    try:
        dpkg("-i", deb)
        for program in PROGRAMS:
            with open(f"/usr/bin/{program}") as f:
                assert f.readline().strip() == "#!/usr/bin/python3", program
        for page, section in PAGES.items():
            assert os.path.exists(f"/usr/share/man/man{section}/{page}.{section}.gz"), page
        conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", "spawnd"]).stdout
        assert "/etc/spawnd/spawnd.yaml" in conffiles
        assert os.path.isdir("/etc/spawnd/pools.d")
        # enabled for the next boot, although no systemd runs here to start it now
        assert os.path.islink("/etc/systemd/system/multi-user.target.wants/spawnd.service")
        # the installed program, on Debian's python3, not this checkout
        r = run(["/usr/bin/spawnd", "-t", "-c", "/etc/spawnd/spawnd.yaml"])
        assert r.stdout.strip() == "configuration OK"
        where = run(["/usr/bin/python3", "-I", "-c", "import spawnd; print(spawnd.__file__)"])
        assert where.stdout.startswith("/usr/lib/python3/dist-packages/spawnd/")
        # ...while the test environment keeps using the checkout
        mine = run([sys.executable, "-c", "import spawnd; print(spawnd.__file__)"], env=None)
        assert mine.stdout.startswith(os.path.join(ROOT, "spawnd")), mine.stdout
        # the installed units, with their real programs and man pages
        r = run(["systemd-analyze", "verify", "/lib/systemd/system/spawnd.service"], check=False)
        assert r.stderr == "", r.stderr
        shutil.copy("/lib/systemd/system/spawnd@.socket", tmp_path / "spawnd@web.socket")
        r = run(["systemd-analyze", "verify", str(tmp_path / "spawnd@web.socket")], check=False)
        assert r.stderr == "", r.stderr

        dpkg("-r", "spawnd")
        assert not os.path.exists("/usr/bin/spawnd")
        assert not os.path.exists("/usr/lib/python3/dist-packages/spawnd")
        assert os.path.exists("/etc/spawnd/spawnd.yaml")      # conffiles stay until purge
        dpkg("-P", "spawnd")
        left = spawnd_paths() - before
        assert left == set(), f"left behind after purge: {sorted(left)}"
    finally:
        status = run(["dpkg-query", "-W", "-f=${Status}", "spawnd"], check=False).stdout
        if status.endswith(("installed", "config-files")):
            run(["dpkg", "-P", "spawnd"], check=False)


@pytest.mark.slow
def test_rpm_contents_and_rpmlint(packages, tmp_path):
    _, rpm = packages
    files = set(run(["rpm", "-qlp", rpm]).stdout.split())
    site = f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    expected = {f"/usr/bin/{p}" for p in PROGRAMS} | {
        f"{site}/spawnd/__init__.py", f"{site}/spawnd/systemd.py",
        "/usr/lib/systemd/system/spawnd.service", "/usr/lib/systemd/system/spawnd@.socket",
        "/etc/spawnd/spawnd.yaml", "/etc/spawnd/pools.d",
    } | {f"/usr/share/man/man{s}/{p}.{s}.gz" for p, s in PAGES.items()}
    assert expected <= files, sorted(expected - files)
    assert not [f for f in files if f.startswith("/usr/local") or "dist-packages" in f]
    config = run(["rpm", "-qcp", rpm]).stdout.split()
    assert config == ["/etc/spawnd/spawnd.yaml"]
    requires = run(["rpm", "-qRp", rpm]).stdout
    for dep in (f"python(abi) = {sys.version_info[0]}.{sys.version_info[1]}",
                "python3dist(pyyaml)", "python3dist(psutil)"):
        assert dep in requires, requires
    scripts = run(["rpm", "-qp", "--scripts", rpm]).stdout
    for action in ("preset spawnd.service", "disable --now spawnd.service",
                   "try-restart spawnd.service", "daemon-reload"):
        assert action in scripts, scripts
    # the scripts run the target python
    payload = tmp_path / "payload"
    payload.mkdir()
    subprocess.run(f"rpm2cpio {rpm} | cpio -idm --quiet", shell=True, cwd=payload, check=True,
                   env={**os.environ, "PATH": SYSTEM_PATH})
    assert (payload / "usr/bin/spawnd").read_text().splitlines()[0] == "#!/usr/bin/python3"
    r = run(["rpmlint", "-c", os.path.join(ROOT, "packaging", "rpm", "rpmlint.toml"), rpm],
            check=False)
    assert r.returncode == 0 and " 0 errors" in r.stdout, r.stdout + r.stderr
