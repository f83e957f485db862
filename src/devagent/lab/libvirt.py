"""A lab host's libvirtd (``lab up --libvirt``): one per host, beside its devagentd, as if
each host were its own machine running libvirt.

Each runs in its host's network namespace and in a mount namespace of its own, in which
the host's folder ``libvirt/`` is bind-mounted over libvirt's (:data:`MOUNTS`): its own
configuration, state, runtime sockets and logs. It listens on the host's address for the
other libvirtds (a peer-to-peer migration's control connection): TLS with the host's
certificate in a lab with certificates, only the lab's hosts admitted; plain TCP without
authentication in an ``--insecure`` lab. Each has its own host UUID (libvirt refuses a
migration to "the same host" by UUID). QEMU's own migration TLS (``--tls``) uses the
host's certificate folder as it is.

Clients on this machine reach a host's libvirtd by its socket (:func:`local_uri`); a
libvirtd reaches a peer's with :func:`peer_uri`. ``lab down`` stops it with the host's
other processes (everything in the namespace), and removes its folder with the lab's.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

from devagent.errors import EnvironmentProblem, PeerError
from devagent.lab import net
from devagent.lab.daemons import tail
from devagent.lab.layout import LabHost
from devagent.tls import CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY, host_dn
from devagent.wait import wait_until_blocking

LIBVIRTD = "libvirtd"
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/bin"
START_TIMEOUT_S = 30.0
#: The host's subfolder mounted over each of libvirt's folders.
MOUNTS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
#: A libvirt client's names for the files of a ``pkipath=`` folder, from a host's folder.
LIBVIRT_PKI_NAMES = {
    "cacert.pem": CA_CERT,
    "clientcert.pem": CLIENT_CERT,
    "clientkey.pem": CLIENT_KEY,
    "servercert.pem": SERVER_CERT,
    "serverkey.pem": SERVER_KEY,
}


def root(host: LabHost) -> Path:
    return host.dir / "libvirt"


def socket_path(host: LabHost) -> Path:
    """The host's libvirtd socket, as this machine's root mount namespace sees it."""
    return root(host) / "run" / "libvirt-sock"


def local_uri(host: LabHost) -> str:
    """How a client on this machine (``virsh``, the host's devagentd) reaches it."""
    return f"qemu:///system?socket={socket_path(host)}"


def peer_uri(host: LabHost, caller: LabHost) -> str:
    """How ``caller``'s libvirtd reaches ``host``'s (a peer-to-peer migration's connection):
    over TLS with ``caller``'s certificate, or plain TCP in an insecure lab."""
    return peer_uri_template(caller).format(address=host.address)


def peer_uri_template(caller: LabHost) -> str:
    """:func:`peer_uri` for any peer's ``{address}`` (the daemon's ``--libvirt-peer-uri``)."""
    if caller.tls:
        return f"qemu+tls://{{address}}/system?pkipath={pki_path(caller)}"
    return "qemu+tcp://{address}/system"


def pki_path(host: LabHost) -> Path:
    """The host's certificates under libvirt's own file names."""
    return root(host) / "pki"


def require_libvirt() -> None:
    if shutil.which(LIBVIRTD, path=SBIN_PATH) is None or shutil.which("virsh") is None:
        raise EnvironmentProblem(
            "libvirtd is not installed: apt-get install libvirt-daemon-system "
            "libvirt-daemon-driver-qemu libvirt-clients (make deps does)"
        )


def configure(host: LabHost, lab_hosts: list[LabHost], host_certs: Path | None) -> None:
    """Make the host's libvirt folders and configuration: its address, its UUID, TLS with
    the host's certificate (``host_certs``; None: plain TCP), QEMU as libvirt runs it here
    (root, no cgroups, namespaces, security driver or log daemon)."""
    for sub in MOUNTS:
        (root(host) / sub).mkdir(parents=True, exist_ok=True)
    listen = [f'listen_addr = "{host.address}"', f'host_uuid = "{uuid.uuid4()}"']
    qemu = [
        'user = "root"', 'group = "root"', "dynamic_ownership = 0", "remember_owner = 0",
        'security_driver = "none"', "namespaces = []", "cgroup_controllers = []",
        'stdio_handler = "file"',
    ]  # fmt: skip
    if host_certs is None:
        listen += ["listen_tls = 0", "listen_tcp = 1", 'auth_tcp = "none"']
    else:
        pki_path(host).mkdir(exist_ok=True)
        for name, ours in LIBVIRT_PKI_NAMES.items():
            shutil.copy2(host_certs / ours, pki_path(host) / name)
        # tls_allowed_dn_list: the lab's hosts; an operator's certificate, or a stranger's,
        # is refused
        admitted = ", ".join(f'"{host_dn(h.name)}"' for h in lab_hosts)
        listen += [
            "listen_tls = 1", "listen_tcp = 0", 'auth_tls = "none"',
            f'key_file = "{host_certs / SERVER_KEY}"', f'cert_file = "{host_certs / SERVER_CERT}"',
            f'ca_file = "{host_certs / CA_CERT}"', f"tls_allowed_dn_list = [{admitted}]",
        ]  # fmt: skip
        qemu += [f'migrate_tls_x509_cert_dir = "{host_certs}"', "migrate_tls_x509_verify = 1"]
    etc = root(host) / "etc"
    (etc / "libvirtd.conf").write_text("\n".join(listen) + "\n")
    (etc / "qemu.conf").write_text("\n".join(qemu) + "\n")


def start(host: LabHost) -> subprocess.Popen[bytes]:
    """Start the host's libvirtd in its namespace, with its folders mounted over libvirt's;
    returns the process (its pid is libvirtd's: every step execs)."""
    Path(MOUNTS["run"]).mkdir(parents=True, exist_ok=True)  # a mount point must exist
    mounts = "; ".join(
        f"mount --bind {shlex.quote(str(root(host) / sub))} {target}"
        for sub, target in MOUNTS.items()
    )
    pid_file = f"{MOUNTS['run']}/libvirtd.pid"  # its own: the default is the machine's
    script = (
        f"set -e; hostname {host.name}; {mounts}; exec {LIBVIRTD} --listen --pid-file {pid_file}"
    )
    argv = [
        *net.ns_prefix(host.netns),
        "unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script,
    ]  # fmt: skip
    with open(log_file(host), "ab") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=host.dir, start_new_session=True,
        )  # fmt: skip


