"""Export a run's training dashboard as one self-contained HTML file (and a PNG of it).

The HTML renders offline: it inlines the ECharts library that ships inside the installed nicegui
package, the run's metrics as JSON, and a small script (``CHART_SCRIPT``) that draws the charts. No
file is fetched when it opens. The PNG is a screenshot by headless Chromium, when one is installed.
Nothing here imports MLX or nicegui.

::

    html, png = export_dashboard("workspace/runs/RUN", "out/")   # png is None without Chromium
"""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from services.errors import ForgeError
from services.training.folder import RunFolder, history
from services.training.series import bound, read
from services.workspace import write_atomic

log = logging.getLogger(__name__)

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PAGE_WIDTH = 1200
DASHBOARD_SERIES = ("train_loss", "val_loss", "test_loss", "learning_rate", "tokens_per_second", "peak_memory_gb",
                    "rss_gb")  # what CHART_SCRIPT draws

# The page's only hand-written code: reads the embedded JSON and draws four charts with ECharts.
CHART_SCRIPT = """
const D = JSON.parse(document.getElementById('forgellm-data').textContent);
const line = (name, data, extra) => Object.assign({name, type: 'line', data, showSymbol: data.length < 60}, extra);
function chart(id, title, series) {
  const el = document.getElementById(id);
  series = series.filter(s => s.data.length);
  if (!series.length) { el.textContent = title + ': no data'; el.className += ' empty'; return; }
  echarts.init(el, null, {renderer: 'canvas'}).setOption({
    animation: false, title: {text: title, left: 8, textStyle: {fontSize: 14}},
    tooltip: {trigger: 'axis'}, legend: {top: 4, right: 8}, grid: {left: 60, right: 24, top: 40, bottom: 40},
    xAxis: {type: 'value', name: 'iteration', nameLocation: 'middle', nameGap: 26, min: 'dataMin', max: 'dataMax'},
    yAxis: {type: 'value', scale: true}, series});
}
const best = D.best ? [{coord: [D.best.iteration, D.best.val_loss], value: 'best'}] : [];
chart('chart-loss', 'Loss', [line('train', D.series.train_loss),
  line('validation', D.series.val_loss, {markPoint: {data: best, symbolSize: 40}}),
  line('test', D.series.test_loss, {type: 'scatter'})]);
chart('chart-lr', 'Learning rate', [line('learning rate', D.series.learning_rate)]);
chart('chart-speed', 'Throughput (tokens/s)', [line('tokens/s', D.series.tokens_per_second)]);
chart('chart-memory', 'Memory (GB)', [line('MLX peak', D.series.peak_memory_gb), line('RSS', D.series.rss_gb)]);
document.body.dataset.ready = '1';
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: {width}px; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }} .sub {{ color: #666; margin-bottom: 16px; }}
.grid {{ display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }}
.chart {{ height: 260px; border: 1px solid #ddd; border-radius: 6px; }} .wide {{ grid-column: 1 / 3; height: 340px; }}
.empty {{ color: #999; padding: 16px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }} td, th {{ border: 1px solid #ddd; padding: 3px 8px; }}
th {{ background: #f5f5f5; text-align: left; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style></head>
<body>
<h1>{title}</h1>
<div class="sub">{subtitle}</div>
<div class="grid">
<div id="chart-loss" class="chart wide"></div>
<div id="chart-lr" class="chart"></div><div id="chart-speed" class="chart"></div>
<div id="chart-memory" class="chart wide"></div>
</div>
<h2>Checkpoints</h2>
{checkpoints}
<h2>Run</h2>
{details}
<script type="application/json" id="forgellm-data">{data}</script>
<script type="module">{echarts}</script>
<script type="module">{script}</script>
</body></html>
"""


class DashboardError(ForgeError, RuntimeError):
    """The dashboard could not be exported or rendered; the message says what and where."""


# ----------------------------------------------------------------------------------------- ECharts


