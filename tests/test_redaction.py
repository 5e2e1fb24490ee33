"""Secrets never reach a job's snapshot (slurm/common.sh `dyn_snapshot`): the environment, the
uncommitted git diff and the batch script are redacted by megatron_dynamoe/runtime/redaction.py,
and the snapshot folder is the owner's only. Table-driven: what must go, what must stay (a
snapshot that hides SLURM_JOB_ID or PATH is useless), then dyn_snapshot itself from bash, with
and without a python to redact with."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from megatron_dynamoe.runtime.redaction import (REDACTED, is_secret_name, redact_environment,
                                                redact_text)
from tests.launch_helpers import REPO, quiet_env

TOOL = os.path.join(REPO, "megatron_dynamoe", "runtime", "redaction.py")
PEM = ("-----BEGIN OPENSSH PRIVATE KEY-----\n"
       "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQPEMLINEONE\n"
       "AAAAC3NzaC1lZDI1NTE5AAAAIPEMLINETWO0123456789abcdefgh\n"
       "-----END OPENSSH PRIVATE KEY-----")

# (name, value, what must not appear in the output)
SECRET_ENV = [
    ("PGPASSWORD", "pg-s3cret-value", "pg-s3cret"),
    ("FOO_APIKEY", "apikey-value-1", "apikey-value"),
    ("GH_PAT", "patvalue12345", "patvalue"),
    ("MY_JWT", "jwtvalue-abc", "jwtvalue"),
    ("HF_TOKEN", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz123456", "AbCdEfGhIj"),
    ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtn"),
    ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE", "IOSFODNN7"),
    ("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567", "0123456789abcdef"),
    ("MYSQL_PWD", "mysql-pass-1", "mysql-pass"),
    ("DB_PASS", "dbpass-value", "dbpass-value"),
    ("PGPASS", "pgpass-value", "pgpass-value"),
    ("SLACK_BOT_TOKEN", "xoxb-123456789012-abcdefghijkl", "abcdefghijkl"),
    ("OAUTH_CLIENT_SECRET", "oauth-secret-1", "oauth-secret"),
    ("SESSION_COOKIE", "cookie-value-9", "cookie-value"),
    ("NPM_AUTH", "npm-auth-value", "npm-auth-value"),
    ("my_password", "lowercase-secret", "lowercase-secret"),
    ("CI_JOB_PASSPHRASE", "passphrase-value", "passphrase-value"),
    ("SLURM_JWT", "eyJhbGciOiJIUzI1NiJ9.slurm-jwt", "slurm-jwt"),  # slurmrestd's token
    # Multi-line values: no line may survive, whatever the name says.
    ("DEPLOY_KEY", PEM, "PEMLINE"),
    ("SETTINGS_BLOB", "first line\n" + PEM + "\nlast line", "PEMLINE"),
    ("SSH_PRIVATE", "line-one-secret\nline-two-secret\nline-three-secret", "secret"),
    # Values that are secrets whatever the variable is called.
    ("DATABASE_URL", "postgres://trainer:db-p4ss@db.example.com:5432/runs", "db-p4ss"),
    ("GIT_REMOTE", "https://user:ghs-token-77@github.com/org/repo.git", "ghs-token-77"),
    ("REDIS_URL", "redis://:r3dis-pw@cache:6379/0", "r3dis-pw"),
    ("EXTRA_ARGS", "--hub ghp_abcdefghijklmnopqrstuvwxyz0123456789", "abcdefghijklmnop"),
    ("CI_ID_BLOB", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
     "dozjgNryP4J3"),
    ("TRAIN_OPTS", "--report-to wandb api_key=wandb-k3y-value", "wandb-k3y-value"),
]

# (name, value): must be written exactly as they are.
KEPT_ENV = [
    ("PATH", "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"),
    ("PWD", "/home/user/megatron-dynamoe"),
    ("OLDPWD", "/home/user"),
    ("SLURM_JOB_ID", "123456"),
    ("SLURM_JOB_NODELIST", "gpu-[001-008]"),
    ("SLURM_CPUS_PER_TASK", "8"),
    ("SLURM_RESTART_COUNT", "1"),
    ("SLURM_WCKEY", "project-x"),
    ("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7"),
    ("MASTER_ADDR", "gpu-001"),
    ("MASTER_PORT", "29500"),
    ("TOKENIZER", "/models/Llama-2-70b-hf"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("HTTPS_PROXY", "http://proxy.example.com:3128"),
    ("HF_HOME", "/scratch/hf"),
    ("GIT_ASKPASS", "/usr/lib/git-core/git-gui--askpass"),
    ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
    ("PGPASSFILE", "/home/user/.pgpass"),
    ("GIT_AUTHOR_NAME", "A. Researcher"),
    ("NCCL_IB_HCA", "mlx5"),
    ("RUN_URL", "https://wandb.ai/team/project/runs/abc123"),
]


@pytest.mark.parametrize("name, value, planted", SECRET_ENV, ids=[c[0] for c in SECRET_ENV])
def test_secret_environment_values_are_redacted(name, value, planted):
    (line,) = redact_environment({name: value})
    assert planted not in line, line
    assert line.startswith(f"{name}=") and REDACTED in line
    assert "\n" not in line  # one line per variable, whatever the value


@pytest.mark.parametrize("name, value", KEPT_ENV, ids=[c[0] for c in KEPT_ENV])
def test_harmless_environment_values_stay(name, value):
    assert not is_secret_name(name)
    assert redact_environment({name: value}) == [f"{name}={value}"]


def test_an_empty_secret_stays_visibly_empty():
    assert redact_environment({"HF_TOKEN": ""}) == ["HF_TOKEN="]


# (file of the diff, added line, what must not appear)
SECRET_DIFF = [
    ("train.sh", "export HF_TOKEN=hf_QwErTyUiOpAsDfGhJkLzXcVbNm123456", "QwErTyUiOp"),
    ("notes.md", "push with ghp_0123456789abcdefghijABCDEFGHIJklmnop", "0123456789abcdefghij"),
    ("notes.md", "github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "11ABCDEFG0123456789"),
    ("notes.md", "aws AKIAIOSFODNN7EXAMPLE in the log", "IOSFODNN7"),
    ("notes.md", "slack xoxp-1234567890-0987654321-abcdef", "0987654321-abcdef"),
    ("notes.md", "id eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJjaSJ9.c2lnbmF0dXJlLXZhbHVl", "c2lnbmF0dXJl"),
    ("notes.md", "key sk-proj-AbCdEfGhIjKlMnOpQrStUvWx", "AbCdEfGhIjKlMnOp"),
    ("conf.py", 'API_KEY = "live-key-1234567"', "live-key-1234567"),
    ("conf.py", 'client(token="tok-abcdef-123")', "tok-abcdef-123"),
    ("conf.py", 'url = "https://bot:gh-pass-42@github.com/org/data.git"', "gh-pass-42"),
    ("conf.yaml", "  password: hunter2-yaml", "hunter2-yaml"),
    ("conf.json", '  "wandb_api_key": "0123456789abcdef0123"', "0123456789abcdef0123"),
    ("client.py", 'headers = {"Authorization": "Bearer abcdef0123456789xyz"}', "abcdef0123456789"),
    (".pypirc", "password = pypi-AgEIcHlwaS5vcmc", "pypi-AgEIcHlwaS5vcmc"),
]

# (file of the diff, added line): code and settings that must stay readable.
KEPT_DIFF = [
    ("trainer.py", 'key = "decoder.weight"'),
    ("trainer.py", "token = tokenizer(text)"),
    ("trainer.py", 'password = os.environ["DB_PASSWORD"]'),
    ("hf_interop.py", 'pad_token = "<pad>"'),
    ("config.json", '  "num_key_value_heads": 8,'),
    ("moefy_tiny.sh", "TOKENIZER=${TOKENIZER:-smollm2}"),
    ("moefy_tiny.sh", "HF_TOKEN=${HF_TOKEN:-}"),
    ("README.md", "git clone https://github.com/NVIDIA/Megatron-LM.git"),
    ("README.md", "git clone ssh://git@github.com/org/repo.git"),
    ("git.txt", "6daf323d0a1b2c3d4e5f60718293a4b5c6d7e8f9 dirty"),
    ("moefy_70b.sh", "  --distributed-timeout-minutes $DIST_TIMEOUT_MINUTES"),
]


def _diff(path, line):
    return (f"diff --git a/{path} b/{path}\nindex 1111111..2222222 100644\n--- a/{path}\n"
            f"+++ b/{path}\n@@ -1 +1,2 @@\n context\n+{line}\n")


@pytest.mark.parametrize("path, line, planted", SECRET_DIFF,
                         ids=[f"{c[0]}:{c[2][:10]}" for c in SECRET_DIFF])
def test_secrets_in_a_diff_are_redacted(path, line, planted):
    out = redact_text(_diff(path, line))
    assert planted not in out, out
    assert REDACTED in out
    # Only the secret goes: the diff's structure and the other lines stay.
    assert out.splitlines()[:6] == _diff(path, line).splitlines()[:6]


@pytest.mark.parametrize("path, line", KEPT_DIFF, ids=[c[0] + ":" + c[1][:12] for c in KEPT_DIFF])
def test_code_and_settings_in_a_diff_stay(path, line):
    assert redact_text(_diff(path, line)) == _diff(path, line)


def test_a_private_key_block_in_a_diff_loses_every_body_line():
    diff = "+++ b/deploy/id_ed25519\n" + "".join(f"+{line}\n" for line in PEM.splitlines())
    out = redact_text(diff).splitlines()
    assert out == ["+++ b/deploy/id_ed25519", "+-----BEGIN OPENSSH PRIVATE KEY-----",
                   f"+{REDACTED}", f"+{REDACTED}", "+-----END OPENSSH PRIVATE KEY-----"]
    # The same key on one line of a JSON file (a service-account file: escaped newlines).
    one_line = '"private_key": "' + PEM.replace("\n", "\\n") + '\\n"'
    assert "PEMLINE" not in redact_text(one_line)


def _tool(*args, **kwargs):
    return subprocess.run([sys.executable, "-I", "-S", TOOL, *args], capture_output=True,
                          timeout=60, **kwargs)


def test_command_line_modes():
    env = {"PATH": "/usr/bin", "SSH_KEY_TEXT": PEM, "SLURM_JOB_ID": "42"}
    done = _tool("env-from-process", env=env, text=True)
    assert done.returncode == 0, done.stderr
    assert "PEMLINE" not in done.stdout
    assert "PATH=/usr/bin\n" in done.stdout and "SLURM_JOB_ID=42\n" in done.stdout
    assert f"SSH_KEY_TEXT={REDACTED}\n" in done.stdout

    records = b"".join(f"{k}={v}\0".encode() for k, v in env.items())
    nul = _tool("env-nul", input=records)
    assert nul.returncode == 0 and nul.stdout.decode() == "".join(
        line + "\n" for line in redact_environment(env))

    text = _tool("text", input=_diff("x.sh", "HF_TOKEN=abc123secret").encode() + b"\xff\n")
    assert text.returncode == 0 and b"abc123secret" not in text.stdout
    assert text.stdout.endswith(b"\xff\n")  # bytes that are not UTF-8 pass through
    assert _tool("check").returncode == 0
    bad = _tool("nonsense", text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: usage:")


# ---- dyn_snapshot itself ---------------------------------------------------------------------

SNAPSHOT = """
set -euo pipefail
REPO=$1 DYN_SLURM_DIR=$2 SNAPSHOT_DIR=$3
source "$DYN_SLURM_DIR/common.sh"
mkdir -p "$SNAPSHOT_DIR"      # as dyn_make_run_dir makes it: with the caller's umask
dyn_snapshot "$4" "verdict: fits"
"""
PLANTED = "multi-line-secret-"


@pytest.fixture
def dirty_checkout(tmp_path):
    """A git checkout with a committed file and an uncommitted diff that adds secrets."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    (repo / "train.sh").write_text("LR=1e-4\n")
    for args in (["init", "-q"], ["add", "train.sh"], ["commit", "-qm", "init"]):
        subprocess.run(git + args, check=True, capture_output=True, timeout=60)
    (repo / "train.sh").write_text(
        "LR=1e-4\nexport WANDB_API_KEY=diff-secret-one\n"
        "git push https://bot:diff-secret-two@github.com/org/repo.git\n"
        "# ghp_diffsecretthree0123456789abcdefghij\n")
    return repo


