"""The Train page's preflight panel: estimate peak memory and time of the form's config, probe a few real steps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nicegui import run, ui

from services.config import ConfigError, ConfigProblems
from services.training import preflight
from services.units import duration, gigabytes

if TYPE_CHECKING:
    from app.composition import Services

PROBE_LABEL = "Probe 3 steps"
APPLY_LABEL = "Apply the suggestion"


def preflight_lines(est: dict[str, Any]) -> list[str]:
    """The estimate in a few lines of text."""
    parts = " · ".join(f"{k} {gigabytes(v)}" for k, v in est["parts_gb"].items() if v >= 0.00005)
    verdict = "fits" if est["fits"] else "DOES NOT FIT"
    data = est["data"]
    lines = [f"Peak memory ≈ {gigabytes(est['peak_gb'])} (MLX), {gigabytes(est['process_gb'])} with the runtime; "
             f"{gigabytes(est['free_gb'])} free: {verdict}",
             parts,
             f"Trainable {est['trainable']:,} of {est['parameters']:,} parameters "
             f"({est['trained_layers']} of {est['layers']} layers); widest batch {est['batch_size']} × {est['seq']}",
             f"Data: {data['samples']:,} training samples ({data['format']}) → {est['steps_per_epoch']:,} steps/epoch; "
             f"{est['iters']:,} iterations",
             f"Time ≈ {duration(est['total_seconds'])} at ~{est['tokens_per_second']:,.0f} tok/s (training "
             f"{duration(est['seconds'])}, validation {duration(est['eval_seconds'])}, start-up "
             f"{duration(est['startup_seconds'])}; rough: the probe measures it)"]
    pref = est.get("preference")
    if pref:
        lines.append(f"Preference: 2 sequences per pair ({pref['step']} step: "
                     + ("one side's activations at a time" if pref["step"] == "two-pass" else "both sides at once")
                     + f"); reference: {pref['reference']}"
                     + (", one forward pass per step" if pref["reference"] == "adapters-off" else "")
                     + (", computed once before training" if pref["reference_once"] else "")
                     + (f"; {data['pairs']['pairs']:,} pairs, chosen longer in {data['pairs']['chosen_longer']:.0%}"
                        if data.get("pairs") else ""))
    if est.get("warning"):
        lines.append(f"⚠ {est['warning']}")
    if data.get("bad_lines"):
        lines.append(f"⚠ {data['bad_lines']} bad line(s) in the data: see the Datasets page")
    return lines


def probe_lines(result: dict[str, Any], est: dict[str, Any] | None, advice: dict[str, Any] | None) -> list[str]:
    """A finished probe in a few lines of text, compared with the estimate when there is one."""
    lines = [f"Probe: {result['tokens_per_second'] or 0:,.0f} tok/s, MLX peak {gigabytes(result['peak_gb'])}, "
             f"RSS {gigabytes(result['rss_gb'])}"]
    if est is None or advice is None:
        return lines
    if advice["estimate_error"] is not None:
        lines.append(f"The estimate was {gigabytes(est['peak_gb'])} ({advice['estimate_error']:+.0%} of the "
                     "measured peak)")
    if advice.get("seconds") is not None:
        lines.append(f"Time at the measured speed ≈ {duration(advice['seconds'])}")
    if advice["suggestion"] and "batch_size" not in advice["suggestion"]:
        lines.append(advice["suggestion"]["text"])
    return lines


class PreflightPanel:
    """Estimate peak memory and time for the form's config; optionally probe a few real steps (bounded in time
    and sequence length, with its progress, cancellable) and end with one "Apply the suggestion".

    ``current()`` gives ``(config, problems)`` of the form, ``apply(changes)`` writes suggested values into it;
    ``suggest(tokens_per_second)`` makes a proposal at the probe's measured speed (``services.training.defaults``)
    and ``apply_proposal(proposal)`` writes it into the form.
    """

    def __init__(self, services: Services, current: Callable[[], tuple[dict[str, Any], list[ConfigError]]],
                 apply: Callable[[dict[str, Any]], None],
                 suggest: Callable[[float | None], Awaitable[dict[str, Any] | None]] | None = None,
                 apply_proposal: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.services, self.current, self.apply = services, current, apply
        self.suggest, self.apply_proposal = suggest, apply_proposal
        self.proposal: dict[str, Any] | None = None
        self.est: dict[str, Any] | None = None
        self.probe: preflight.Probe | None = None
        self.suggestion: dict[str, Any] | None = None
        self._version = -1
        with ui.card().classes("w-full").mark("preflight"):
            ui.label("Preflight").classes("text-sm font-semibold text-grey-7")
            with ui.row().classes("gap-2"):
                self.estimate_button = ui.button("Estimate memory and time", icon="speed",
                                                 on_click=self.run_estimate) \
                    .props("outline dense no-caps").mark("preflight-estimate")
                self.probe_button = ui.button(PROBE_LABEL, icon="science", on_click=self.run_probe) \
                    .props("outline dense no-caps").mark("preflight-probe")
                self.probe_button.tooltip(f"Run three real training steps in a temporary folder and measure "
                                          f"tokens/s and memory (at most {preflight.PROBE_SECONDS:.0f} s, sequences "
                                          f"cut at {preflight.PROBE_SEQ} tokens unless Full length is on)")
                self.full_length = ui.checkbox("Full length").props("dense").mark("probe-full-length")
                self.full_length.tooltip("Probe at the form's max_seq_length, even beyond "
                                         f"{preflight.PROBE_SEQ} tokens")
            self.progress = ui.linear_progress(value=0, show_value=False).props("instant-feedback") \
                .mark("probe-progress")
            self.progress.set_visibility(False)
            self.text = ui.label("").classes("whitespace-pre-line text-xs").mark("preflight-text")
            self.probe_text = ui.label("").classes("whitespace-pre-line text-xs").mark("preflight-probe-text")
            with ui.row().classes("items-center gap-2") as self.advice_row:
                self.advice = ui.label("").classes("text-xs text-warning").mark("preflight-suggestion")
                ui.button(APPLY_LABEL, icon="check", on_click=self.apply_suggestion).props("dense no-caps") \
                    .mark("preflight-apply")
        self.advice_row.set_visibility(False)
        ui.timer(0.5, self.poll)

    def resolved(self) -> dict[str, Any] | None:
        """The form's full config, or ``None`` (with a notice) while it has problems."""
        cfg, errors = self.current()
        if errors:
            ui.notify("Fix the config's problems first", type="warning")
            return None
        try:
            return self.services.manager.prepare_config(cfg)
        except (ConfigError, ConfigProblems) as e:
            ui.notify(str(e), type="negative", multi_line=True)
            return None

    def show_suggestion(self, suggestion: dict[str, Any] | None, proposal: dict[str, Any] | None = None) -> None:
        """Offer a change (memory) or a whole proposal (after a probe) behind the one apply button."""
        self.suggestion, self.proposal = suggestion, proposal
        text = suggestion["text"] if suggestion else ""
        if proposal:
            ch = proposal["changes"]
            text = (f"max_seq_length {ch['max_seq_length']}, batch {ch['batch_size']}, {ch['iters']:,} iterations "
                    f"(≈ {proposal['epochs']:.1f} epochs), validation every {ch['steps_per_eval']}: "
                    f"≈ {duration(proposal['seconds'])} at the measured speed")
        self.advice.set_text(f"Suggestion: {text}" if text else "")
        self.advice_row.set_visibility(bool(text))

    def apply_suggestion(self) -> None:
        if self.proposal and self.apply_proposal:
            self.apply_proposal(self.proposal)
        elif self.suggestion:
            self.apply({k: v for k, v in self.suggestion.items() if k != "text"})
        self.show_suggestion(None)

    async def run_estimate(self) -> dict[str, Any] | None:
        cfg = self.resolved()
        if cfg is None:
            return None
        self.estimate_button.props("loading")
        try:
            est = await run.io_bound(preflight.estimate, cfg, workspace=self.services.workspace.root)
        except (ValueError, OSError) as e:  # PreflightError and DataError are ValueErrors
            self.text.set_text(f"Cannot estimate: {e}")
            self.text.classes(replace="whitespace-pre-line text-xs text-negative")
            return None
        finally:
            self.estimate_button.props(remove="loading")
        self.est = est
        self.text.set_text("\n".join(preflight_lines(est)))
        self.text.classes(replace="whitespace-pre-line text-xs" + ("" if est["fits"] else " text-negative"))
        self.show_suggestion(est["suggestion"])
        return est

    async def run_probe(self) -> None:
        if self.probe is not None and self.probe.state == "running":
            self.probe.cancel()
            return
        est = await self.run_estimate()
        cfg = self.resolved() if est is not None else None
        if cfg is None:
            return
        self.show_suggestion(None)
        self.probe = preflight.Probe(cfg, root=preflight.probes_dir(self.services.workspace),
                                     full_length=bool(self.full_length.value)).start()
        self.probe_button.set_text("Cancel probe")
        self.progress.set_value(0)
        self.progress.set_visibility(True)

    async def poll(self) -> None:
        probe = self.probe
        if probe is None or probe.version == self._version:
            return
        self._version = probe.version
        self.progress.set_value(probe.fraction)
        if probe.state == "running":
            self.probe_text.set_text(probe.message)
            return
        self.progress.set_visibility(False)
        self.probe_button.set_text(PROBE_LABEL)
        if probe.state != "done" or not probe.result:
            self.probe_text.set_text(probe.message)
            return
        result = probe.result
        advice = preflight.probe_advice(result, self.est) if self.est else None
        self.probe_text.set_text("\n".join([probe.message, *probe_lines(result, self.est, advice)]))
        memory = advice["suggestion"] if advice and advice["suggestion"] and "batch_size" in advice["suggestion"] \
            else None
        proposal = await self.suggest(result.get("tokens_per_second")) if self.suggest else None
        if proposal and memory:  # the measured memory wins over the modelled one
            proposal["changes"]["batch_size"] = min(proposal["changes"]["batch_size"], memory["batch_size"])
        self.show_suggestion(memory, proposal)
