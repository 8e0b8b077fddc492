"""Real rspamd (Debian's package) for the scanning tests, and OpenDKIM as a second milter.

:class:`Rspamd` writes a minimal configuration into its own directory (no Redis, no DNS, a
five-name TLD list so it starts in a fraction of a second) and runs ``rspamd -f`` with a
normal worker (HTTP /checkv2) and a proxy worker in milter mode (scanning itself) on free
loopback ports. Lua rules written by the test map subject markers to actions:

- ``FARM-SOFT-REJECT`` -> soft reject (451), ``FARM-ADD-HEADER`` -> add header (score 7),
  ``FARM-REWRITE-SUBJECT`` -> rewrite subject (score 11); GTUBE -> reject (rspamd built-in).

``milter_headers`` adds ``X-Spamd-Result`` and ``X-Spam-Status`` to every message, so a clean
message arrives with rspamd's headers. Run as root, rspamd needs ``-u``/``-g``: the workers
then run as ``_rspamd`` and its directory is handed to that user. Every process is stopped by
its pid.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import free_port, listening
from tests.support.processes import stop_process
from tests.support.wait import WAIT, wait_for

RSPAMD = shutil.which("rspamd", path=f"{os.environ.get('PATH', '')}:/usr/bin:/usr/sbin")
OPENDKIM = shutil.which("opendkim", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
OPENDKIM_GENKEY = shutil.which("opendkim-genkey", path=f"{os.environ.get('PATH', '')}:/usr/sbin")

#: Outside CI a missing rspamd skips these tests; CI installs it, so there it fails them.
needs_rspamd = pytest.mark.skipif(
    RSPAMD is None and not os.environ.get("CI"),
    reason="rspamd not installed (apt-get install rspamd)",
)
needs_opendkim = pytest.mark.skipif(
    (OPENDKIM is None or OPENDKIM_GENKEY is None) and not os.environ.get("CI"),
    reason="opendkim not installed (apt-get install opendkim opendkim-tools)",
)

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

RULES = """\
rspamd_config:register_symbol({
  name = 'FARM_TEST_SOFT', score = 0.0,
  callback = function(task)
    local s = task:get_header('Subject')
    if s and s:find('FARM-SOFT-REJECT', 1, true) then
      task:set_pre_result('soft reject', 'Try again later (farm test)')
      return true
    end
    return false
  end
})
local function subject_rule(name, marker, score)
  rspamd_config:register_symbol({
    name = name, score = score,
    callback = function(task)
      local s = task:get_header('Subject')
      return s ~= nil and s:find(marker, 1, true) ~= nil
    end
  })
end
subject_rule('FARM_TEST_ADD_HEADER', 'FARM-ADD-HEADER', 7.0)
subject_rule('FARM_TEST_REWRITE', 'FARM-REWRITE-SUBJECT', 11.0)
"""


def _config(d: Path, http_port: int, milter_port: int) -> str:
    return f"""\
options {{
  pidfile = "{d}/rspamd.pid";
  filters = "";
  dns {{ nameserver = ["127.0.0.1:1"]; timeout = 1s; retransmits = 1; }}
  local_addrs = [];
  hs_cache_dir = "{d}/db";
  tempdir = "{d}/db";
  url_tld = "{d}/tld.dat";
}}
modules {{ path = "{d}/plugins"; }}
logging {{ type = "file"; filename = "{d}/rspamd.log"; level = "info"; }}
actions {{ reject = 15; rewrite_subject = 10; add_header = 6; subject = "[SPAM] %s"; }}
milter_headers {{
  use = ["x-spamd-result", "x-spam-status"];
  skip_local = false;
  skip_authenticated = false;
}}
lua = "{d}/rules.lua";
worker "normal" {{ bind_socket = "127.0.0.1:{http_port}"; count = 1; }}
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{milter_port}";
  milter = yes;
  timeout = 120s;
  count = 1;
  upstream "local" {{ default = yes; self_scan = yes; }}
  spam_header = "X-Spam";
  reject_message = "Spam message rejected";
}}
"""


def _hand_over(directory: Path, user: str) -> None:
    """Give ``directory`` (and what is in it) to ``user`` when we are root."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for path in [directory, *directory.rglob("*")]:
        os.lchown(path, entry.pw_uid, entry.pw_gid)


