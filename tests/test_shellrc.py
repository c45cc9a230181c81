"""The shell rc block: exact round trips, idempotence, symlinks, modes, damaged markers, quoting."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from halton_meter.lifecycle.shellrc import (
    BEGIN, COMMENT, COMMENT_CREATED, END, ShellRcError, rc_files, read_block, remove_block, write_block,
)

ENV = {
    "HTTPS_PROXY": "http://127.0.0.1:8081",
    "SSL_CERT_FILE": "/home/u/Library/Application Support/halton-meter/ca-bundle.pem",
}
# Every character a shell treats specially, and a few that quoting schemes get wrong.
AWKWARD = {
    "SPACES": "a b  c",
    "SINGLE_QUOTE": "it's",
    "DOLLAR": "$HOME ${X} `id` $(id)",
    "BACKSLASH": "C:\\path\\",
    "DOUBLE_QUOTE": 'say "hi"',
    "GLOB": "*.local ~ ? [a]",
    "SEMICOLON": "a;b&c|d>e<f",
    "UNICODE": "prix € — ü",
    "EMPTY": "",
    "QUOTE_BACKSLASH": "\\'",
}


# -- which files -------------------------------------------------------------------------------

def test_rc_files_follow_the_login_shell_when_nothing_exists(tmp_path):
    assert rc_files(tmp_path, "/bin/bash") == [tmp_path / ".bashrc"]
    assert rc_files(tmp_path, "/usr/bin/zsh") == [tmp_path / ".zshrc"]
    assert rc_files(tmp_path, "fish") == [tmp_path / ".config/fish/conf.d/halton-meter.fish"]
    assert rc_files(tmp_path, None) == [tmp_path / ".profile"]
    assert rc_files(tmp_path, "/bin/dash") == [tmp_path / ".profile"]


def test_rc_files_add_every_shell_the_user_already_configured_in_a_fixed_order(tmp_path):
    (tmp_path / ".zshrc").write_text("")
    (tmp_path / ".bashrc").symlink_to(tmp_path / "dotfiles-not-checked-out-yet")  # dangling counts
    xdg = tmp_path / "xdg"
    (xdg / "fish").mkdir(parents=True)
    assert rc_files(tmp_path, "/bin/sh", xdg) == [
        tmp_path / ".bashrc", tmp_path / ".zshrc", xdg / "fish/conf.d/halton-meter.fish"]


def test_rc_files_respect_zdotdir(tmp_path):
    zdotdir = tmp_path / "zsh"
    assert rc_files(tmp_path, "zsh", zdotdir=zdotdir) == [zdotdir / ".zshrc"]
    (tmp_path / ".zshrc").write_text("")  # the one in $HOME is not what zsh reads any more
    assert rc_files(tmp_path, "bash", zdotdir=zdotdir) == [tmp_path / ".bashrc"]


# -- round trips -------------------------------------------------------------------------------

ORIGINALS = {
    "empty": b"",
    "no_final_newline": b"alias ll='ls -l'",
    "final_newline": b"alias ll='ls -l'\n",
    "ends_with_blank_line": b"alias ll='ls -l'\n\n",
    "only_a_newline": b"\n",
    "crlf_and_latin1": b"# caf\xe9\r\nexport A=1\r\n",
    "lone_carriage_return": b"export A=1\r",
}


@pytest.mark.parametrize("name", ORIGINALS)
@pytest.mark.parametrize("rc_name", [".bashrc", "halton-meter.fish"])
def test_write_then_remove_gives_back_the_original_bytes(tmp_path, name, rc_name):
    rc = tmp_path / rc_name
    rc.write_bytes(ORIGINALS[name])
    assert write_block(rc, ENV) is True
    assert read_block(rc) == ENV
    assert rc.read_bytes().startswith(ORIGINALS[name])
    assert remove_block(rc) is True
    assert rc.read_bytes() == ORIGINALS[name]
    assert remove_block(rc) is False


def test_a_missing_file_is_created_with_the_block_alone_and_deleted_again(tmp_path):
    rc = tmp_path / ".profile"
    assert write_block(rc, ENV) is True
    assert rc.read_text() == (
        f"{BEGIN}\n{COMMENT_CREATED}\n"
        "export HTTPS_PROXY=http://127.0.0.1:8081\n"
        "export SSL_CERT_FILE='/home/u/Library/Application Support/halton-meter/ca-bundle.pem'\n"
        f"{END}\n")
    assert rc.stat().st_mode & 0o7777 == 0o644
    assert remove_block(rc) is True
    assert not rc.exists()
    assert remove_block(rc) is False
    assert read_block(rc) is None


def test_an_appended_block_is_separated_by_one_blank_line(tmp_path):
    rc = tmp_path / ".bashrc"
    rc.write_text("alias ll='ls -l'\n")
    write_block(rc, {"A": "1"})
    assert rc.read_text() == f"alias ll='ls -l'\n\n{BEGIN}\n{COMMENT}\nexport A=1\n{END}\n"


def test_a_created_file_the_user_added_to_is_kept_on_removal(tmp_path):
    rc = tmp_path / ".profile"
    write_block(rc, ENV)
    with rc.open("a") as handle:
        handle.write("export MINE=1\n")
    assert remove_block(rc) is True
    assert rc.read_text() == "export MINE=1\n"


def test_lines_the_user_added_after_the_block_survive_removal(tmp_path):
    rc = tmp_path / ".zshrc"
    rc.write_bytes(b"setopt autocd\n")
    write_block(rc, ENV)
    with rc.open("ab") as handle:
        handle.write(b"eval \"$(starship init zsh)\"\n")
    remove_block(rc)
    assert rc.read_bytes() == b"setopt autocd\neval \"$(starship init zsh)\"\n"


# -- idempotence and replacement ---------------------------------------------------------------

def test_writing_the_same_block_again_touches_nothing(tmp_path):
    rc = tmp_path / ".bashrc"
    rc.write_text("export A=1\n")
    assert write_block(rc, ENV) is True
    before = rc.stat()
    assert write_block(rc, dict(ENV)) is False
    after = rc.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_new_block_replaces_the_old_one_in_place(tmp_path):
    rc = tmp_path / ".bashrc"
    rc.write_bytes(b"top\n")
    write_block(rc, ENV)
    with rc.open("ab") as handle:
        handle.write(b"bottom\n")
    assert write_block(rc, {"HTTPS_PROXY": "http://127.0.0.1:9999"}) is True
    assert rc.read_bytes() == (f"top\n\n{BEGIN}\n{COMMENT}\nexport HTTPS_PROXY=http://127.0.0.1:9999\n"
                               f"{END}\nbottom\n").encode()
    assert read_block(rc) == {"HTTPS_PROXY": "http://127.0.0.1:9999"}


def test_replacing_keeps_the_missing_final_newline_so_removal_stays_exact(tmp_path):
    rc = tmp_path / ".bashrc"
    rc.write_bytes(b"export A=1")
    write_block(rc, ENV)
    assert rc.read_bytes().endswith(END.encode())
    write_block(rc, {"B": "2"})
    assert rc.read_bytes().endswith(END.encode())
    remove_block(rc)
    assert rc.read_bytes() == b"export A=1"


def test_replacing_a_block_in_a_file_halton_meter_created_still_deletes_it_on_removal(tmp_path):
    rc = tmp_path / ".profile"
    write_block(rc, ENV)
    write_block(rc, {"B": "2"})
    remove_block(rc)
    assert not rc.exists()


# -- files: modes, symlinks, fish --------------------------------------------------------------

def test_the_mode_of_an_existing_file_is_kept(tmp_path):
    rc = tmp_path / ".bashrc"
    rc.write_text("export A=1\n")
    rc.chmod(0o600)
    write_block(rc, ENV)
    assert rc.stat().st_mode & 0o7777 == 0o600
    remove_block(rc)
    assert rc.stat().st_mode & 0o7777 == 0o600


def test_a_symlinked_rc_file_is_written_through_and_stays_a_symlink(tmp_path):
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    target = dotfiles / "bashrc"
    target.write_bytes(b"export EDITOR=vi\n")
    rc = tmp_path / ".bashrc"
    rc.symlink_to(target)
    assert write_block(rc, ENV) is True
    assert rc.is_symlink() and os.readlink(rc) == str(target)
    assert read_block(target) == ENV
    assert sorted(p.name for p in dotfiles.iterdir()) == ["bashrc"]  # no temp file left behind
    assert remove_block(rc) is True
    assert rc.is_symlink()
    assert target.read_bytes() == b"export EDITOR=vi\n"


def test_fish_gets_its_own_file_with_set_gx_and_loses_it_on_removal(tmp_path):
    rc = tmp_path / ".config/fish/conf.d/halton-meter.fish"
    assert write_block(rc, {"HTTPS_PROXY": "http://127.0.0.1:8081", "Q": "it's"}) is True
    assert rc.read_text() == (f"{BEGIN}\n{COMMENT_CREATED}\nset -gx HTTPS_PROXY 'http://127.0.0.1:8081'\n"
                              f"set -gx Q 'it\\'s'\n{END}\n")
    assert rc.stat().st_mode & 0o7777 == 0o644
    assert write_block(rc, {"HTTPS_PROXY": "http://127.0.0.1:8081", "Q": "it's"}) is False
    assert remove_block(rc) is True
    assert not rc.exists()
    assert rc.parent.is_dir()


def test_a_missing_directory_is_a_shell_rc_error_naming_the_file(tmp_path):
    rc = tmp_path / "missing-dir" / ".bashrc"
    with pytest.raises(ShellRcError, match="missing-dir/.bashrc"):
        write_block(rc, ENV)


# -- damaged markers ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, lines", [
    (f"a\n{BEGIN}\nexport A=1\n", [2]),
    (f"{BEGIN}\n{BEGIN}\n{END}\n", [1, 2, 3]),
    (f"{END}\nx\n{BEGIN}\n", [3, 1]),
    (f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n", [1, 3, 2, 4]),
    (f"x\n  {END}  \n", [2]),
])
def test_damaged_markers_are_refused_by_every_operation_and_the_file_is_untouched(tmp_path, text, lines):
    rc = tmp_path / ".bashrc"
    rc.write_text(text)
    for operation in (lambda: write_block(rc, ENV), lambda: remove_block(rc), lambda: read_block(rc)):
        with pytest.raises(ShellRcError) as caught:
            operation()
        message = str(caught.value)
        assert str(rc) in message and "by hand" in message
        for number in lines:
            assert f"line {number}" in message
    assert rc.read_text() == text


# -- quoting -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rc_name", [".bashrc", "halton-meter.fish"])
def test_awkward_values_round_trip(tmp_path, rc_name):
    rc = tmp_path / rc_name
    write_block(rc, AWKWARD)
    assert read_block(rc) == AWKWARD


def test_bash_reads_back_exactly_the_values_written(tmp_path):
    rc = tmp_path / ".bashrc"
    write_block(rc, AWKWARD)
    script = '. "$1"; for n in ' + " ".join(AWKWARD) + '; do printf "%s\\0" "${!n}"; done'
    done = subprocess.run(["bash", "--noprofile", "--norc", "-c", script, "_", str(rc)],
                          capture_output=True, check=True)
    assert done.stdout.decode().split("\0")[:-1] == list(AWKWARD.values())


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_reads_back_exactly_the_values_written(tmp_path):
    rc = tmp_path / "halton-meter.fish"
    write_block(rc, AWKWARD)
    script = f"source {rc}; for n in " + " ".join(AWKWARD) + '; printf "%s\\0" $$n; end'
    done = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True, check=True)
    assert done.stdout.decode().split("\0")[:-1] == list(AWKWARD.values())


@pytest.mark.parametrize("env", [{"BAD-NAME": "x"}, {"1X": "x"}, {"X": "two\nlines"}, {"X": "nul\0"}])
def test_values_that_cannot_sit_on_one_line_are_refused_before_anything_is_written(tmp_path, env):
    rc = tmp_path / ".bashrc"
    rc.write_text("keep\n")
    with pytest.raises(ValueError):
        write_block(rc, env)
    assert rc.read_text() == "keep\n"


def test_an_edited_assignment_that_no_longer_parses_is_reported(tmp_path):
    rc = tmp_path / ".bashrc"
    rc.write_text(f"{BEGIN}\nexport A='unterminated\n{END}\n")
    with pytest.raises(ShellRcError, match="Line 2 of"):
        read_block(rc)


def test_read_block_without_a_block_is_none(tmp_path):
    rc = tmp_path / ".bashrc"
    rc.write_text("export A=1\n")
    assert read_block(rc) is None
    assert remove_block(rc) is False
    assert rc.read_text() == "export A=1\n"
