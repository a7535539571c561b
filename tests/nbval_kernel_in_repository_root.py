"""A pytest plugin for the nbval runs of tests/test_notebooks.py (`-p` with this folder on
PYTHONPATH): it starts every notebook's kernel in the repository's top folder instead of
the notebook's folder, where nbval 0.11 always starts it. Jupyter starts a kernel in the
notebook's folder, but a JupyterHub or a learner's own launcher may start it elsewhere;
the notebooks find the repository by walking up from wherever they start, and this run
proves it.

The folder the kernel process really runs in (read from /proc, not the value passed) is
appended to the file $NBVAL_KERNEL_CWD_LOG, so the test can check that the plugin was used.
"""
from __future__ import annotations

import os
from pathlib import Path

import nbval.plugin

REPOSITORY = Path(__file__).resolve().parent.parent


class KernelInRepositoryRoot(nbval.plugin.RunningKernel):
    def __init__(self, kernel_name, cwd=None, startup_timeout=60):
        super().__init__(kernel_name, cwd=str(REPOSITORY), startup_timeout=startup_timeout)
        log = os.environ.get("NBVAL_KERNEL_CWD_LOG")
        if log:
            pid = self.km.provisioner.process.pid
            with open(log, "a") as file:
                file.write(os.readlink(f"/proc/{pid}/cwd") + "\n")


nbval.plugin.RunningKernel = KernelInRepositoryRoot