def log_file(host: LabHost) -> Path:
    return host.dir / "libvirtd.log"


def virsh(host: LabHost, *args: str, timeout: float = 30.0) -> str:
    """``virsh`` on the host's libvirtd; its output, or :class:`PeerError` with its error."""
    argv = ["virsh", "-c", local_uri(host), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as err:
        raise EnvironmentProblem("virsh is not installed (package libvirt-clients)") from err
    except subprocess.TimeoutExpired as err:
        raise PeerError(f"host {host.name}: `virsh {' '.join(args)}` hung {timeout:g} s") from err
    if done.returncode != 0:
        raise PeerError(f"host {host.name}: `virsh {' '.join(args)}`: {done.stderr.strip()}")
    return done.stdout


def wait_answering(proc: subprocess.Popen[bytes], host: LabHost, timeout: float) -> None:
    """Until the host's libvirtd answers on its socket; raises at once if it exits."""

    def answering() -> bool:
        if proc.poll() is not None:
            raise PeerError(
                f"libvirtd of host {host.name} exited with status {proc.returncode}; last "
                f"lines of {log_file(host)}:\n{tail(log_file(host))}"
            )
        if not socket_path(host).exists():
            return False
        try:
            virsh(host, "version", timeout=5.0)
        except PeerError:
            return False
        return True

    wait_until_blocking(
        answering, timeout=timeout, what=f"libvirtd of host {host.name} answering",
        interval=0.1, detail=lambda: f"last lines of {log_file(host)}:\n{tail(log_file(host))}",
    )  # fmt: skip
