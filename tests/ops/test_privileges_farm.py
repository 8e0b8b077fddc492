"""Privileges of a real farm (issue 12, items 11 and 16).

* A TLS key only root can read (0600, owned by root) works with ``user = "nobody"``, at boot and
  at a reload that rotates it: the supervisor loads keys before privileges are dropped, and the
  workers run as ``nobody``.
* ``group`` without ``user`` is refused (it would leave the farm running as uid 0).
* A fork that fails at SIGTTIN (``RLIMIT_NPROC`` reached) is logged and the supervisor goes on.
"""

from __future__ import annotations

import os
import pwd
import resource
import signal
import smtplib
import ssl
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trustme

from tests.support.client import smtp_greeting
from tests.support.farms import REPO, FarmRunner, toml_config

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


#: A uid without a passwd entry: no other process runs as it, so RLIMIT_NPROC counts only ours.
FARM_UID = 64917


def _python_for(uid: int) -> tuple[str, dict[str, str]]:
    """An interpreter that still imports farm's modules after a process started as root drops
    to ``uid`` (workers import lazily): this one, or else (its stdlib is not reachable by
    others, say pyenv under /root) the system's of the same version with this environment's
    site-packages on PYTHONPATH. Skips the test when neither does."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = sysconfig.get_paths()["purelib"]
    probe = (
        f"import os; os.setgroups([]); os.setgid({uid}); os.setuid({uid}); "
        "import mailbox, farm.handlers, farm.relay, farm.supervisor.worker"
    )
    candidates = [
        (sys.executable, {"PYTHONPATH": str(REPO)}),
        (f"/usr/bin/python{version}", {"PYTHONPATH": os.pathsep.join([str(REPO), site])}),
    ]
    for python, env in candidates:
        if not os.path.exists(python):
            continue
        done = subprocess.run(
            [python, "-c", probe], env={**os.environ, **env}, capture_output=True, timeout=60
        )
        if done.returncode == 0:
            return python, env
    pytest.skip(f"no Python {version} can import farm after dropping to uid {uid}")


def _write_root_only(cert: trustme.LeafCert, chain: Path, key: Path) -> None:
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    for path in (chain, key):
        os.chown(path, 0, 0)
        os.chmod(path, 0o600)


def _peer_unit(port: int, context: ssl.SSLContext) -> str:
    """The organizational unit of the certificate the farm shows after STARTTLS."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("me")
        client.starttls(context=context)
        client.ehlo("me")
        assert client.sendmail("a@farm.test", ["b@farm.test"], b"over TLS\r\n") == {}
        subject = client.sock.getpeercert()["subject"]  # type: ignore[union-attr]
    return dict(item for rdn in subject for item in rdn)["organizationalUnitName"]


@needs_root
def test_root_only_key_works_with_user_at_boot_and_at_reload(
    farms: FarmRunner, tmp_path: Path
) -> None:
    ca = trustme.CA()
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    _write_root_only(ca.issue_cert("127.0.0.1", organization_unit_name="first"), chain, key)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "farm.handlers:Sink", "user": "nobody"},
        smtp={"tls_cert": str(chain), "tls_key": str(key)},
    )
    nobody = pwd.getpwnam("nobody").pw_uid
    python, env = _python_for(nobody)
    farm = farms.start(config=config, workers=2, python=python, env=env)
    workers = farm.wait_ready(2)
    for pid in workers.values():
        assert set(psutil.Process(pid).uids()) == {nobody}
    assert _peer_unit(farm.port, client_context) == "first"

    # Rotate the key (still root-only) and reload: the new generation serves the new one.
    _write_root_only(ca.issue_cert("127.0.0.1", organization_unit_name="second"), chain, key)
    mark = farm.log_size()
    farm.signal(signal.SIGHUP)
    farm.wait_log(r"reload complete: generation 2 serving", since=mark)
    for pid in farm.wait_workers(2, generation=2).values():
        assert set(psutil.Process(pid).uids()) == {nobody}
    assert _peer_unit(farm.port, client_context) == "second"

    # A key that cannot be loaded fails the reload with a clear line; the farm keeps serving.
    key.write_text("not a key\n")
    mark = farm.log_size()
    farm.signal(signal.SIGHUP)
    error = farm.wait_log(r"ERROR .*reload failed: (.*)", since=mark)
    assert "smtp.tls_key" in error[1] and "Traceback" not in farm.log()[mark:]
    assert _peer_unit(farm.port, client_context) == "second"


@needs_root
def test_a_spool_directory_the_user_cannot_write_stops_the_boot(
    farms: FarmRunner, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)  # root's: nobody cannot create files there
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "farm.handlers:Sink", "user": "nobody"},
        smtp={"spool_directory": str(spool)},
    )
    python, env = _python_for(pwd.getpwnam("nobody").pw_uid)
    farm = farms.start(config=config, workers=1, python=python, env=env, wait=False)
    assert farm.wait_exit() == 1
    assert f"smtp.spool_directory: cannot create files in {spool}: Permission denied" in (
        farm.log() + farm.stderr()
    )


def test_group_without_user_is_refused(farms: FarmRunner) -> None:
    farm = farms.start("--group", "nogroup", wait=False)
    assert farm.wait_exit() == 2
    assert "group: needs user" in farm.stderr()


def _as_farm_uid(*command: str) -> list[str]:
    return ["setpriv", f"--reuid={FARM_UID}", f"--regid={FARM_UID}", "--clear-groups", *command]


@pytest.fixture
def farm_uid_runner() -> Iterator[FarmRunner]:
    """A FarmRunner for farms run as FARM_UID, in a directory that uid owns."""
    directory = Path(tempfile.mkdtemp(prefix="farm-nproc-"))
    os.chown(directory, FARM_UID, FARM_UID)
    runner = FarmRunner(directory)
    try:
        yield runner
    finally:
        runner.cleanup()
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


@needs_root
def test_ttin_when_fork_fails_is_logged_and_the_supervisor_goes_on(
    farm_uid_runner: FarmRunner,
) -> None:
    # RLIMIT_NPROC 2 for the uid: the supervisor and one worker; the next fork fails (EAGAIN).
    # (Root is exempt from the limit, hence another uid.)
    python, env = _python_for(FARM_UID)
    farm = farm_uid_runner.start(
        "--handler",
        "farm.handlers:Sink",
        workers=1,
        prefix=_as_farm_uid("prlimit", "--nproc=2:"),
        python=python,
        env=env,
    )
    before = farm.wait_ready(1)
    mark = farm.log_size()
    farm.signal(signal.SIGTTIN)
    farm.wait_log(r"ERROR .*cannot start worker 1: .*; workers desired: 1", since=mark)
    farm.check_alive()
    assert "Traceback" not in farm.log()[mark:] + farm.stderr()
    assert farm.metric("farm_workers_desired") == 1
    assert farm.slots() == before
    assert smtp_greeting(farm.port).startswith("220 ")
    # The limit lifted (by a process of the same uid), the next TTIN works.
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    subprocess.run(
        _as_farm_uid("prlimit", f"--pid={farm.pid}", f"--nproc={limit}:"), check=True, timeout=30
    )
    farm.signal(signal.SIGTTIN)
    farm.wait_metric("farm_workers_desired", 2)
    farm.wait_ready(2)