class Rspamd:
    """``rspamd -f`` with a normal worker and a milter-mode proxy on free loopback ports."""

    def __init__(self) -> None:
        assert RSPAMD is not None, "rspamd is not installed"
        self.dir = Path(tempfile.mkdtemp(prefix="farm-rspamd-"))
        os.chmod(self.dir, 0o755)
        self.http_port = free_port()
        self.milter_port = free_port()
        (self.dir / "db").mkdir()
        (self.dir / "plugins").mkdir()
        plugin = Path("/usr/share/rspamd/plugins/milter_headers.lua")
        (self.dir / "plugins" / plugin.name).symlink_to(plugin)
        (self.dir / "tld.dat").write_text("com\norg\nnet\ntest\nexample\n")
        (self.dir / "rules.lua").write_text(RULES)
        (self.dir / "rspamd.conf").write_text(_config(self.dir, self.http_port, self.milter_port))
        args = [RSPAMD, "-f", "-c", str(self.dir / "rspamd.conf")]
        if os.geteuid() == 0:
            _hand_over(self.dir, "_rspamd")
            args += ["-u", "_rspamd", "-g", "_rspamd"]
        self.output = open(self.dir / "output.txt", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                lambda: (
                    self._check_alive()
                    or (listening(self.http_port) and listening(self.milter_port))
                ),
                timeout=WAIT,
                what="rspamd listening",
            )
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def milter(self) -> str:
        return f"inet:127.0.0.1:{self.milter_port}"

    def log(self) -> str:
        texts = []
        for name in ("output.txt", "rspamd.log"):
            path = self.dir / name
            if path.exists():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def _check_alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"rspamd exited with {self.process.returncode}:\n{self.log()}")
        return False

    def stop(self) -> None:
        """Stop rspamd by its pid (TERM, then KILL); its workers follow their main process."""
        stop_process(self.process, grace=WAIT)
        wait_for(lambda: not listening(self.http_port), timeout=WAIT, what="rspamd's port closed")
        self.output.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def rspamd() -> Iterator[Rspamd]:
    """One rspamd for the whole run (tests that stop rspamd start their own)."""
    server = Rspamd()
    yield server
    server.cleanup()


@pytest.fixture
def own_rspamd() -> Iterator[Rspamd]:
    """An rspamd this test may stop."""
    server = Rspamd()
    yield server
    server.cleanup()


class OpenDKIM:
    """``opendkim -f`` signing for example.com (clients in 127.0.0.1) and verifying others."""

    def __init__(self) -> None:
        assert OPENDKIM is not None and OPENDKIM_GENKEY is not None, "opendkim not installed"
        self.dir = Path(tempfile.mkdtemp(prefix="farm-opendkim-"))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        subprocess.run(
            [OPENDKIM_GENKEY, "-b", "1024", "-d", "example.com", "-s", "farm", "-D", str(self.dir)],
            check=True,
            capture_output=True,
        )
        key = self.dir / "farm.private"
        conf = self.dir / "opendkim.conf"
        conf.write_text(
            f"""\
Syslog no
Mode sv
Domain example.com
Selector farm
KeyFile {key}
InternalHosts 127.0.0.1
AlwaysAddARHeader yes
AuthservID farm-test
Socket inet:{self.port}@127.0.0.1
PidFile {self.dir}/opendkim.pid
UserID opendkim:opendkim
RequireSafeKeys no
DNSTimeout 1
Nameservers 127.0.0.1
"""
        )
        args = [OPENDKIM, "-f", "-x", str(conf)]
        if os.geteuid() == 0:
            _hand_over(self.dir, "opendkim")
            os.chmod(key, 0o600)
        else:
            conf.write_text(conf.read_text().replace("UserID opendkim:opendkim\n", ""))
        self.output = open(self.dir / "output.txt", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                lambda: self._check_alive() or listening(self.port), timeout=WAIT, what="opendkim"
            )
        except BaseException:
            self.stop()
            raise

    @property
    def milter(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def _check_alive(self) -> bool:
        if self.process.poll() is not None:
            text = (self.dir / "output.txt").read_text(errors="replace")
            raise AssertionError(f"opendkim exited with {self.process.returncode}:\n{text}")
        return False

    def stop(self) -> None:
        stop_process(self.process, grace=WAIT)
        self.output.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def opendkim() -> Iterator[OpenDKIM]:
    server = OpenDKIM()
    yield server
    server.stop()
