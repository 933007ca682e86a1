"""``pacs-node config check`` finds, without starting anything, what would keep the node from working,
names each key, and prints each problem on one line however long (piped output is not wrapped)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def test_config_check_names_each_bad_key_on_one_line(tmp_path: Path) -> None:
    config = tmp_path / "pacs-node.toml"
    config.write_text(f"""
[node]
data_dir = "{tmp_path / 'var'}"
[node.tls]
cert_file = "{tmp_path / 'missing-cert.pem'}"
key_file = "{tmp_path / 'missing-key.pem'}"
[database]
url = "mysql://x@db/node"
[pipeline]
bundle = "{tmp_path / 'no-bundle'}"
[peers.pacs]
ae_title = "PACS"
host = "no-such-host.invalid"
port = 104
tls = {{ ca_file = "{tmp_path / 'missing-ca.pem'}" }}
""")
    done = subprocess.run([sys.executable, "-m", "pacs_node", "--config", str(config), "config", "check"],
                          capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    keys = [line.split(": ", 1)[0] for line in lines]
    assert keys == ["database.url", "pipeline.bundle", "node.tls.cert_file", "peers.pacs.tls.ca_file",
                    "peers.pacs.host"], lines
    assert all(len(line) > 0 for line in lines) and any(len(line) > 80 for line in lines)  # not wrapped at 80