def echarts_bundle() -> Path:
    """The ECharts ES module inside the installed nicegui package (the file its ``echart`` element loads)."""
    spec = importlib.util.find_spec("nicegui")
    if spec is None or not spec.origin:
        raise DashboardError("the nicegui package is not installed: it provides the ECharts library")
    dist = Path(spec.origin).parent / "elements" / "echart" / "dist"
    index = dist / "index.js"
    try:
        entry = index.read_text(encoding="utf-8")
    except OSError as e:
        raise DashboardError(f"{index}: cannot read nicegui's ECharts entry module ({e})") from e
    m = re.search(r'import\{([^}]*)\}from"\./([^"]+)"', entry)
    if m is None:
        raise DashboardError(f"{index}: unexpected layout (no import of the ECharts bundle)")
    return dist / m.group(2)


def _aliases(spec: str) -> dict[str, str]:
    """``a as b,c`` (an import/export list) → {"a": "b", "c": "c"}."""
    pairs = (p.split(" as ") for p in spec.split(",") if p.strip())
    return {p[0].strip(): p[-1].strip() for p in pairs}


def echarts_script() -> str:
    """ECharts as inline module code that sets ``globalThis.echarts`` and fetches nothing."""
    bundle = echarts_bundle()
    entry = (bundle.parent / "index.js").read_text(encoding="utf-8")
    # index.js is `import{aS as a,…}from"./index-X.js";export{a as echarts,…}`; the bundle ends in `export{zK as aS,…}`
    imported = _aliases(re.search(r"import\{([^}]*)\}", entry).group(1))  # {bundle export: local}
    exported = {v: k for k, v in _aliases(re.search(r"export\{([^}]*)\}", entry).group(1)).items()}
    name = {v: k for k, v in imported.items()}.get(exported.get("echarts", ""))
    code = bundle.read_text(encoding="utf-8")
    start = code.rfind("export{")
    if name is None or start < 0:
        raise DashboardError(f"{bundle}: cannot find the echarts export of nicegui's bundle")
    end = code.index("}", start)
    local = {v: k for k, v in _aliases(code[start + 7 : end]).items()}.get(name)
    if local is None:
        raise DashboardError(f"{bundle}: export {name!r} (echarts) not found")
    code = code[:start] + f"globalThis.echarts={local};" + code[end + 1 :]
    # The ECharts-GL chunk is loaded on demand by a dynamic import; the dashboard never needs it.
    code = re.sub(r'import\("\./[^"]+"\)', 'Promise.reject(new Error("ECharts GL is not bundled"))', code)
    code = re.sub(r"//# sourceMappingURL=\S+", "", code)
    return code.replace("</script", "<\\/script")


# ----------------------------------------------------------------------------------------- data


def dashboard_data(folder: RunFolder) -> dict[str, Any]:
    """What the page plots: metric series as [iteration, value] pairs, checkpoints and the best one."""
    series = read(history(folder.metrics()[0]), DASHBOARD_SERIES)
    info = folder.info()
    return _json_safe({"run": info.get("id") or folder.id, "series": {k: bound(v) for k, v in series.items()},
                       "best": info.get("best"), "checkpoints": info.get("checkpoints") or []})


def _json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "–" if value is None else html.escape(str(value))


