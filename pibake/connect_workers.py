"""How ``pibake.connect``'s connectors start a command's process for ClusterShell's event engine (used by
``pibake.connect`` only; the connectors, the fan-out and the events stay ClusterShell's).

ClusterShell starts each process with its own fork + exec (``fastsubprocess``): the fork copies this Python
process's page tables, and the child's copy-on-write faults before its exec are charged to it (they show as
ssh client CPU). Here the standard library's ``subprocess`` starts it (vfork/posix_spawn on Linux: nothing is
copied), with ``close_fds`` and the default signal dispositions (a Python parent ignores SIGPIPE; its children
should not), and its pipes are handed to ClusterShell's engine the way its own ``ExecClient`` does.

ClusterShell also inspects the handler's ``ev_read`` signature (``inspect.getfullargspec``, compatibility with
1.7 handlers) for every line it delivers and files each line in its task's message tree; pibake's
``Session`` has the 1.9 signature and keeps its own lines, so lines go straight to it.

Measured (bench/deploy --sizes 32, A/B alternating, the commit that added this module): the deploy process
from 9-10 to 5 ms of CPU per host, the rerun from 6-7 to 2.5 ms per host. When these
ClusterShell internals are not there (another ClusterShell version), ``start`` falls back to ``task.shell``."""

import os
import subprocess

try:
    from ClusterShell.Worker.EngineClient import E_READ, E_WRITE
    from ClusterShell.Worker.Exec import ExecClient, ExecWorker
except ImportError:  # a ClusterShell without these internals: its own start (task.shell) is used
    ExecClient = ExecWorker = None

if ExecClient is not None:

    class SpawnClient(ExecClient):
        """ClusterShell's ExecClient for one process, started by ``subprocess`` from ``worker.argv``."""

        def _start(self):
            # ClusterShell's own order is start the process, then ev_start: the Session's ``started`` stamp
            # could then follow the command's first output (verify's clock check compares them). Stamp first.
            self._on_nodeset_start(self.key)
            self.popen = self._exec_nonblock(self.worker.argv)
            return self

        def _exec_nonblock(self, commandlist, shell=False, env=None):
            # ClusterShell closes the fds it is given (os.close): it gets bare fds, never file objects that
            # would close them a second time (possibly someone else's reused fd) when collected.
            stdin_r, stdin_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe() if self._stderr else (None, out_w)
            try:
                proc = subprocess.Popen(commandlist, stdin=stdin_r, stdout=out_w, stderr=err_w, close_fds=True)
            except BaseException:
                for fd in (stdin_w, out_r, err_r):
                    if fd is not None:
                        os.close(fd)
                raise
            finally:
                for fd in {stdin_r, out_w, err_w}:
                    os.close(fd)
            for fd in (stdin_w, out_r, err_r):
                if fd is not None:
                    os.set_blocking(fd, False)  # the engine reads and writes until EAGAIN
            if self._stderr:
                self.streams.set_stream(self.worker.SNAME_STDERR, err_r, E_READ)
            self.streams.set_stream(self.worker.SNAME_STDOUT, out_r, E_READ)
            self.streams.set_stream(self.worker.SNAME_STDIN, stdin_w, E_WRITE, retain=False)
            return proc

    class SpawnWorker(ExecWorker):
        """One command (``argv``) for one host (``key``), its events to ``handler`` (a ``pibake.connect.Session``)."""

        SHELL_CLASS = SpawnClient

        def __init__(self, key, argv, handler, timeout, stderr):
            self.argv = list(argv)
            # ExecWorker wants a command string and treats one containing "%hosts" as a command for all its
            # nodes at once; the process starts from ``argv`` (SpawnClient._start), so the program's path will do
            super().__init__(key, handler, timeout=timeout, command=self.argv[0], stderr=stderr)

        def _on_node_msgline(self, node, msg, sname):
            # ClusterShell's own: a message-tree entry and an ev_read signature check per line (see above)
            self.eh.ev_read(self, node, sname, msg)


def start(task, key, argv, command, *, handler, timeout, stdin, remote_nodes=None, keep_stdin_open=False):
    """Start ``argv`` on ``task`` as a worker for ``key`` whose events go to ``handler``; ``stdin``: bytes for
    its standard input, or None; then its stdin is closed, unless ``keep_stdin_open`` (the caller writes more
    with ``worker.write`` and closes it with ``worker.set_write_eof``). Without the internals above:
    ClusterShell's own ``task.shell`` of ``command`` (to ``remote_nodes`` with the task's ssh settings, else
    locally)."""
    if ExecClient is not None:
        worker = SpawnWorker(key, argv, handler, timeout, stderr=True)
    elif remote_nodes is not None:
        worker = task.shell(command, nodes=remote_nodes, handler=handler, timeout=timeout,
                            stdin=stdin is not None or keep_stdin_open, stderr=True)
    else:
        worker = task.shell(command, handler=handler, timeout=timeout, stdin=stdin is not None or keep_stdin_open,
                            stderr=True)
    if stdin is not None:
        worker.write(stdin)
    if not keep_stdin_open:
        worker.set_write_eof()
    if ExecClient is not None:
        task.schedule(worker)
    return worker
