"""The proposed defaults for the embedded SmolLM2-135M-Instruct and each sample dataset on this machine, and a
bounded probe of each (issue 16's acceptance figures). Run: ``python bench/proposal_smollm2.py WORKSPACE``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.library.gguf import ensure_demo_model  # noqa: E402
from services.library.samples import install_samples  # noqa: E402
from services.training import defaults, preflight  # noqa: E402
from services.training.manager import RunManager  # noqa: E402
from services.workspace import Workspace  # noqa: E402

ws = Workspace.resolve(Path(sys.argv[1]))
model = ensure_demo_model(ws.models, dequantize=True)
samples = install_samples(ws.datasets)
manager = RunManager(ws)
for kind, mode in (("cpt", "cpt"), ("ift", "ift"), ("dpo", "dpo")):
    cfg = manager.prepare_config({"model": str(model), "data": str(samples[kind]), "mode": mode,
                                  "num_layers": -1, "max_seq_length": 256})
    t0 = time.time()
    p = defaults.propose(cfg)
    fitted = manager.prepare_config(defaults.apply_to_config({**cfg}, p))
    print(f"{kind}: {p['changes']} estimated {p['seconds'] / 60:.1f} min (proposal took {time.time() - t0:.1f} s)")
    for r in p["reasons"]:
        print(f"   {r}")
    t0 = time.time()
    probe = preflight.Probe(fitted, root=preflight.probes_dir(ws)).start()
    probe.wait(120)
    wall = time.time() - t0
    r = probe.result or {}
    print(f"   probe: {probe.state} in {wall:.1f} s: {probe.message}; {r.get('tokens_per_second') or 0:.0f} tok/s")
    if r.get("tokens_per_second"):
        m = defaults.propose(cfg, tokens_per_second=r["tokens_per_second"])
        print(f"   at the measured speed: {m['changes']['iters']} iterations, ≈ {m['seconds'] / 60:.1f} min")
