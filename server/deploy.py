"""Deployment helpers: credentials for a SuperLink and its SuperNodes, and the exact commands.

fedrec deploys with Flower's own runtime: ``flower-superlink`` (server side, Fleet API for the
SuperNodes, Control API for ``flwr``), ``flower-supernode`` on each device (it runs fedrec's
``ClientApp`` in a subprocess), and ``flwr run`` to submit the app. This module only writes the
tedious parts:

- a certificate authority (``ca.crt``/``ca.key``, EC P-384, self-signed) and a server certificate
  for the SuperLink signed by it, valid for the host names/IPs given (TLS on every API);
- one EC P-384 key pair per SuperNode in OpenSSH format (``<node>.key`` private, ``.pub``
  public): with ``--enable-supernode-auth`` the SuperLink only accepts SuperNodes whose public key
  was registered (``flwr supernode register <node>.pub``);
- ``commands.sh``-style text with the commands to start everything.

Keys are written with mode 0600 and never overwritten (delete the folder to start again). For a
production deployment use your own PKI; these credentials are for tests and small deployments.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


@dataclass(frozen=True)
class Credentials:
    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # name -> (private, public)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrec"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RESERVED = ("ca", "server")  # ca.key and server.key are the CA's and the SuperLink's


def check_node_names(nodes: list[str]) -> None:
    """Node names become file names (``NAME.key``, ``NAME.pub``) in the deployment folder:
    letters, digits, ``_ . -``, starting with a letter or digit, at most 64 characters, not
    ``ca`` or ``server``, no two alike (ignoring case). Raises ValueError before anything is
    written."""
    if not nodes:
        raise ValueError("give at least one node name")
    # file names: on a case-insensitive file system CA.key is ca.key and n0.key is N0.key
    bad = [n for n in nodes if not _NODE_NAME.fullmatch(n) or n.lower() in _RESERVED]
    if bad:
        raise ValueError(
            f"node names {bad} are not usable: a name is 1-64 letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit, and not {' or '.join(_RESERVED)}"
        )
    folded = [n.lower() for n in nodes]
    twice = sorted({n for n in nodes if folded.count(n.lower()) > 1})
    if twice:
        raise ValueError(f"node names {twice} are given more than once")


def check_folder(root: Path) -> None:
    """``root`` must be a folder or not exist yet (with a folder, not a file, above it)."""
    for p in (root, *root.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{p} is a file, not a folder: choose another deployment folder")
        if p.exists():
            return


def make_credentials(
    root: Path, *, nodes: list[str], hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> Credentials:
    """CA + SuperLink certificate for ``hosts`` + one OpenSSH EC key pair per node name."""
    check_node_names(nodes)
    check_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [p for p in (root / "ca.key", root / "server.key") if p.exists()] + [
        root / f"{n}.key" for n in nodes if (root / f"{n}.key").exists()
    ]
    if taken:
        raise FileExistsError(
            f"{taken[0]} already exists: credentials are never overwritten; use a new folder"
        )
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedrec test CA"))
        .issuer_name(_name("fedrec test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0][:64]))  # a CN holds 64 characters; the SANs name all
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(root / "ca.key", _pem_key(ca_key))
    (root / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(root / "server.key", _pem_key(server_key))
    (root / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    node_keys = {}
    for n in nodes:
        node_keys[n] = make_node_key(root, n)
    return Credentials(root, root / "ca.crt", root / "server.pem", root / "server.key", node_keys)


def make_node_key(root: Path, name: str) -> tuple[Path, Path]:
    """One SuperNode's EC P-384 key pair in OpenSSH format: ``name.key``, ``name.pub``."""
    check_node_names([name])
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(root / f"{name}.key", priv)
    (root / f"{name}.pub").write_bytes(pub + f" fedrec-{name}\n".encode())
    return root / f"{name}.key", root / f"{name}.pub"


