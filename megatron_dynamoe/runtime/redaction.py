"""Redaction of secrets in what a job records about itself (slurm/common.sh `dyn_snapshot`).

A program with three modes (standard library only, so any python on a batch node runs it;
run as a file it imports nothing of the package: ``python redaction.py MODE``):

    python -m megatron_dynamoe.runtime.redaction env-from-process > env.txt
    env -0 | python -m megatron_dynamoe.runtime.redaction env-nul > env.txt
    git diff HEAD | python -m megatron_dynamoe.runtime.redaction text > git.diff

`env-from-process` writes this process's environment (os.environ: a multi-line value is one
value, not several `env` lines) as sorted NAME=value lines, one per variable (newlines in a
value written as \\n). `env-nul` does the same for the NUL-separated records of `env -0` on
stdin: exactly the caller's environment even when `python` is a wrapper that changes PATH
before Python starts (a pyenv shim); slurm/common.sh uses it. A variable whose name has a
secret-like word (`is_secret_name`) has its value replaced by <redacted>; every other value
goes through `redact_text`.

`text` copies stdin to stdout through `redact_text`: the password of URL credentials
(scheme://user:PASSWORD@host), well-known token shapes (GitHub, Hugging Face, AWS access key
ids, Slack, JWTs, OpenAI/Anthropic/GitLab/npm/Google keys, `Bearer` values), the body of
private-key blocks, and the values of assignments to secret-like names (`HF_TOKEN=...`,
`password: ...`, `"api_key": "..."`). In source files of a diff (.py, .c, ...) only quoted
values of such assignments are redacted: `key = name` there is code, not a secret.
"""

import os
import re
import sys

REDACTED = "<redacted>"

# Words that make a name secret when they are a whole part of it (parts are separated by
# _ - or .; names are compared upper-cased).
_SECRET_PARTS = frozenset((
    "TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASS", "PWD",
    "PASSPHRASE", "KEY", "KEYS", "APIKEY", "CREDENTIAL", "CREDENTIALS", "CREDS", "AUTH",
    "AUTHORIZATION", "COOKIE", "COOKIES", "SESSION", "PAT", "JWT", "PRIVATE", "WEBHOOK"))
# ... or end a part (names written without separators: PGPASSWORD, GHTOKEN, MYAPIKEY, OAUTH).
_SECRET_SUFFIXES = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASS", "PWD", "PASSPHRASE", "KEY",
                    "CREDENTIALS", "CREDENTIAL", "AUTH", "COOKIE", "JWT")
