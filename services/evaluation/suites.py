"""Eval suites: the file format (YAML or JSONL), its checks, and scoring one output. Plain Python, no MLX.

A YAML suite::

    name: capitals                  # default: the file's stem
    kind: cases                     # cases (default) | perplexity
    min_pass_rate: 0.9              # optional threshold (the CLI exits 1 below it)
    sampling: {temperature: 0, max_tokens: 32}    # greedy by default
    format: auto                    # auto | chat | completion
    cases:
      - id: france                  # optional, default case-N
        prompt: "The capital of France is"        # or messages: [{role, content}, ...]
        system: "Answer with one word."           # optional
        checks:                     # one or more; each a one-key mapping
          - exact: Paris            # also contains, not_contains, regex, json, max_tokens, choice
          - json: {type: object}    # json: true (parses) or a JSON schema

``batch_size: N`` (default 1) generates N greedy cases at once with mlx-lm's ``batch_generate``: faster, but the
padded batch may flip a near-tie token, so outputs can differ from one-at-a-time greedy (which equals
``mlx_lm.generate``).

A JSONL suite has one case per line; a line ``{"suite": {name, min_pass_rate, sampling, format}}`` sets the rest.
A perplexity suite names ``dataset`` (a dataset folder with valid.jsonl, or a .jsonl file, relative to the suite
file) and optionally ``max_seq_length``, ``batch_size``, ``mask_prompt``.

Every problem is reported ``file:line: reason``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.errors import ForgeError, json_problem
from services.inference.requests import SAMPLING_DEFAULTS, RequestError, normalize_request
from services.library.datasets import validation_split

TEXT_CHECKS = ("exact", "contains", "not_contains", "regex")  # checks whose value is a text
CHECKS = (*TEXT_CHECKS, "json", "max_tokens", "choice")
KINDS = ("cases", "perplexity")
SUITE_KEYS = {"name", "kind", "min_pass_rate", "sampling", "format", "cases", "dataset", "max_seq_length",
              "batch_size", "mask_prompt", "description"}
CASE_KEYS = {"id", "prompt", "messages", "system", "checks"}
SUFFIXES = (".yaml", ".yml", ".jsonl")


class SuiteError(ForgeError, ValueError):
    """A suite file is invalid; the message is ``file:line: reason``."""


@dataclass
class Case:
    """One prompt and the checks its output must pass."""

    id: str
    checks: list[dict[str, Any]]
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    system: str | None = None
    line: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        for k in ("prompt", "messages", "system"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        out["checks"] = self.checks
        return out


@dataclass
class Suite:
    """A parsed suite: its cases (kind ``cases``) or its dataset (kind ``perplexity``)."""

    name: str
    kind: str = "cases"
    cases: list[Case] = field(default_factory=list)
    min_pass_rate: float | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    format: str = "auto"
    dataset: str | None = None
    max_seq_length: int = 2048
    batch_size: int = 4
    mask_prompt: bool = False
    path: str | None = None

    def request(self, case: Case) -> dict[str, Any]:
        """The generation request for ``case`` (greedy unless the suite's sampling says otherwise)."""
        return normalize_request({**self.sampling, "prompt": case.prompt, "messages": case.messages,
                                  "system": case.system, "format": self.format})

    def to_dict(self) -> dict[str, Any]:
        """The suite as plain data (what :func:`from_dict` reads and the YAML file holds)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.min_pass_rate is not None:
            out["min_pass_rate"] = self.min_pass_rate
        if self.sampling:
            out["sampling"] = self.sampling
        if self.format != "auto":
            out["format"] = self.format
        if self.kind == "perplexity":
            out.update(dataset=self.dataset, max_seq_length=self.max_seq_length, batch_size=self.batch_size,
                       mask_prompt=self.mask_prompt)
        else:
            if self.batch_size != 1:
                out["batch_size"] = self.batch_size
            out["cases"] = [c.to_dict() for c in self.cases]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------------------- reading


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file (``.yaml``/``.yml``/``.jsonl``); raises :class:`SuiteError` ``file:line: reason``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SuiteError(f"{p}: no such suite file")
    if p.suffix not in SUFFIXES:
        raise SuiteError(f"{p}:1: a suite file ends in {', '.join(SUFFIXES)}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"{p}:1: unreadable ({e})") from e
    if not text.strip():
        raise SuiteError(f"{p}:1: the file is empty: a suite needs at least one case")
    if p.suffix == ".jsonl":
        header, rows = _jsonl_rows(p, text)
    else:
        header, rows = _yaml_rows(p, text)
    suite = from_dict({**header, "cases": [r for r, _ in rows]}, where=str(p), lines=[n for _, n in rows],
                      default_name=p.stem, base=p.parent)
    suite.path = str(p.resolve())
    return suite


def parse_suite_text(text: str, name: str = "suite") -> Suite:
    """A suite from YAML text (the app's editor); errors read ``NAME:line: reason``."""
    if not text.strip():
        raise SuiteError(f"{name}:1: the suite is empty: a suite needs at least one case")
    header, rows = _yaml_rows(Path(name), text)
    return from_dict({**header, "cases": [r for r, _ in rows]}, where=name, lines=[n for _, n in rows],
                     default_name=Path(name).stem)


def _jsonl_rows(p: Path, text: str) -> tuple[dict[str, Any], list[tuple[Any, int]]]:
    header: dict[str, Any] = {}
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SuiteError(f"{p}:{n}: {json_problem(e)}") from e
        if isinstance(row, dict) and set(row) == {"suite"}:
            if not isinstance(row["suite"], dict):
                raise SuiteError(f"{p}:{n}: 'suite' must be a mapping of suite settings")
            header = row["suite"]
            continue
        rows.append((row, n))
    if not rows and header.get("kind") != "perplexity":
        raise SuiteError(f"{p}:1: no cases: a suite needs at least one case")
    return header, rows


def _yaml_rows(p: Path, text: str) -> tuple[dict[str, Any], list[tuple[Any, int]]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 1
        raise SuiteError(f"{p}:{line}: not valid YAML ({e.problem})") from e
    except yaml.YAMLError as e:
        raise SuiteError(f"{p}:1: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise SuiteError(f"{p}:1: a suite is a mapping with 'cases' (or a perplexity 'dataset')")
    lines: list[int] = []
    for key, value in root.value:
        if key.value == "cases" and isinstance(value, yaml.SequenceNode):
            lines = [item.start_mark.line + 1 for item in value.value]
    cases = data.get("cases")
    header = {k: v for k, v in data.items() if k != "cases"}
    if cases is None:
        return header, [] if data.get("kind") == "perplexity" else _missing_cases(p)
    if not isinstance(cases, list):
        raise SuiteError(f"{p}:1: 'cases' must be a list of cases")
    return header, list(zip(cases, lines or [1] * len(cases), strict=False))


def _missing_cases(p: Path) -> list:
    raise SuiteError(f"{p}:1: no 'cases': a suite needs at least one case")


def from_dict(data: dict[str, Any], where: str = "suite", lines: list[int] | None = None,
              default_name: str = "suite", base: Path | None = None) -> Suite:
    """Check suite data (as parsed from a file or sent to the worker) and build a :class:`Suite`."""
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise SuiteError(f"{where}:1: unknown suite key(s) {sorted(unknown)}; use {', '.join(sorted(SUITE_KEYS))}")
    kind = data.get("kind") or "cases"
    if kind not in KINDS:
        raise SuiteError(f"{where}:1: kind {kind!r} is not one of {', '.join(KINDS)}")
    suite = Suite(name=str(data.get("name") or default_name), kind=kind, format=data.get("format") or "auto")
    _suite_settings(suite, data, where)
    if kind == "perplexity":
        _perplexity_settings(suite, data, where, base)
        return suite
    bs = data.get("batch_size", 1)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise SuiteError(f"{where}:1: batch_size must be an integer ≥ 1 (cases generated together)")
    suite.batch_size = bs
    rows = data.get("cases") or []
    if not rows:
        raise SuiteError(f"{where}:1: no cases: a suite needs at least one case")
    lines = lines or [1] * len(rows)
    seen: set[str] = set()
    for i, (row, line) in enumerate(zip(rows, lines, strict=False)):
        case = parse_case(row, f"{where}:{line}", i)
        if case.id in seen:
            raise SuiteError(f"{where}:{line}: case id {case.id!r} is used twice")
        seen.add(case.id)
        case.line = line
        suite.cases.append(case)
    return suite


def _suite_settings(suite: Suite, data: dict[str, Any], where: str) -> None:
    mpr = data.get("min_pass_rate")
    if mpr is not None:
        if isinstance(mpr, bool) or not isinstance(mpr, (int, float)) or not 0 <= mpr <= 1:
            raise SuiteError(f"{where}:1: min_pass_rate must be a number from 0 to 1, got {mpr!r}")
        suite.min_pass_rate = float(mpr)
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise SuiteError(f"{where}:1: sampling must be a mapping (temperature, top_p, max_tokens, seed, ...)")
    bad = set(sampling) - set(SAMPLING_DEFAULTS)
    if bad:
        raise SuiteError(f"{where}:1: sampling: unknown key(s) {sorted(bad)}")
    suite.sampling = {"max_tokens": 64, **sampling}
    try:
        normalize_request({**suite.sampling, "prompt": "", "format": suite.format})
    except RequestError as e:
        raise SuiteError(f"{where}:1: {e}") from e


def _perplexity_settings(suite: Suite, data: dict[str, Any], where: str, base: Path | None) -> None:
    dataset = data.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        raise SuiteError(f"{where}:1: a perplexity suite needs 'dataset' (a dataset folder or a .jsonl file)")
    p = Path(dataset).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    split = validation_split(p)
    if split is None:
        raise SuiteError(f"{where}:1: dataset {p}: " + ("the folder has no valid.jsonl" if p.is_dir() else
                                                         "not a .jsonl file" if p.is_file() else "does not exist"))
    suite.dataset = str(split.resolve())
    for key in ("max_seq_length", "batch_size"):
        value = data.get(key, getattr(suite, key))
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if key == "max_seq_length" else 1):
            raise SuiteError(f"{where}:1: {key} must be an integer ≥ {2 if key == 'max_seq_length' else 1}")
        setattr(suite, key, value)
    suite.mask_prompt = bool(data.get("mask_prompt", False))


def parse_case(row: Any, where: str, index: int = 0) -> Case:
    """One case row; ``where`` (``file:line``) starts every error message."""
    if not isinstance(row, dict):
        raise SuiteError(f"{where}: a case is a mapping with prompt (or messages) and checks, got {row!r}")
    unknown = set(row) - CASE_KEYS
    if unknown:
        raise SuiteError(f"{where}: unknown case key(s) {sorted(unknown)}; use {', '.join(sorted(CASE_KEYS))}")
    prompt, messages, system = row.get("prompt"), row.get("messages"), row.get("system")
    if prompt is None and messages is None:
        raise SuiteError(f"{where}: missing prompt: give 'prompt' or 'messages'")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise SuiteError(f"{where}: prompt must be a non-empty string")
    try:
        normalize_request({"prompt": prompt, "messages": messages, "system": system})
    except RequestError as e:
        raise SuiteError(f"{where}: {e}") from e
    checks = row.get("checks")
    if not isinstance(checks, list) or not checks:
        raise SuiteError(f"{where}: missing checks: give a list of one or more of {', '.join(CHECKS)}")
    return Case(id=str(row.get("id") or f"case-{index + 1}"), checks=[parse_check(c, where) for c in checks],
                prompt=prompt, messages=messages, system=system)


def parse_check(check: Any, where: str) -> dict[str, Any]:
    """Check one ``{name: value}`` check (regexes compile, schemas are valid JSON schemas)."""
    if not isinstance(check, dict) or len(check) != 1:
        raise SuiteError(f"{where}: a check is a one-key mapping such as {{contains: text}}, got {check!r}")
    (name, value), = check.items()
    if name not in CHECKS:
        raise SuiteError(f"{where}: unknown check {name!r}; use one of {', '.join(CHECKS)}")
    if name in TEXT_CHECKS and not isinstance(value, str):
        raise SuiteError(f"{where}: check {name} needs a string, got {value!r}")
    if name == "regex":
        try:
            re.compile(value)
        except re.error as e:
            raise SuiteError(f"{where}: invalid regex {value!r}: {e}") from e
    if name == "max_tokens" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SuiteError(f"{where}: check max_tokens needs an integer ≥ 1, got {value!r}")
    if name == "choice" and (not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value)):
        raise SuiteError(f"{where}: check choice needs a non-empty list of strings, got {value!r}")
    if name == "json" and value is not True:
        if not isinstance(value, dict):
            raise SuiteError(f"{where}: check json is 'true' (the output parses) or a JSON schema mapping")
        try:
            import jsonschema
        except ImportError:
            raise SuiteError(f"{where}: a JSON schema check needs the jsonschema package "
                             "(pip install 'forgellm[eval]')") from None

        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as e:
            raise SuiteError(f"{where}: invalid JSON schema: {e.message}") from e
    return {name: value}


def check_default(name: str) -> Any:
    """The empty argument of a check kind in the editor (see :func:`check_from_field`)."""
    return 64 if name == "max_tokens" else [] if name == "choice" else ""


def check_from_field(name: str, value: Any, where: str = "check") -> dict[str, Any]:
    """A check from the app editor's argument field of its kind: a text (exact, contains, not_contains, regex),
    a number (max_tokens), a list of answers (choice), or JSON schema text (json; blank: the output parses)."""
    if name in TEXT_CHECKS and (not isinstance(value, str) or not value):
        raise SuiteError(f"{where}: check {name} needs a text to look for")
    if name == "max_tokens" and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif name == "choice":
        value = [str(v).strip() for v in value or [] if str(v).strip()]
    elif name == "json":
        text = value.strip() if isinstance(value, str) else ""
        try:
            value = True if text in ("", "true") else json.loads(text)
        except json.JSONDecodeError as e:
            raise SuiteError(f"{where}: the JSON schema is not valid JSON ({e.msg})") from e
    return parse_check({name: value}, where)


def check_field(check: dict[str, Any]) -> tuple[str, Any]:
    """A check's kind and the editor's argument field value (the inverse of :func:`check_from_field`)."""
    (name, value), = check.items()
    if name == "json":
        return name, "" if value is True else json.dumps(value, indent=2)
    return name, list(value) if name == "choice" else value


# ----------------------------------------------------------------------------------------- scoring


def run_check(check: dict[str, Any], text: str, tokens: int) -> tuple[bool, str]:
    """Whether ``text`` (``tokens`` generated tokens) passes ``check``, and why not."""
    (name, value), = check.items()
    out = text.strip()
    if name == "exact":
        return out == value.strip(), "" if out == value.strip() else f"expected exactly {value!r}"
    if name == "contains":
        return value in text, "" if value in text else f"{value!r} not in the output"
    if name == "not_contains":
        return value not in text, "" if value not in text else f"{value!r} is in the output"
    if name == "regex":
        ok = re.search(value, text) is not None
        return ok, "" if ok else f"no match for /{value}/"
    if name == "max_tokens":
        return tokens <= value, "" if tokens <= value else f"{tokens} tokens > {value}"
    if name == "choice":
        return out in value, "" if out in value else f"not one of {value}"
    return _json_check(value, out)


def _json_check(schema: Any, out: str) -> tuple[bool, str]:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", out)
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as e:
        return False, f"not JSON ({e.msg})"
    if schema is True:
        return True, ""
    import jsonschema

    error = jsonschema.validators.validator_for(schema)(schema).iter_errors(doc)
    first = next(error, None)
    return first is None, "" if first is None else f"schema: {first.message}"


def score_case(case: Case, text: str, tokens: int) -> dict[str, Any]:
    """A case's result: its output, each check's verdict, and ``passed`` (every check passed)."""
    results = []
    for check in case.checks:
        ok, why = run_check(check, text, tokens)
        results.append({"check": next(iter(check)), "value": next(iter(check.values())), "passed": ok, "why": why})
    return {"id": case.id, "output": text, "tokens": tokens, "passed": all(r["passed"] for r in results),
            "checks": results}


def summarize(suite: Suite, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The suite's metrics from its case results."""
    passed = sum(1 for c in cases if c["passed"])
    rate = passed / len(cases) if cases else 0.0
    return {"pass_rate": rate, "passed": passed, "total": len(cases)}


def threshold_failures(records: list[dict[str, Any]]) -> list[str]:
    """Messages for every suite result below its ``min_pass_rate``."""
    out = []
    for r in records:
        mpr = r.get("min_pass_rate")
        rate = (r.get("metrics") or {}).get("pass_rate")
        if mpr is not None and rate is not None and rate < mpr:
            out.append(f"{r['name']} on {r.get('label', 'the model')}: pass rate {rate:.2f} < min_pass_rate {mpr:.2f}")
    return out
