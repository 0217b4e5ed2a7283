"""Prepare MLflow's basic-auth app for cluster/mlflow_server.sh: the admin credentials, the auth config, the users.

    python cluster/mlflow_auth.py AUTH_DIR [--credentials FILE] [--database URI] [--default-permission READ]

The admin's name and password come from $MLFLOW_AUTH_ADMIN_USERNAME / $MLFLOW_AUTH_ADMIN_PASSWORD (MLflow's own
variables) when the password is set there, else from the credentials file (AUTH_DIR/credentials unless
--credentials), which is created with a random password, readable by its owner only, when missing. The file is in
the format MLflow's client reads from ~/.mlflow/credentials, so a node can use a copy of it as is:

    [mlflow]
    mlflow_tracking_username = admin
    mlflow_tracking_password = ...

Written in AUTH_DIR (owner-only): basic_auth.ini (MLflow's auth config, read through $MLFLOW_AUTH_CONFIG_PATH; it
holds no password), flask_secret_key (the CSRF key every server process must share), and, unless --database names
another, basic_auth.db (the users: names and password hashes). The admin user is created, or its password set to
the configured one, before the server starts: the file (or the environment) is where the admin password lives, and
a password changed through the UI is set back at the next start. Prints, without the password, what every node
needs to log to the server. Bad input: one line `error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import configparser
import os
import secrets
import stat
import sys
from pathlib import Path

from training.tracking.redaction import redact_uri

USER_KEY, PASSWORD_KEY = "mlflow_tracking_username", "mlflow_tracking_password"  # MLflow's credentials-file keys
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
MIN_PASSWORD = 12  # MLflow's own minimum


class SetupError(Exception):
    """Something the operator must fix; its text is the one-line message."""


def write_private(path: Path, text: str, exclusive: bool = False) -> None:
    """Write `text` to `path` readable and writable by its owner only (mode 0600 from the first byte)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def check_private(path: Path) -> None:
    """A secret file others can read is refused, with the command that fixes it."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SetupError(f"{path} is readable by others (mode {mode:o}): chmod 600 {path}")


def read_credentials(path: Path) -> tuple[str, str]:
    """(user, password) from an MLflow credentials file ([mlflow] mlflow_tracking_username / _password)."""
    check_private(path)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error as e:
        raise SetupError(f"{path} is not an MLflow credentials file ({type(e).__name__}); delete it to get a new "
                         "one") from None
    section = parser["mlflow"] if parser.has_section("mlflow") else {}
    user, password = section.get(USER_KEY, ""), section.get(PASSWORD_KEY, "")
    if not user or not password:
        raise SetupError(f"{path} needs [mlflow] with {USER_KEY} and {PASSWORD_KEY}; delete it to get a new one")
    return user, password


def credentials_text(user: str, password: str) -> str:
    return f"[mlflow]\n{USER_KEY} = {user}\n{PASSWORD_KEY} = {password}\n"


def admin_credentials(path: Path, env: dict[str, str]) -> tuple[str, str, str]:
    """(user, password, where they came from): the environment when it sets the password, else the file (made
    with a random password when missing)."""
    password = env.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    user = env.get("MLFLOW_AUTH_ADMIN_USERNAME", "") or "admin"
    if password:
        source = "MLFLOW_AUTH_ADMIN_PASSWORD"
    elif path.is_file():
        user, password = read_credentials(path)
        source = str(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(24)
        write_private(path, credentials_text(user, password), exclusive=True)
        print(f"new admin credentials for user '{user}' in {path} (owner-only)")
        source = str(path)
    if len(password) < MIN_PASSWORD:
        raise SetupError(f"the admin password from {source} is shorter than MLflow's minimum of {MIN_PASSWORD} "
                         "characters")
    return user, password, source


def write_auth_config(auth_dir: Path, user: str, database: str, default_permission: str) -> Path:
    """MLflow's basic_auth.ini for this server (no password in it: the admin user exists before the server starts)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser["mlflow"] = {"default_permission": default_permission, "database_uri": database, "admin_username": user,
                        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}
    path = auth_dir / "basic_auth.ini"
    with open(path, "w") as f:
        parser.write(f)
    os.chmod(path, 0o600)
    return path


def flask_secret_key(auth_dir: Path) -> Path:
    """The key MLflow's auth app signs its CSRF tokens with: one per server, kept across restarts."""
    path = auth_dir / "flask_secret_key"
    if not path.is_file():
        write_private(path, secrets.token_hex(32), exclusive=True)
    check_private(path)
    return path


def sync_admin(database: str, user: str, password: str) -> str:
    """Create the admin user in MLflow's auth store, or set its password to `password`; says which it did."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(database)  # creates the tables, or migrates them to this MLflow version
    if not store.has_user(user, use_primary=True):
        store.create_user(user, password, is_admin=True)
        return f"admin user '{user}' created"
    changed = not store.authenticate_user(user, password, use_primary=True)
    store.update_user(user, password=password if changed else None, is_admin=True)
    return f"admin user '{user}': password set to the configured one" if changed else f"admin user '{user}'"


def node_instructions(user: str, source: str, uri: str) -> str:
    """What every node that logs needs, without the password itself."""
    where = f"the password in {source}" if source != "MLFLOW_AUTH_ADMIN_PASSWORD" else "$MLFLOW_AUTH_ADMIN_PASSWORD"
    lines = [f"On every node that logs (rank 0's; every node when in doubt): export MLFLOW_TRACKING_URI={uri}",
             f"and pass the credentials the way MLflow reads them, either  export MLFLOW_TRACKING_USERNAME={user} "
             f"MLFLOW_TRACKING_PASSWORD=<{where}>"]
    if source != "MLFLOW_AUTH_ADMIN_PASSWORD":
        lines.append(f"or a copy of the file:  install -D -m 600 {source} ~/.mlflow/credentials")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("auth_dir", type=Path)
    ap.add_argument("--credentials", type=Path, default=None, help="admin credentials file (AUTH_DIR/credentials)")
    ap.add_argument("--database", default="", help="auth store URI (sqlite:///AUTH_DIR/basic_auth.db)")
    ap.add_argument("--default-permission", default="READ", help=f"what a user may do by default: {PERMISSIONS}")
    ap.add_argument("--uri", default="http://<this host>:5000", help="the address nodes use (for the instructions)")
    args = ap.parse_args(argv)
    try:
        if args.default_permission not in PERMISSIONS:
            raise SetupError(f"default permission {args.default_permission!r}: expected one of {PERMISSIONS}")
        auth_dir = args.auth_dir.resolve()
        auth_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(auth_dir, 0o700)
        database = args.database or f"sqlite:///{auth_dir / 'basic_auth.db'}"
        user, password, source = admin_credentials(args.credentials or auth_dir / "credentials", dict(os.environ))
        write_auth_config(auth_dir, user, database, args.default_permission)
        flask_secret_key(auth_dir)
        done = sync_admin(database, user, password)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.auth_dir}: {e.strerror} (the auth folder must be writable)", file=sys.stderr)
        return 2
    print(f"authentication: MLflow basic-auth, users in {redact_uri(database)}, {done} (admin credentials from {source}); "
          f"others get {args.default_permission} by default")
    print(node_instructions(user, source, args.uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
