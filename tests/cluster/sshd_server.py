"""A throwaway sshd on 127.0.0.2 and 127.0.0.3, so that pdsh (the deepspeed launcher's default
multi-node runner) reaches two "nodes" on this host over real ssh.

Everything lives in a temporary folder: host key, user key, authorized_keys (named by the server's
own `AuthorizedKeysFile`, so ~/.ssh/authorized_keys is never touched), pid file and log. The client
side is what a user sets up for passwordless ssh: a `Host 127.0.0.2 127.0.0.3` block in
~/.ssh/config naming the key (the deepspeed launcher first checks the first host with a plain
`ssh -p PORT HOST hostname`, so PDSH_SSH_ARGS_APPEND alone is not enough). `stop` restores
~/.ssh/config byte for byte (or removes what it created). Needs root (sshd, /run/sshd) and Debian's
openssh-server. The server is stopped by the PID it wrote.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HOSTS = ("127.0.0.2", "127.0.0.3")
PORT = 2222


class SshServer:
    def __init__(self, port: int = PORT) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="relalign-sshd-"))
        self.root.chmod(0o700)
        self.key = self.root / "id_ed25519"
        self.pid: int | None = None
        self.ssh_dir = Path.home() / ".ssh"
        self._saved_config: bytes | None = None
        self._created_ssh_dir = False
        self._config_installed = False

    def start(self) -> "SshServer":
        keygen = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
        for path in (self.root / "host_ed25519", self.key):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
        (self.root / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (self.root / "authorized_keys").chmod(0o600)
        config = self.root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    *(f"ListenAddress {h}" for h in HOSTS),
                    f"HostKey {self.root / 'host_ed25519'}",
                    f"PidFile {self.root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    # /tmp above the key folder is world-writable (sticky); StrictModes would refuse the file
                    "StrictModes no",
                    "PrintMotd no",
                    "AcceptEnv no",
                ]
            )
            + "\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        proc = subprocess.run(
            ["/usr/sbin/sshd", "-f", str(config), "-E", str(self.root / "sshd.log")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sshd exited {proc.returncode}: {proc.stderr}{self.log()}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid_file = self.root / "sshd.pid"
            if pid_file.exists() and pid_file.read_text().strip().isdigit() and all(self._listening(h) for h in HOSTS):
                self.pid = int(pid_file.read_text().strip())
                self._install_client_config()
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("sshd did not listen within 30 s" + self.log())

    def _install_client_config(self) -> None:
        config = self.ssh_dir / "config"
        if not self.ssh_dir.exists():
            self.ssh_dir.mkdir(mode=0o700)
            self._created_ssh_dir = True
        self._saved_config = config.read_bytes() if config.exists() else None
        block = (
            f"\n# relalign cluster test (removed when the test ends)\nHost {' '.join(HOSTS)}\n"
            f"    IdentityFile {self.key}\n    IdentitiesOnly yes\n    StrictHostKeyChecking no\n"
            "    UserKnownHostsFile /dev/null\n    BatchMode yes\n    LogLevel ERROR\n"
        )
        # first match wins in ssh_config: our block goes first
        config.write_bytes(block.encode() + (self._saved_config or b""))
        config.chmod(0o600)
        self._config_installed = True

    def _restore_client_config(self) -> None:
        if not self._config_installed:
            return
        config = self.ssh_dir / "config"
        if self._saved_config is None:
            config.unlink(missing_ok=True)
        else:
            config.write_bytes(self._saved_config)
        if self._created_ssh_dir and not any(self.ssh_dir.iterdir()):
            self.ssh_dir.rmdir()
        self._config_installed = False

    def _listening(self, host: str) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex((host, self.port)) == 0

    def log(self) -> str:
        path = self.root / "sshd.log"
        return "\n--- sshd.log\n" + path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        self._restore_client_config()
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)