def flwr_home_config(home: Path, *, name: str, control: str, ca_cert: Path) -> Path:
    """A ``FLWR_HOME/config.toml`` naming the SuperLink's Control API with its CA (for
    ``flwr run`` and ``flwr supernode register``)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{control}"\n'
        f'root-certificates = "{ca_cert.resolve()}"\n'
    )
    return path


def commands(
    creds: Credentials,
    *,
    superlink: str = "127.0.0.1:8000",
    data_dirs: dict[str, Path] | None = None,
    project: Path = Path("."),
) -> str:
    """The shell commands for this deployment, in order, with these credentials.

    Flower 1.41's SuperLink serves the Fleet API (SuperNodes), the Control API (``flwr``) and
    the runtime API over one HTTPS port (``--host``/``--port``, default 127.0.0.1:8000); bind
    ``--host 0.0.0.0`` to accept devices from other machines.
    """
    q = shlex.quote
    host, _, port = superlink.rpartition(":")
    # an IPv6 address is bracketed in HOST:PORT, bare where it is bound (uvicorn's getaddrinfo)
    bind = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    home = creds.root / "flwr-home"
    lines = [
        "# 1. server: the SuperLink (TLS on all APIs, only registered SuperNodes may connect)",
        f"flower-superlink --ssl-ca-certfile {q(str(creds.ca_cert))} "
        f"--ssl-certfile {q(str(creds.server_cert))} --ssl-keyfile {q(str(creds.server_key))} "
        f"--enable-supernode-auth --disable-runtime-dependency-installation "
        f"--database {q(str(creds.root / 'superlink.db'))} --host {q(bind)} --port {q(port)}",
        "",
        "# 2. server: register each SuperNode's public key (flwr talks to the Control API)",
        f"export FLWR_HOME={q(str(home))}",
    ]
    for name, (_priv, pub) in creds.node_keys.items():
        lines.append(f"flwr supernode register {q(str(pub))} --name {q(name)}")
    lines += [
        "",
        "# 3. each device: a SuperNode with its own data folder and private key",
        "#    (its privacy budget and the latest global model live in <data-dir>/fedrec-state/)",
    ]
    for i, (name, (priv, _pub)) in enumerate(creds.node_keys.items()):
        data = (data_dirs or {}).get(name, Path(f"/path/to/{name}/data"))
        cfg = f"data-dir='{data}' client-id='{name}'"
        lines.append(
            f"flower-supernode --superlink {q(superlink)} --root-certificates "
            f"{q(str(creds.ca_cert))} --auth-supernode-private-key {q(str(priv))} "
            f"--node-config {q(cfg)} --port {9094 + i}"
        )
    lines += [
        "",
        "# 4. server: submit the run from the fedrec source folder (keys as in `fedrec simulate",
        "#    --set`; 'data' is the server's evaluation data with the same public catalog)",
        f"export FLWR_HOME={q(str(home))}",
        f"flwr run {q(str(project))} fedrec --run-config "
        + q("num-rounds=20 fraction-train=1.0 run-dir='runs/deployed'")
        + " --stream",
        "",
        "# 5. a device: rank for its own user with the latest global model, offline",
        "fedrec recommend /path/to/n0/data/fedrec-state/model-cache --history 1,50,181",
    ]
    return "\n".join(lines) + "\n"


def device_folders(src: Path, out: Path, devices: int) -> list[Path]:
    """Split a data folder by user into ``devices`` folders (``out/device-<i>``), each with the
    whole public catalog (``items.tsv``, ``dataset.json``) and only its own users' interactions
    and profiles: what each device would hold. For tests and demos of a deployment."""
    from fedrec.shared.data import load_dataset
    from fedrec.shared.data.layout import INTERACTIONS, ITEMS, META, USERS

    load_dataset(src)  # refuse to split a folder that does not validate
    if devices < 1:
        raise ValueError(f"devices={devices} must be >= 1")
    head, *rows = (src / INTERACTIONS).read_text(encoding="utf-8").rstrip("\n").split("\n")
    col = head.split("\t").index("user_id")
    users = sorted({int(r.split("\t")[col]) for r in rows})
    if len(users) < devices:
        raise ValueError(f"{len(users)} users cannot fill {devices} devices")
    owner = {u: i % devices for i, u in enumerate(users)}
    # every target checked before the first is written: never a half-written split
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: give a folder for the device folders")
    taken = [out / f"device-{d}" for d in range(devices) if (out / f"device-{d}").exists()]
    if taken:
        raise FileExistsError(
            f"{', '.join(str(t) for t in taken[:3])} already exist{'s' if len(taken) == 1 else ''}"
            f": nothing was written; choose a new folder for the devices, or remove those"
        )
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{out}: {parent} is a file, so no folder can be made under it")
    folders = []
    for d in range(devices):
        folder = out / f"device-{d}"
        folder.mkdir(parents=True, exist_ok=False)
        mine = [r for r in rows if owner[int(r.split("\t")[col])] == d]
        (folder / INTERACTIONS).write_text("\n".join([head, *mine]) + "\n", encoding="utf-8")
        for name in (ITEMS, META):
            if (src / name).is_file():
                (folder / name).write_bytes((src / name).read_bytes())
        if (src / USERS).is_file():
            uhead, *urows = (src / USERS).read_text(encoding="utf-8").rstrip("\n").split("\n")
            ucol = uhead.split("\t").index("user_id")
            keep = [r for r in urows if owner.get(int(r.split("\t")[ucol])) == d]
            (folder / USERS).write_text("\n".join([uhead, *keep]) + "\n", encoding="utf-8")
        folders.append(folder)
    return folders


def check_host(host: str, option: str) -> str:
    """``host`` as it goes into the certificate: an IP address (an IPv6 one may come in
    brackets) or a DNS name (labels of letters, digits and '-', 1..63 characters each, 253 in
    all). Raises ValueError naming ``option``."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    labels = bare.split(".")
    ok = 0 < len(bare) <= 253 and all(
        0 < len(label) <= 63
        and label.isascii()
        and all(c.isalnum() or c == "-" for c in label)
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    )
    if not ok or bare != host:
        raise ValueError(
            f"{option} {host!r}: not an IP address or a host name (letters, digits and '-' "
            "between dots, at most 63 characters between dots and 253 in all); an IPv6 address "
            "goes in brackets in --superlink, e.g. [::1]:8000"
        )
    return bare


def init_deployment(
    root: Path, *, nodes: list[str], superlink: str = "127.0.0.1:8000", hosts: tuple[str, ...] = ()
) -> tuple[Credentials, str]:
    """Credentials, ``root/flwr-home/config.toml`` and ``root/commands.sh`` for a deployment."""
    host, _, port = superlink.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"--superlink {superlink!r}: expected HOST:PORT with a port in 1..65535, "
            "e.g. 127.0.0.1:8000"
        )
    if ":" in host and not host.startswith("["):  # ::1:8000 is ambiguous, and no HOST:PORT
        raise ValueError(
            f"--superlink {superlink!r}: write an IPv6 address in brackets, e.g. [::1]:{port}"
        )
    bare = check_host(host, "--superlink")
    extra = [check_host(h, "--host") for h in hosts]
    names = tuple(dict.fromkeys((bare, *extra, "localhost", "127.0.0.1")))
    creds = make_credentials(root, nodes=nodes, hosts=names)
    flwr_home_config(root / "flwr-home", name="fedrec", control=superlink, ca_cert=creds.ca_cert)
    text = commands(creds, superlink=superlink)
    (root / "commands.sh").write_text("#!/usr/bin/env bash\n" + text)
    return creds, text