def _snapshot(tmp_path, repo, env):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nexport HF_TOKEN=script-secret-value\nsrun train\n")
    snap = tmp_path / "run" / "snapshots" / "local-restart0"
    done = subprocess.run([shutil.which("bash"), "-c", SNAPSHOT, "snapshot", str(repo),
                           os.path.join(REPO, "slurm"), str(snap), str(script)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return snap, done.stderr


def _secret_env(**extra):
    env = quiet_env(PGPASSWORD="pg-snapshot-secret",
                    DEPLOY_KEY="\n".join(f"{PLANTED}{i}" for i in range(3)),
                    SETTINGS_BLOB=f"retries=3\n{PEM}\nverbose=1",
                    DATABASE_URL="postgres://u:db-snapshot-secret@db/runs",
                    SLURM_JOB_NAME="moefy_tiny")
    return env | extra


def _assert_private_and_clean(snap, secrets):
    assert stat.S_IMODE(snap.stat().st_mode) == 0o700
    for f in snap.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
        content = f.read_text(errors="replace")
        for secret in secrets:
            assert secret not in content, (f.name, secret)


def test_dyn_snapshot_redacts_and_keeps_the_folder_private(tmp_path, dirty_checkout):
    env = _secret_env()
    snap, log = _snapshot(tmp_path, dirty_checkout, env)
    assert sorted(f.name for f in snap.iterdir()) == \
        ["common.sh", "env.txt", "git.diff", "git.txt", "job.sh", "plan.txt"]
    _assert_private_and_clean(snap, [PLANTED, "PEMLINE", "pg-snapshot-secret",
                                     "db-snapshot-secret", "diff-secret", "script-secret"])
    env_lines = (snap / "env.txt").read_text().splitlines()
    assert f"PGPASSWORD={REDACTED}" in env_lines and f"DEPLOY_KEY={REDACTED}" in env_lines
    assert f"DATABASE_URL=postgres://u:{REDACTED}@db/runs" in env_lines
    assert ("SETTINGS_BLOB=retries=3\\n-----BEGIN OPENSSH PRIVATE KEY-----\\n"
            f"{REDACTED}\\n{REDACTED}\\n-----END OPENSSH PRIVATE KEY-----\\nverbose=1"
            ) in env_lines
    # Harmless values stay, exactly as the shell exported them (one line per variable).
    assert f"PATH={env['PATH']}" in env_lines and "SLURM_JOB_NAME=moefy_tiny" in env_lines
    assert set(env) <= {line.split("=", 1)[0] for line in env_lines}
    diff = (snap / "git.diff").read_text()
    assert f"+export WANDB_API_KEY={REDACTED}" in diff
    assert f"https://bot:{REDACTED}@github.com" in diff and " LR=1e-4\n" in diff
    assert (snap / "git.txt").read_text().endswith(" dirty\n")
    assert f"export HF_TOKEN={REDACTED}" in (snap / "job.sh").read_text()
    assert "note:" not in log


def test_dyn_snapshot_without_python_writes_names_only(tmp_path, dirty_checkout):
    # A batch node where neither ${PYTHON:-python} nor python3 runs (a container-only site):
    # only the tools the function needs besides python are on PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "env", "sort", "sed", "cp", "chmod", "mkdir", "date"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    env = _secret_env(PATH=str(bin_dir), PYTHON=str(tmp_path / "no-such-python"))
    snap, log = _snapshot(tmp_path, dirty_checkout, env)
    _assert_private_and_clean(snap, [PLANTED, "pg-snapshot-secret", "db-snapshot-secret",
                                     "diff-secret"])
    env_lines = (snap / "env.txt").read_text().splitlines()
    assert "SLURM_JOB_NAME=<redacted>" in env_lines and "PATH=<redacted>" in env_lines
    assert all(line.endswith("=<redacted>") for line in env_lines)
    # The changed files and line counts, no content.
    assert (snap / "git.diff").read_text().startswith(" train.sh | 3 +++\n")
    assert "note: neither " in log and "env.txt lists names only, git.diff the changed files " \
        "only" in log
