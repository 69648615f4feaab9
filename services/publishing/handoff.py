"""Hand-off of a published model to other tools: an Ollama ``Modelfile`` next to the GGUF, the GGUF placed in an
LM Studio models folder, and the exact commands of mlx-lm, LM Studio, Ollama and llama.cpp for the model card.

No MLX here: the UI process may use it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

LMSTUDIO_PUBLISHER = "forgellm"  # LM Studio lists models as PUBLISHER/NAME (~/.lmstudio/models/PUBLISHER/NAME/)
LMSTUDIO_DEFAULT = "~/.lmstudio/models"
# End-of-turn markers of the common chat templates: the stop parameters of a Modelfile when the template has them
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "</s>", "<|end|>")
_CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
           '<|im_start|>assistant\n')
_LLAMA3 = ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
           '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n')


def ollama_template(chat_template: str | None) -> tuple[str | None, str | None]:
    """(Ollama TEMPLATE, default SYSTEM) for a Jinja chat template when it can be expressed (ChatML, Llama 3)."""
    if not chat_template:
        return None, None
    if "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
        m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^<'\"{}]+?)<\|im_end\|>", chat_template)
        return _CHATML, m.group(1).strip() if m else None
    if "<|start_header_id|>" in chat_template and "<|eot_id|>" in chat_template:
        return _LLAMA3, None
    return None, None


def stop_tokens(chat_template: str | None, eos: str | None) -> list[str]:
    """The stop tokens of a chat template: its end-of-turn markers, and the EOS token."""
    found = [t for t in END_MARKERS if chat_template and t in chat_template]
    return list(dict.fromkeys(found + ([eos] if eos else [])))


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(gguf_file: str, chat_template: str | None, eos: str | None) -> str:
    """The text of an Ollama Modelfile for ``./gguf_file`` (TEMPLATE when it can be expressed, PARAMETER stop)."""
    template, system = ollama_template(chat_template)
    lines = ["# Ollama: ollama create NAME -f Modelfile (in this folder), then ollama run NAME",
             f"FROM ./{gguf_file}"]
    if template:
        lines.append(f"TEMPLATE {_quoted(template)}")
    elif chat_template:
        lines.append("# the chat template could not be expressed as an Ollama TEMPLATE; Ollama reads the one "
                     "inside the GGUF (tokenizer.chat_template) when it recognises it")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f'PARAMETER stop "{t}"' for t in stop_tokens(chat_template, eos)]
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_file: str) -> Path:
    """Write ``folder/Modelfile`` from the folder's chat template and EOS token (tokenizer files)."""
    from services.workspace import read_json

    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    tcfg = read_json(folder / "tokenizer_config.json", {}) or {}
    template = template or (tcfg.get("chat_template") if isinstance(tcfg.get("chat_template"), str) else None)
    eos = tcfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    path = folder / "Modelfile"
    path.write_text(modelfile(gguf_file, template, eos), encoding="utf-8")
    return path


def ollama_name(name: str) -> str:
    """The name to ``ollama create`` a published model under (Ollama's names are lower case)."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


def lmstudio_target(models_dir: Path, name: str, gguf_file: str) -> Path:
    """Where a GGUF goes in an LM Studio models folder: ``MODELS/forgellm/NAME/FILE``."""
    return Path(models_dir).expanduser() / LMSTUDIO_PUBLISHER / name / gguf_file


def place_in_lmstudio(gguf_path: Path, models_dir: Path, name: str, overwrite: bool = False) -> Path:
    """Hard-link (else copy) ``gguf_path`` into the LM Studio models folder; return the new file's path."""
    target = lmstudio_target(models_dir, name, gguf_path.name)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; overwrite replaces it")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(gguf_path, tmp)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copy2(gguf_path, tmp)
    os.replace(tmp, target)
    return target


def use_section(name: str, folder: str, mode: str, handoff: dict[str, Any] | None) -> list[str]:
    """The model card's "Use" section (markdown lines): the commands of each tool for this export."""
    prompt = (['messages = [{"role": "user", "content": "Hello!"}]',
               "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)"]
              if mode == "ift" else ['prompt = "Once upon a time"'])
    out = ["## Use", "", "**mlx-lm** (this folder):", "", "```python", "import os", "",
           "from mlx_lm import generate, load", "",
           f'model, tokenizer = load(os.path.expanduser("{folder}"))', *prompt,
           "print(generate(model, tokenizer, prompt=prompt, max_tokens=128))", "```", "",
           "```bash", f'mlx_lm.generate --model "{folder}" --prompt "Hello!"', "```", ""]
    if not handoff or not handoff.get("gguf"):
        return out
    gguf_file = f"{folder}/{handoff['gguf']}"
    llama = (f'llama-cli -m "{gguf_file}" -cnv' if mode == "ift"
             else f'llama-cli -m "{gguf_file}" -p "Once upon a time" -n 64')
    out += ["**llama.cpp**:", "", "```bash", llama, f'llama-server -m "{gguf_file}" --port 8080', "```", ""]
    if handoff.get("modelfile"):
        out += ["**Ollama** (the `Modelfile` in this folder names the GGUF, the chat template and its stop "
                "tokens):", "", "```bash", f'cd "{folder}"', f"ollama create {ollama_name(name)} -f Modelfile",
                f"ollama run {ollama_name(name)}", "```", ""]
    placed = handoff.get("lmstudio")
    key = f"{LMSTUDIO_PUBLISHER}/{name}"
    if placed:
        out += [f"**LM Studio**: placed in its models folder as `{placed}`; it is listed as `{key}`.", "",
                "```bash", f"lms load {key}", "```", ""]
    else:
        out += ["**LM Studio**: import the GGUF into its models folder (or publish with an LM Studio models "
                "folder):", "", "```bash", f'lms import "{gguf_file}"', "```", ""]
    return out