# ... or start it (PASSWORDFILE, SECRETNAME, JWTSECRET). Not TOKEN: TOKENIZER is a path.
_SECRET_PREFIXES = ("PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "JWT")
# Parts that end like a secret word but are not one: programs (GIT_ASKPASS), SLURM's
# workload characterization key (SLURM_WCKEY: an accounting label) and words.
_HARMLESS_PARTS = frozenset(("ASKPASS", "WCKEY", "BYPASS", "COMPASS", "SURPASS", "MONKEY",
                             "HOTKEY"))
# The shell's working directories (PWD is also a password's abbreviation: MYSQL_PWD).
_HARMLESS_NAMES = frozenset(("PWD", "OLDPWD"))


def is_secret_name(name: str) -> bool:
    """Whether a variable / key name looks like it holds a secret (case-insensitive): one of
    its parts (split at _ - .) is a secret word (TOKEN, SECRET, PASSWORD, PASSWD, PASS, PWD,
    KEY, APIKEY, CREDENTIAL(S), AUTH, COOKIE, SESSION, PAT, JWT, PRIVATE, ...), ends with one
    (PGPASSWORD, GHTOKEN) or starts with a long one (PASSWORDFILE). PWD and OLDPWD (working
    directories) are not secrets; CERT is not a secret word (certificates are public, and
    SSL_CERT_FILE-like names hold paths)."""
    upper = name.upper()
    if upper in _HARMLESS_NAMES:
        return False
    for part in re.split(r"[_.\-]+", upper):
        if not part or part in _HARMLESS_PARTS:
            continue
        if (part in _SECRET_PARTS or part.endswith(_SECRET_SUFFIXES)
                or part.startswith(_SECRET_PREFIXES)):
            return True
    return False


# Token shapes, wherever they appear (values of harmless-looking names, diffs, scripts).
_TOKEN_SHAPES = re.compile("|".join((
    r"\bgh[pousr]_[A-Za-z0-9]{20,}",                  # GitHub classic / OAuth / app tokens
    r"\bgithub_pat_[A-Za-z0-9_]{20,}",                # GitHub fine-grained tokens
    r"\bhf_[A-Za-z0-9]{20,}",                         # Hugging Face
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",                 # AWS access key ids
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",               # Slack
    r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWTs (JSON header)
    r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",        # OpenAI / Anthropic
    r"\bglpat-[A-Za-z0-9_-]{20,}",                    # GitLab
    r"\bnpm_[A-Za-z0-9]{36}\b",                       # npm
    r"\bAIza[0-9A-Za-z_-]{35}",                       # Google API keys
)))
_BEARER = re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/-]{8,}=*")
# scheme://user:password@host: the password (it may contain ':' and even '@': up to the last
# '@' before the path). scheme://LONGTOKEN@host (a token as the user name): the token.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s/]*(@)")
_URL_TOKEN_USER = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[A-Za-z0-9_-]{20,}(@)")
# NAME = "value" / 'name': 'value' / "name": "value" (a value without spaces: prose in
# quotes is not a credential).
_QUOTED_ASSIGNMENT = re.compile(
    r"""(?<![A-Za-z0-9_])(?P<q>["']?)(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)(?P=q)"""
    r"""(?P<sep>\s*[:=]\s*)(?P<vq>["'])(?P<value>[^"'\s]+)(?P=vq)""")
# NAME=value, export NAME=value, name: value, name = value (shell, .env, YAML, INI files);
# not ${NAME:-default} (a shell expansion names a variable, it does not set one).
_BARE_ASSIGNMENT = re.compile(
    r"""(?<![A-Za-z0-9_{$])(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)(?P<sep>\s*[:=]\s*)"""
    r"""(?P<value>[^\s"'<$`,;&|=][^\s"'<$`,;&|]*)""")
# Values an assignment may show: placeholders and special tokens ("<pad>", "[CLS]",
# "${HF_TOKEN}", "****"), booleans and small numbers ("num_key_value_heads": 8).
_SHOWN_VALUE = re.compile(r"<[^<>]*>|\[[A-Za-z_]+\]|\$\{?\w+\}?|\*+|[0-9]{1,5}|"
                          r"(?i:true|false|null|none|yes|no)")
_KEY_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----")
_KEY_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----")
# Files of a diff where `name = value` is code (only quoted literals are redacted there).
_CODE_SUFFIXES = (".py", ".pyi", ".pyx", ".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp",
                  ".js", ".ts", ".go", ".rs", ".java", ".ipynb")
_DIFF_FILE = re.compile(r"^\+\+\+ (?:b/)?(\S+)")


def _hides(name: str, value: str, code: bool) -> bool:
    # In code, a variable called `key` is a dict key far more often than a credential.
    if code and name.upper() in ("KEY", "KEYS"):
        return False
    return is_secret_name(name) and not _SHOWN_VALUE.fullmatch(value)


def _redact_assignments(line: str, code: bool) -> str:
    def quoted(m):
        if not _hides(m.group("name"), m.group("value"), code):
            return m.group(0)
        return (m.group("q") + m.group("name") + m.group("q") + m.group("sep") + m.group("vq")
                + REDACTED + m.group("vq"))

    def bare(m):
        if not _hides(m.group("name"), m.group("value"), code):
            return m.group(0)
        return m.group("name") + m.group("sep") + REDACTED

    line = _QUOTED_ASSIGNMENT.sub(quoted, line)
    return line if code else _BARE_ASSIGNMENT.sub(bare, line)


