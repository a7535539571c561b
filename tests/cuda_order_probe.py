"""Runs a training script until its first model call, reports what a GPU run would find
there, and stops it.

    python cuda_order_probe.py SCRIPT [SCRIPT's flags]

A model's first forward is where a GPU run makes its first cuBLAS call, the moment cuBLAS
reads ``CUBLAS_WORKSPACE_CONFIG``; with deterministic algorithms on and the variable unset,
many PyTorch releases raise an error right there. The probe prints one line,
``probe: {"cublas": VALUE or null, "deterministic": true/false}``, and exits 0 at that
first call; it exits 3 when the script ends without calling a model. No GPU is needed:
on a CPU the same code runs up to the same point."""
import json
import os
import runpy
import sys
from pathlib import Path

import torch


def report_and_stop(module, *args, **kwargs):
    state = {"cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
             "deterministic": torch.are_deterministic_algorithms_enabled()}
    print("probe: " + json.dumps(state), flush=True)
    os._exit(0)  # nothing to clean up: the run's files are a test's temporary folder


torch.nn.Module.__call__ = report_and_stop
script = Path(sys.argv[1]).resolve()
sys.argv = [str(script), *sys.argv[2:]]
sys.path.insert(0, str(script.parent))
runpy.run_path(str(script), run_name="__main__")
print("probe: the script ended without calling a model", flush=True)
sys.exit(3)
