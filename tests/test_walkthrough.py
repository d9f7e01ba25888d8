"""The multi-machine walkthrough of docs/operations.md, executed as written on four hosts.

The `sh` and `yaml` blocks of the numbered steps under "A three-machine mesh under systemd"
are read from the markdown (so the docs cannot drift from what is tested); each step runs on
the host(s) its heading names, each host a network namespace joined to the others by a
bridge.  A small fixed set of things is rewritten, and nothing else:

* the paths /etc/zeromesh, /var/lib/zeromesh and /opt/zeromesh* go to a per-host root
  directory under tmp_path;
* `git clone ... /opt/zeromesh-src` links the checkout under test there; `python3 -m venv` and
  `pip install` are skipped (the code under test is the checkout), and so is the convenience
  symlink into /usr/local/bin; `zmesh` (and the venv's `zmesh`) is `python -m client.cli`;
* `install-systemd.sh` runs with `--prefix HOSTROOT`; `chown` is skipped and `runuser -u
  zeromesh --` dropped (there is no zeromesh user here: the daemons run as root);
* `scp FILE HOST:PATH` is `cp` into that host's root;
* `systemctl enable --now UNIT` starts the ExecStart= of the unit the installer put in the
  host's root, inside `ip netns exec HOST`, with a NOTIFY_SOCKET, and waits (bounded, the
  unit's TimeoutStartSec=) for READY=1, as systemd does for Type=notify;
  `systemctl status UNIT` checks it still runs and has sent a STATUS= line with what the
  line's comment says it shows;
* host names in `tcp://HOST:` addresses are the hosts' IP addresses;
* a step "On m2 (and likewise m3)" runs on m3 with m3 for m2 in its blocks.

A comment naming hosts ("# m2 and m3, alive") is checked against the command's output.
The hosts share one file system (namespaces separate the network only): a path that exists
on one host's root but not another's is not caught when a daemon reads it by absolute path
(as an executor does the registered working_directory).

Any other command line fails the test, so the docs cannot grow a step the test ignores.
The final check must print what the text after the last block says it prints.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
SECTION = "## A three-machine mesh under systemd"
PASSWORD = "walkthrough-Secret-1"

TAG = f"zw{os.getpid() % 100000}"
SWITCH = f"{TAG}sw"                      # the namespace holding the bridge (out of the host's firewall)
BRIDGE = "br0"
SUBNET = "10.200.0"                      # inside the namespaces only: never seen by the machine's own routes
PATHS = re.compile(r"(?<![\w./-])(/etc/zeromesh|/var/lib/zeromesh|/opt/zeromesh)")
HOST = re.compile(r"\bm\d\b")
COMMAND_TIMEOUT = 60                     # any one documented command
# reachable: a TCP connect refused (nothing listens yet) answers as well as one accepted
REACH = ("import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], 9), timeout=1).close()\n"
         "except ConnectionRefusedError:\n    pass\n")
STOP_TIMEOUT = 45                        # the executor unit's TimeoutStopSec=


# --- the markdown -------------------------------------------------------------------------------

class Step:
    def __init__(self, number: int, title: str, body: str):
        self.number, self.title, self.body = number, title, body
        # [(lang, code, prose before it)]
        self.blocks: List[Tuple[str, str, str]] = []
        pos = 0
        for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```\s*$", body, re.S | re.M):
            code = "".join(line[len(m.group(1)):] + "\n" for line in m.group(3).splitlines())
            self.blocks.append((m.group(2), code, body[pos:m.start()]))
            pos = m.end()
        self.after = body[pos:]          # the prose after the last block

    def hosts(self, all_hosts: List[str]) -> List[str]:
        head = self.title + self.body.split("\n\n")[0]
        if "every machine" in self.title:
            return list(all_hosts)
        m = re.match(r"On (m\d)(?: \((?:and )?(?:likewise )?(m\d)\))?,", self.title)
        if m:
            return [h for h in m.groups() if h]
        m = re.search(r"\(here (m\d)\b", head)
        if m:
            return [m.group(1)]
        raise AssertionError(f"step {self.number} ({self.title!r}): its heading names no host")


def walkthrough() -> List[Step]:
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1]
    section = re.split(r"^#{2,3} ", section, maxsplit=1, flags=re.M)[0]
    parts = re.split(r"^(\d+)\. \*\*(.+?)\*\*", section, flags=re.M)
    steps = [Step(int(parts[i]), parts[i + 1], parts[i + 2]) for i in range(1, len(parts), 3)]
    assert [s.number for s in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 5, steps
    return steps


def test_the_walkthrough_parses():
    """Without namespaces too: every block of every step is one this test knows how to run."""
    steps = walkthrough()
    hosts = sorted(set(HOST.findall("".join(s.title + s.body for s in steps))))
    for step in steps:
        assert step.hosts(hosts)
        for lang, code, before in step.blocks:
            assert lang in ("sh", "yaml"), f"step {step.number}: a ```{lang} block"
            if lang == "yaml":
                _yaml_target(step, before)
            else:
                for line in _lines(code):
                    _classify(line)


# --- the command lines --------------------------------------------------------------------------

def _lines(code: str) -> List[str]:
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            out.append(line.strip())
    return out


KINDS = [  # (kind, pattern over the whole line, comments removed)
    ("clone", r"git clone <[^>]+> (/\S+)"),
    ("skip", r"python3 -m venv /\S+"),
    ("skip", r"/\S+/bin/pip install /\S+"),
    ("skip", r"ln -sf /\S+/bin/zmesh /usr/local/bin/zmesh"),
    ("install", r"(/\S+/scripts/install-systemd\.sh)"),
    ("skip", r"chown -R zeromesh: (/\S+ ?)+"),
    ("zmesh", r"zmesh .+"),
    ("zmesh-stdin", r'echo "\$ALICE_PASSWORD" \| (?:runuser -u zeromesh -- )?(zmesh .+)'),
    ("export", r"export (\w+=\S+ ?)+"),
    ("start", r"systemctl enable --now ([\w@.-]+)"),
    ("status", r"systemctl status ([\w@.-]+)"),
    ("copy", r"scp (/\S+) (m\d):(/\S+)"),
]

SYNTAX = {"clone": ["<", ">"], "zmesh-stdin": ["|"]}   # the shell syntax a kind's pattern spells out


def _classify(line: str) -> Tuple[str, "re.Match[str]"]:
    bare = " ".join(shlex.split(line, comments=True, posix=False))
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    operators = [t for t in lexer if t and set(t) <= set("();<>|&")]
    unquoted = re.sub(r"'[^']*'", "", bare)
    for kind, pattern in KINDS:
        m = re.fullmatch(pattern, bare)
        # shell syntax (;, &&, redirections, $VARS) only where a pattern spells it out
        if m and operators == SYNTAX.get(kind, []) and (kind == "zmesh-stdin" or not re.search(r"[$`]", unquoted)):
            return kind, m
    raise AssertionError(f"docs/operations.md has a command this test does not know how to run: {line!r}")


def _yaml_target(step: Step, before: str) -> str:
    paths = re.findall(r"`(/[^`]+\.yaml)`", before)
    assert paths, f"step {step.number}: a yaml block without the file it goes to named before it"
    return paths[-1]


# --- the hosts ----------------------------------------------------------------------------------

def _run(*args: str, ns: Optional[str] = None, timeout: float = 20) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class Unit:
    def __init__(self, name: str, proc: subprocess.Popen, log: Path, sock: socket.socket):
        self.name, self.proc, self.log, self.sock = name, proc, log, sock
        self.status: Optional[str] = None
        self.ready = False

    def drain_notifications(self, wait: float = 0.0) -> None:
        self.sock.settimeout(wait if wait > 0 else 0.0001)
        while True:
            try:
                data = self.sock.recv(65536).decode()
            except (BlockingIOError, socket.timeout):
                return
            for field in data.splitlines():
                key, _, value = field.partition("=")
                if key == "READY" and value == "1":
                    self.ready = True
                elif key == "STATUS":
                    self.status = value
            self.sock.settimeout(0.0001)

    def tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return ""


class Mesh:
    """The hosts (namespaces), their roots and the units started on them."""

    def __init__(self, hosts: List[str], base: Path):
        self.hosts = hosts
        self.ns = {h: f"{TAG}{h}" for h in hosts}
        self.ip = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(hosts)}
        self.base = base
        self.root = {h: base / h for h in hosts}
        self.env: Dict[str, Dict[str, str]] = {}
        self.units: List[Unit] = []
        self.sockdir = tempfile.mkdtemp(prefix="zmw-")      # short: sun_path holds 108 bytes
        self.last_output = ""
        for h in hosts:
            home = self.root[h] / "root"
            home.mkdir(parents=True)
            self.env[h] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                           "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8", "ALICE_PASSWORD": PASSWORD}

    # namespaces joined by a bridge
    def up(self) -> None:
        made = _run("ip", "netns", "add", SWITCH)
        if made.returncode != 0:
            pytest.skip(f"network namespaces are not permitted here: {made.stderr.strip()}")
        for step in (["ip", "link", "add", BRIDGE, "type", "bridge"], ["ip", "link", "set", BRIDGE, "up"]):
            r = _run(*step, ns=SWITCH)
            assert r.returncode == 0, r.stderr
        for i, h in enumerate(self.hosts):
            ns, port = self.ns[h], f"p{h}"
            r = _run("ip", "netns", "add", ns)
            assert r.returncode == 0, r.stderr
            for step in (["ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns],
                         ["ip", "link", "set", port, "master", BRIDGE], ["ip", "link", "set", port, "up"]):
                r = _run(*step, ns=SWITCH)
                assert r.returncode == 0, r.stderr
            for step in (["ip", "addr", "add", f"{self.ip[h]}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                         ["ip", "link", "set", "lo", "up"]):
                r = _run(*step, ns=ns)
                assert r.returncode == 0, r.stderr
        for h in self.hosts[1:]:             # the bridge carries traffic (bounded: a link comes up in ms)
            deadline = time.monotonic() + 20
            while _run(sys.executable, "-c", REACH, self.ip[self.hosts[0]], ns=self.ns[h]).returncode != 0:
                assert time.monotonic() < deadline, f"{h} cannot reach {self.hosts[0]} over the bridge"
                time.sleep(0.2)

    def down(self) -> None:
        for unit in reversed(self.units):    # executors (started last) first, then the manager
            self._stop(unit)
        for h in self.hosts:
            _run("ip", "netns", "del", self.ns[h])
        _run("ip", "link", "del", BRIDGE, ns=SWITCH)
        _run("ip", "netns", "del", SWITCH)
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def _stop(self, unit: Unit) -> None:
        if unit.sock.fileno() == -1:
            return                           # stopped already
        if unit.proc.poll() is None:
            os.kill(unit.proc.pid, 15)       # SIGTERM, as `systemctl stop`, to the unit's own PID
            try:
                unit.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(unit.proc.pid, 9)
                unit.proc.wait(10)
        unit.sock.close()

    # the rewrites
    def path(self, host: str, text: str) -> str:
        return PATHS.sub(lambda m: str(self.root[host]) + m.group(1), text)

    def addresses(self, text: str) -> str:
        return re.sub(r"tcp://(m\d):", lambda m: f"tcp://{self.ip[m.group(1)]}:", text)

    def arg(self, host: str, token: str) -> str:
        return self.addresses(self.path(host, token))

    def zmesh(self, host: str, line: str, stdin: Optional[str] = None) -> str:
        tokens = shlex.split(line, comments=True)
        assert tokens[0] == "zmesh"
        cmd = [sys.executable, "-m", "client.cli"] + [self.arg(host, t) for t in tokens[1:]]
        r = subprocess.run(["ip", "netns", "exec", self.ns[host]] + cmd, input=stdin, capture_output=True,
                           text=True, timeout=COMMAND_TIMEOUT, env=self.env[host], cwd=self.root[host])
        assert r.returncode == 0, (f"on {host}: `{line}` exited {r.returncode}\nstdout: {r.stdout}\n"
                                   f"stderr: {r.stderr}\n{self.logs()}")
        comment = re.search(r"(?:^|\s)#\s(.*)$", line)
        comment = comment.group(1) if comment and shlex.split(line, comments=True) == shlex.split(
            line[:comment.start()]) else ""
        for name in HOST.findall(comment):   # "# m2 and m3, alive": the listing shows them
            assert re.search(rf"\b{name}\b", r.stdout), f"on {host}: `{line}` does not show {name}:\n{r.stdout}"
        return r.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {u.name} (exit {u.proc.poll()}):\n{u.tail()}" for u in self.units)

    # the commands
    def command(self, host: str, line: str) -> None:
        kind, m = _classify(line)
        if kind == "skip":
            return
        if kind == "clone":                  # the code under test is this checkout
            dest = Path(self.path(host, m.group(1)))
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(ROOT, target_is_directory=True)
        elif kind == "install":
            r = subprocess.run(["bash", self.path(host, m.group(1)), "--prefix", str(self.root[host])],
                               capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            assert r.returncode == 0, f"on {host}: `{line}`: {r.stdout}{r.stderr}"
        elif kind == "zmesh":
            self.last_output = self.zmesh(host, line)
        elif kind == "zmesh-stdin":
            self.last_output = self.zmesh(host, m.group(1), stdin=PASSWORD + "\n")
        elif kind == "export":
            for assignment in shlex.split(line, comments=True)[1:]:
                key, _, value = assignment.partition("=")
                self.env[host][key] = self.arg(host, value)
        elif kind == "copy":
            src, to, dst = m.groups()
            assert to in self.root, f"`{line}`: no host {to}"
            target = Path(self.path(to, dst))
            assert target.parent.is_dir(), f"on {host}: `{line}`: {dst}'s directory does not exist on {to}"
            shutil.copyfile(self.path(host, src), target)
        elif kind == "start":
            self.start(host, m.group(1))
        elif kind == "status":
            unit = next((u for u in self.units if u.name == f"{host}:{_unit_name(m.group(1))}"), None)
            assert unit is not None, f"on {host}: `{line}`: the unit was never started"
            unit.drain_notifications()
            assert unit.proc.poll() is None, f"on {host}: {unit.name} exited {unit.proc.poll()}:\n{unit.tail()}"
            assert unit.status, f"on {host}: {unit.name} sent no STATUS= line"
            said = re.search(r"#\s*STATUS line: (.+)$", line)   # "# STATUS line: sessions, tasks in flight, ..."
            for item in (said.group(1).split(",") if said else []):
                assert item.strip() in unit.status, f"on {host}: {unit.name}'s STATUS= has no {item.strip()!r}: " \
                                                    f"{unit.status!r}"
        else:                                # pragma: no cover
            raise AssertionError(kind)

    def start(self, host: str, unit_arg: str) -> None:
        """`systemctl enable --now UNIT` for a Type=notify unit: ExecStart= from the installed unit file,
        started in the host's namespace, ready once it sends READY=1."""
        name = _unit_name(unit_arg)
        base, at, rest = name.partition("@")
        instance = rest[: -len(".service")] if at else ""
        unit_file = self.root[host] / "etc" / "systemd" / "system" / (f"{base}@.service" if at else name)
        assert unit_file.exists(), f"on {host}: `systemctl enable --now {unit_arg}`: no {unit_file}"
        directives = dict(re.findall(r"^(\w+)=(.*)$", unit_file.read_text(), re.M))
        assert directives.get("Type") == "notify", f"{unit_file}: Type= is not notify"
        exec_start = shlex.split(directives["ExecStart"].replace("%i", instance))
        assert exec_start[0].endswith("/bin/zmesh"), f"{unit_file}: ExecStart= runs {exec_start[0]}"
        timeout = float(directives.get("TimeoutStartSec", "90"))
        cmd = [sys.executable, "-m", "client.cli"] + [self.arg(host, t) for t in exec_start[1:]]
        sock_path = os.path.join(self.sockdir, f"{host}-{len(self.units)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        env = dict(self.env[host], NOTIFY_SOCKET=sock_path)
        for key in ("ZMESH_MANAGER", "ZMESH_MANAGER_KEY"):   # a unit does not see the admin's shell
            env.pop(key, None)
        log = self.base / f"{host}-{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns[host]] + cmd, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd="/")
        unit = Unit(f"{host}:{name}", proc, log, sock)
        self.units.append(unit)
        deadline = time.monotonic() + timeout
        while not unit.ready:
            assert proc.poll() is None, f"on {host}: {name} exited {proc.returncode} before READY=1:\n{unit.tail()}"
            assert time.monotonic() < deadline, f"on {host}: {name} not ready within {timeout:g} s:\n{unit.tail()}"
            unit.drain_notifications(wait=0.2)


def _unit_name(arg: str) -> str:
    return arg if arg.endswith(".service") else arg + ".service"


# --- the test -----------------------------------------------------------------------------------

@pytest.fixture
def hosts(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (this runs as root in CI)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    probe = _run("ip", "netns", "list")
    if probe.returncode != 0:
        pytest.skip(f"`ip netns` is unavailable here: {probe.stderr.strip()}")
    steps = walkthrough()
    names = sorted(set(HOST.findall("".join(s.title + s.body for s in steps))))
    assert 2 <= len(names) <= 8, names
    mesh = Mesh(names, tmp_path / "hosts")
    try:
        mesh.up()
        yield steps, mesh
    finally:
        mesh.down()


def test_the_walkthrough_runs_as_written_across_four_hosts(hosts):
    steps, mesh = hosts
    assert mesh.hosts == ["m1", "m2", "m3", "m4"], mesh.hosts
    for step in steps:
        on = step.hosts(mesh.hosts)
        primary = on[0]
        for host in on:
            for lang, code, before in step.blocks:
                if host != primary and host in step.title:   # "On m2 (and likewise m3)": m3 with its own name
                    code = re.sub(rf"\b{primary}\b", host, code)
                assert lang in ("sh", "yaml"), f"step {step.number}: a ```{lang} block"
                if lang == "yaml":
                    target = Path(mesh.path(host, _yaml_target(step, before)))
                    assert target.parent.is_dir(), f"step {step.number} on {host}: no directory for {target}"
                    target.write_text(mesh.arg(host, code))
                else:
                    for line in _lines(code):
                        mesh.command(host, line)
    # the walkthrough's last words: what its final command prints
    m = re.search(r"The last line prints `([^`]+)`", steps[-1].after)
    assert m, "the last step does not say what its last command prints"
    assert mesh.last_output.strip() == m.group(1), (mesh.last_output, m.group(1))
    for unit in mesh.units:                  # nothing fell over along the way
        assert unit.proc.poll() is None, f"{unit.name} exited {unit.proc.returncode}:\n{unit.tail()}"
    for unit in reversed(mesh.units):        # `systemctl stop`: executors drain and exit 0, then the manager
        mesh._stop(unit)
        assert unit.proc.returncode == 0, f"{unit.name} stopped with exit {unit.proc.returncode}:\n{unit.tail()}"


@pytest.mark.parametrize("line", ["curl -sSL https://example.com/install | sh", "systemctl restart zeromesh-manager",
                                  "zmesh login --user alice; rm -rf /", "cp /etc/zeromesh/keys/manager.key /tmp",
                                  'echo "$OTHER" | zmesh login --user alice --password-stdin'])
def test_a_command_the_test_does_not_know_fails_it(line):
    with pytest.raises(AssertionError, match="does not know how to run"):
        _classify(line)