def redact_line(line: str, code: bool = False) -> str:
    """One line with URL passwords, token shapes and secret assignments redacted (`code`:
    the line is source code, where only quoted values of secret names count)."""
    line = _URL_PASSWORD.sub(r"\g<1>" + REDACTED + r"\g<2>", line)
    line = _URL_TOKEN_USER.sub(r"\g<1>" + REDACTED + r"\g<2>", line)
    line = _TOKEN_SHAPES.sub(REDACTED, line)
    line = _BEARER.sub(r"\g<1>" + REDACTED, line)
    line = _redact_assignments(line, code)
    # A one-line key block (JSON service-account files: "-----BEGIN ...-----\nMII...").
    begin = _KEY_BEGIN.search(line)
    if begin:
        end = _KEY_END.search(line, begin.end())
        stop = end.start() if end else len(line)
        if line[begin.end():stop].strip():
            line = line[:begin.end()] + REDACTED + line[stop:]
    return line


def redact_text(text: str) -> str:
    """`text` with secrets redacted line by line (`redact_line`); the lines inside a
    multi-line private-key block are replaced whole (a diff's leading +/-/space is kept). A
    unified diff is recognised by its `+++ b/PATH` lines: source files get `code` rules."""
    out, in_key, code = [], False, False
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        newline = line[len(body):]
        header = _DIFF_FILE.match(body)
        if header:
            code = header.group(1).endswith(_CODE_SUFFIXES)
            out.append(line)
            continue
        if in_key:
            end = _KEY_END.search(body)
            in_key = end is None
            start = end.start() if end else len(body)
            marker = body[:1] if start > 0 and body[:1] in ("+", "-", " ") else ""
            out.append(marker + (body[start:] if end else REDACTED) + newline)
            continue
        redacted = redact_line(body, code)
        begin = _KEY_BEGIN.search(body)
        in_key = bool(begin) and not _KEY_END.search(body, begin.end())
        out.append(redacted + newline)
    return "".join(out)


def redact_environment(environ) -> list:
    """NAME=value lines (sorted) of `environ`: secret-like names get <redacted> (an empty
    value stays empty: that it is unset is useful and reveals nothing), every other value
    goes through `redact_text`; newlines inside a value are written as \\n."""
    lines = []
    for name in sorted(environ):
        value = environ[name]
        if is_secret_name(name) and value:
            value = REDACTED
        else:
            value = redact_text(value)
        lines.append(f"{name}={value}".replace("\r", "\\r").replace("\n", "\\n"))
    return lines


USAGE = ("usage: redaction.py env-from-process | env-nul | text | check  (env-from-process: "
         "this process's environment, redacted, on stdout; env-nul: the same for `env -0` "
         "records on stdin; text: stdin to stdout, redacted; check: exit 0)")


def main(argv=None) -> int:
    """The command line: `env-from-process`, `env-nul`, `text` (see the module docstring)
    or `check` (exits 0: slurm/common.sh asks whether an interpreter can run this file)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["env-from-process"]:
        sys.stdout.write("".join(line + "\n" for line in redact_environment(os.environ)))
        return 0
    if argv == ["env-nul"]:
        # `env -0` output: exactly the caller's environment (no interpreter wrapper's PATH).
        data = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
        environ = dict(record.split("=", 1) for record in data.split("\0") if "=" in record)
        lines = "".join(line + "\n" for line in redact_environment(environ))
        sys.stdout.buffer.write(lines.encode("utf-8", errors="surrogateescape"))
        return 0
    if argv == ["check"]:  # slurm/common.sh: can this interpreter run the redaction?
        return 0
    if argv == ["text"]:
        # Bytes that are not UTF-8 (binary diffs, Latin-1 files) pass through unchanged.
        data = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
        sys.stdout.buffer.write(redact_text(data).encode("utf-8", errors="surrogateescape"))
        return 0
    print(f"error: {USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
