"""The marked block of environment variables that `init --apps` puts in shell rc files.

Writing and removing are exact inverses: every byte outside the block survives, and removing the
block gives back the file as it was, down to a missing final newline or a file that did not exist.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from halton_meter.tls.ca import write_atomically

BEGIN = "# >>> halton-meter >>>"
END = "# <<< halton-meter <<<"
COMMENT = "# added by `halton-meter init --apps`; remove with `halton-meter uninstall`"
# The comment also records, invisibly to the shell, that the file did not exist before, so that
# removing the block deletes the file instead of leaving an empty one behind.
COMMENT_CREATED = ("# added by `halton-meter init --apps`, which created this file; "
                   "remove with `halton-meter uninstall`")
FISH_FILENAME = "halton-meter.fish"
NEW_FILE_MODE = 0o644

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BEGIN_B = BEGIN.encode()
_END_B = END.encode()


class ShellRcError(Exception):
    """A user-facing problem with an rc file: str(e) names the file and says how to fix it."""


def rc_files(user_home: Path, shell: str | None, xdg_config_home: Path | None = None, *,
             zdotdir: Path | None = None) -> list[Path]:
    """The rc files to put the block in: bash, then zsh, then fish, else ~/.profile.

    A shell counts if its rc file (for fish, its config directory) already exists or if it is the
    login shell (`shell` is $SHELL, a path or a bare name). `zdotdir` is $ZDOTDIR when set.
    """
    login_shell = Path(shell).name if shell else ""
    files = []
    bashrc = user_home / ".bashrc"
    # lexists: a dotfile manager's dangling symlink still says the user keeps a .bashrc.
    if login_shell == "bash" or os.path.lexists(bashrc):
        files.append(bashrc)
    zshrc = (zdotdir or user_home) / ".zshrc"
    if login_shell == "zsh" or os.path.lexists(zshrc):
        files.append(zshrc)
    fish_dir = (xdg_config_home or user_home / ".config") / "fish"
    if login_shell == "fish" or fish_dir.is_dir():
        files.append(fish_dir / "conf.d" / FISH_FILENAME)
    return files or [user_home / ".profile"]


def write_block(path: Path, env: dict[str, str]) -> bool:
    """Put a block exporting `env` in `path`, replacing any block already there; True if it changed."""
    fish = _is_fish(path)
    target = _target(path)
    old = _read(path, target)
    if old is None:
        new = _block(env, fish, created=True)
    else:
        lines = old.splitlines(keepends=True)
        span = _find_block(path, lines)
        if span is not None:
            begin, end = span
            block = _block(env, fish, created=_is_created(lines, begin, end))
            if not lines[end].endswith(b"\n"):
                block = block[:-1]  # the file ended without a newline and still does
            new = b"".join(lines[:begin]) + block + b"".join(lines[end + 1:])
        elif not old:
            new = _block(env, fish, created=False)
        elif old.endswith(b"\n"):
            new = old + b"\n" + _block(env, fish, created=False)
        else:
            # End the user's last line and move the missing final newline to our END line, so
            # that removal knows to take the newline away again.
            new = old + b"\n\n" + _block(env, fish, created=False)[:-1]
    if new == old:
        return False
    if old is None:
        mode = NEW_FILE_MODE
        if fish:
            _mkdirs(path, target.parent)
    else:
        mode = target.stat().st_mode & 0o7777
    _write(path, target, new, mode)
    return True


def remove_block(path: Path) -> bool:
    """Remove the block and the blank line written before it; True if there was a block."""
    found = _load_block(path)
    if found is None:
        return False
    target, lines, (begin, end) = found
    before, after = lines[:begin], lines[end + 1:]
    if before and before[-1] == b"\n":
        before.pop()  # the separator write_block put before an appended block
    if not lines[end].endswith(b"\n") and before and before[-1].endswith(b"\n"):
        before[-1] = before[-1][:-1]  # the newline write_block added to the user's last line
    new = b"".join(before + after)
    if not new and _is_created(lines, begin, end):
        try:
            target.unlink()
        except OSError as error:
            raise _io_error(path, "delete", error) from error
    else:
        _write(path, target, new, target.stat().st_mode & 0o7777)
    return True


def read_block(path: Path) -> dict[str, str] | None:
    """The variables the block in `path` sets, or None if the file has no block."""
    found = _load_block(path)
    if found is None:
        return None
    _, lines, (begin, end) = found
    env = {}
    for number in range(begin + 1, end):
        text = lines[number].decode("utf-8", "surrogateescape").strip()
        if text.startswith(("export ", "set -gx ")):
            name, value = _parse_assignment(text, _is_fish(path))
            if name is None:
                raise ShellRcError(
                    f"Line {number + 1} of {path} is not an assignment halton-meter can read: {text!r}. "
                    f"Delete the lines from {BEGIN!r} to {END!r} by hand and run `halton-meter init --apps` again.")
            env[name] = value
    return env


# -- the block ---------------------------------------------------------------------------------

def _block(env: dict[str, str], fish: bool, *, created: bool) -> bytes:
    lines = [BEGIN, COMMENT_CREATED if created else COMMENT]
    for name, value in env.items():
        if not _NAME_RE.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        if any(c in value for c in "\n\r\0"):
            raise ValueError(f"the value of {name} spans lines or holds a NUL byte")
        lines.append(f"set -gx {name} {_fish_quote(value)}" if fish else f"export {name}={shlex.quote(value)}")
    lines.append(END)
    return "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")


def _load_block(path: Path) -> tuple[Path, list[bytes], tuple[int, int]] | None:
    """The file's real target, its lines and the block's (begin, end) line span, or None."""
    target = _target(path)
    data = _read(path, target)
    if data is None:
        return None
    lines = data.splitlines(keepends=True)
    span = _find_block(path, lines)
    return None if span is None else (target, lines, span)


def _find_block(path: Path, lines: list[bytes]) -> tuple[int, int] | None:
    """(BEGIN index, END index) of the one well-formed block, None if there is no marker at all."""
    begins = [i for i, line in enumerate(lines) if line.strip() == _BEGIN_B]
    ends = [i for i, line in enumerate(lines) if line.strip() == _END_B]
    if not begins and not ends:
        return None
    if len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0]:
        return begins[0], ends[0]
    found = ", ".join([f"{BEGIN!r} on line {i + 1}" for i in begins] + [f"{END!r} on line {i + 1}" for i in ends])
    raise ShellRcError(
        f"The halton-meter block in {path} is damaged ({found}); halton-meter will not guess which lines are its own. "
        f"Delete the halton-meter lines from {path} by hand, then run the command again.")


def _is_created(lines: list[bytes], begin: int, end: int) -> bool:
    return end - begin > 1 and lines[begin + 1].strip() == COMMENT_CREATED.encode()


def _parse_assignment(text: str, fish: bool) -> tuple[str | None, str]:
    if fish:
        parts = text.split(None, 3)
        if len(parts) != 4 or parts[:2] != ["set", "-gx"]:
            return None, ""
        value = _fish_unquote(parts[3])
        name = parts[2]
    else:
        name, equals, quoted = text[len("export "):].partition("=")
        try:
            words = shlex.split(quoted)
        except ValueError:
            return None, ""
        value = words[0] if equals and len(words) == 1 else None
    if value is None or not _NAME_RE.match(name):
        return None, ""
    return name, value


def _fish_quote(value: str) -> str:
    # fish single quotes know two escapes, \\ and \', and nothing else (fish docs, "Quotes").
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_unquote(word: str) -> str | None:
    if len(word) < 2 or word[0] != "'" or word[-1] != "'":
        return None
    out, chars = [], iter(word[1:-1])
    for char in chars:
        if char == "'":
            return None
        if char == "\\":
            following = next(chars, "")
            out.append(following if following in ("\\", "'") else char + following)
        else:
            out.append(char)
    return "".join(out)


def _is_fish(path: Path) -> bool:
    return path.suffix == ".fish"


# -- files -------------------------------------------------------------------------------------

def _target(path: Path) -> Path:
    """The file `path` stands for: a dotfile manager's symlink is written through, not replaced."""
    return Path(os.path.realpath(path))


def _read(path: Path, target: Path) -> bytes | None:
    try:
        return target.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise _io_error(path, "read", error) from error


def _write(path: Path, target: Path, data: bytes, mode: int) -> None:
    try:
        write_atomically(target, data, mode)
    except OSError as error:
        raise _io_error(path, "write", error) from error


def _mkdirs(path: Path, directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _io_error(path, "create the directory of", error) from error


def _io_error(path: Path, verb: str, error: OSError) -> ShellRcError:
    shown = str(path) if _target(path) == path else f"{path} (a link to {_target(path)})"
    return ShellRcError(f"Could not {verb} {shown}: {error.strerror or error}. "
                        "Check that the file and its directory are yours and writable, then run the command again.")
