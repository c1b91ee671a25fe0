"""``run_in_session``: run a command (a launcher and the ranks it starts) in its own session
with a deadline, and kill whatever of that session is left, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Optional


def run_in_session(
    command: list[str], cwd: Path, env: dict[str, str], timeout_s: float, what: Optional[str] = None, merge_stderr: bool = False
) -> subprocess.CompletedProcess:
    """``command``'s CompletedProcess (stdout, and stderr unless ``merge_stderr`` folds it into
    stdout). Past ``timeout_s`` the whole session is killed and the test fails with the output's
    tail, naming ``what`` (default: the command)."""
    stderr = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(process.pid)
        out, err = process.communicate()
        tail = (out if merge_stderr else err) or ""
        raise AssertionError(f"{what or ' '.join(command)} ran past {timeout_s:.0f}s; output tail:\n{tail[-4000:]}") from None
    finally:
        kill_session(process.pid)  # ranks the launcher left behind, if any
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def kill_session(session_id: int) -> None:
    try:
        os.killpg(session_id, signal.SIGKILL)
    except ProcessLookupError:
        pass