def _table(rows: list[list[str]], header: list[str] | None = None, numeric: frozenset[int] = frozenset()) -> str:
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def render_html(folder: RunFolder, echarts_js: str | None = None) -> str:
    """The dashboard page of a run, with everything inline."""
    data = dashboard_data(folder)
    info = folder.info()
    best_it = (data["best"] or {}).get("iteration")
    ckpts = [[str(c["iteration"]) + (" ★ best" if c["iteration"] == best_it else ""), _fmt(c.get("val_loss")),
              _fmt(c.get("train_loss")), _fmt(c.get("epoch"), 2), _fmt(c.get("trained_tokens"))]
             for c in data["checkpoints"]]
    ckpt_table = (_table(ckpts, ["iteration", "val loss", "train loss", "epoch", "trained tokens"],
                         frozenset({1, 2, 3, 4}))
                  if ckpts else "<p>No checkpoints.</p>")
    versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
    details = _table([[html.escape(k), _fmt(v)] for k, v in (
        ("status", info.get("status")), ("reason", info.get("reason")), ("model", info.get("model")),
        ("data", info.get("data")), ("mode", info.get("mode")), ("fine-tune type", info.get("fine_tune_type")),
        ("iterations", f"{info.get('iteration', 0)} / {info.get('iters') or '?'}"), ("seed", info.get("seed")),
        ("versions", versions or None),
        ("exported", time.strftime("%Y-%m-%d %H:%M:%S")))])
    title = f"ForgeLLM run {info.get('name') or folder.id}"
    subtitle = html.escape(f"{info.get('status', '?')} · {info.get('mode') or 'mlx-lm'} · "
                           f"{info.get('fine_tune_type', '?')} · {Path(str(info.get('model', '?'))).name}")
    payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    return PAGE.format(title=html.escape(title), subtitle=subtitle, width=PAGE_WIDTH, checkpoints=ckpt_table,
                       details=details, data=payload, echarts=echarts_js or echarts_script(), script=CHART_SCRIPT)


# ----------------------------------------------------------------------------------------- files


def find_chromium() -> str | None:
    """A Chromium/Chrome executable: ``$CHROMIUM_PATH`` or the first one on PATH."""
    env = os.environ.get("CHROMIUM_PATH")
    if env and Path(env).exists():
        return env
    return next((p for p in map(shutil.which, CHROMIUM_CANDIDATES) if p), None)


def render_png(html_path: str | os.PathLike, png_path: str | os.PathLike, *, chromium: str | None = None,
               height: int = 1500, timeout: float = 90.0) -> Path:
    """Screenshot ``html_path`` with headless Chromium (no network, throwaway profile) into ``png_path``."""
    exe = chromium or find_chromium()
    if exe is None:
        raise DashboardError("no PNG: Chromium is not installed (set CHROMIUM_PATH or install chromium)")
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="forgellm-chromium-") as profile:
        tmp_png = Path(profile) / "shot.png"
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               f"--user-data-dir={profile}", f"--window-size={PAGE_WIDTH + 48},{height}",
               "--virtual-time-budget=5000", f"--screenshot={tmp_png}", html_path.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DashboardError(f"no PNG: Chromium ({exe}) did not finish within {timeout:.0f} s") from None
        except OSError as e:
            raise DashboardError(f"no PNG: cannot run Chromium ({exe}): {e}") from e
        if not tmp_png.is_file() or tmp_png.stat().st_size == 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise DashboardError(f"no PNG: Chromium ({exe}) exited with {proc.returncode} without a screenshot"
                                 + (f": {tail}" if tail else ""))
        write_atomic(png_path, tmp_png.read_bytes())
    return png_path


def export_dashboard(run_folder: str | os.PathLike | RunFolder, out_dir: str | os.PathLike, *,
                     png: bool = True) -> tuple[Path, Path | None]:
    """Write ``out_dir/dashboard.html`` (self-contained, offline) and, if Chromium works, ``dashboard.png``.

    Returns (html path, png path or None); why a PNG is missing is logged (or call :func:`render_png`).
    """
    folder = run_folder if isinstance(run_folder, RunFolder) else RunFolder(run_folder)
    if not folder.exists():
        raise DashboardError(f"{folder.path} is not a run folder (no run.json)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DashboardError(f"output {out} exists and is not a folder")
    html_path = out / "dashboard.html"
    write_atomic(html_path, render_html(folder))
    png_path = None
    if png:
        try:
            png_path = render_png(html_path, out / "dashboard.png")
        except DashboardError as e:
            log.warning("%s", e)
    return html_path, png_path
