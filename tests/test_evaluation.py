"""Evaluation: suite files and checks, suites at every checkpoint of a run, best_by/early stopping by a suite,
lm-eval without fusing (equal to mlx_lm.evaluate on the fused model), one base for every checkpoint, perplexity."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import base_config, write_jsonl

from app.cli import main as cli_main
from services.evaluation import results
from services.evaluation.suites import SuiteError, load_suite, parse_suite_text, score_case
from services.evaluation.tasks import TaskError, task_spec
from services.inference.service import ModelService
from services.training.manager import RunManager
from services.workspace import Workspace

SAMPLE_TASKS = Path(__file__).resolve().parent.parent / "configs" / "evals" / "tasks" / "forge_sample"
QA = [("cat", "the cat eats an apple."), ("dog dog dog", "the dog sees the ball."),
      ("baker bakes", "the baker bakes the bread."), ("bird finds water", "the bird finds some water.")]


def answers_suite(path: Path, min_pass_rate: float = 0.9) -> Path:
    path.write_text(f"name: answers\nmin_pass_rate: {min_pass_rate}\nsampling: {{max_tokens: 12}}\ncases:\n" + "".join(
        f"  - prompt: {json.dumps(q)}\n    checks: [{{contains: {json.dumps(a)}}}]\n" for q, a in QA))
    return path


# ----------------------------------------------------------------------------------------- suite files


BAD = [
    ("cases:\n  - id: a\n    checks: [{contains: x}]\n", 2, "missing prompt"),
    ("cases:\n  - prompt: hi\n    checks: [{contains: x}]\n  - prompt: yo\n    checks: [{sounds_like: x}]\n", 4,
     "unknown check 'sounds_like'"),
    ("cases:\n  - prompt: hi\n    checks:\n      - regex: '(unclosed'\n", 2, "invalid regex"),
    ("cases:\n  - prompt: hi\n    checks: [{json: {type: 12}}]\n", 2, "invalid JSON schema"),
    ("", 1, "empty"),
    ("cases: [\n", 2, "not valid YAML"),
    ("batch_size: 0\ncases:\n  - prompt: hi\n    checks: [{exact: x}]\n", 1, "batch_size must be"),
]


@pytest.mark.parametrize(("text", "line", "reason"), BAD)
def test_bad_yaml_suite_is_refused_with_file_and_line(tmp_path, text, line, reason):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and reason in str(e.value), str(e.value)


def test_bad_jsonl_suite_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"suite": {"min_pass_rate": 0.5}}\n{"prompt": "a", "checks": [{"exact": "b"}]}\n\n'
                    '{"prompt": "c", "checks": [{"choice": []}]}\n')
    with pytest.raises(SuiteError, match=rf"^{path}:4: check choice needs a non-empty list"):
        load_suite(path)
    path.write_text('{"prompt": "a", "checks": [{"exact": "b"}]}\n{"prompt": "a", oops}\n')
    with pytest.raises(SuiteError, match=rf"^{path}:2: invalid JSON at column 17: Expecting property name"):
        load_suite(path)


def test_checks_score_an_output():
    suite = parse_suite_text("cases:\n  - prompt: p\n    checks:\n      - contains: Paris\n      - not_contains: Rome\n"
                             "      - regex: '^The'\n      - max_tokens: 5\n  - prompt: q\n    checks:\n"
                             "      - json: {type: object, required: [a]}\n  - prompt: r\n"
                             "    checks: [{choice: ['yes', 'no']}, {exact: 'yes'}]\n")
    a, j, c = suite.cases
    assert score_case(a, "The capital is Paris", 4)["passed"]
    verdict = score_case(a, "The capital is Rome, not Paris", 7)
    assert not verdict["passed"] and [x["passed"] for x in verdict["checks"]] == [True, False, True, False]
    assert score_case(j, '```json\n{"a": 1}\n```', 3)["passed"]
    assert "schema" in score_case(j, '{"b": 1}', 3)["checks"][0]["why"]
    assert score_case(c, " yes\n", 1)["passed"] and not score_case(c, "maybe", 1)["passed"]
    assert parse_suite_text(suite.to_yaml()).to_dict() == suite.to_dict()  # export / import round trip


def test_a_task_folder_lm_eval_cannot_load_gives_its_reason_in_one_line(tmp_path):
    from services.evaluation.harness import load_tasks

    (tmp_path / "broken.yaml").write_text("task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                          "    test: missing.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
                                          "doc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n")
    with pytest.raises(TaskError) as e:
        load_tasks(task_spec("broken", tmp_path))
    assert "\n" not in str(e.value) and "lm-eval cannot load broken" in str(e.value) and "missing.jsonl" in str(e.value)
    with pytest.raises(TaskError, match="no task named nope"):
        load_tasks(task_spec("nope", tmp_path))


# ----------------------------------------------------------------------------------------- during training


def test_a_run_learning_fixed_answers_moves_the_pass_rate_and_best_by_follows_the_eval_table(tmp_path, tiny_model):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows * 8)
    write_jsonl(tmp_path / "data" / "valid.jsonl", rows)
    suite = answers_suite(tmp_path / "answers.yaml")
    manager = RunManager(Workspace.resolve(tmp_path / "ws"))
    cfg = base_config(tiny_model, tmp_path / "data", mode="ift", fine_tune_type="full", optimizer="adam",
                      iters=150, save_every=30, steps_per_eval=30, learning_rate=4e-3,
                      lr_schedule={"name": "cosine_decay", "arguments": [4e-3, 150]},
                      eval={"suites": [str(suite)], "every": "checkpoint"}, best_by="eval:answers",
                      early_stopping={"by": "eval:answers", "patience": 2})
    folder = manager.launch(cfg)
    info = manager.wait(folder.id, timeout=600)
    assert info["status"] == "early-stopped", info.get("reason")
    assert "eval:answers" in info["reason"]
    records = results.read(folder)
    table = results.table(records)
    print("\n".join(f"{r['label']:>28}  answers {r['answers']:.2f}" for r in table))
    assert table[0]["label"] == "base" and table[0]["answers"] <= 0.1
    last = table[-1]
    assert last["iteration"] == max(folder.checkpoint_iterations()) and last["answers"] >= 0.9
    top = max(r["answers"] for r in table[1:])
    assert info["best"]["iteration"] == next(r["iteration"] for r in table[1:] if r["answers"] == top)
    assert info["best"]["by"] == "eval:answers"
    # patience 2: the two checkpoints after the best did not improve on it
    assert last["iteration"] == info["best"]["iteration"] + 60
    assert cli_main(["--workspace", str(manager.workspace.root), "eval", f"{folder.id}@{last['iteration']}",
                     "--suite", str(suite)]) == 0


def test_keep_checkpoints_never_removes_the_checkpoint_best_by_the_eval_table(tmp_path, tiny_model):
    """A suite that learning the answers makes fail ("forgets": the output must not hold the trained answer) is
    best at the first checkpoint, while validation loss is best at the last: rotation to 1 kept checkpoint must
    keep both the last and the eval table's best."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows * 8)
    write_jsonl(tmp_path / "data" / "valid.jsonl", rows)
    suite = tmp_path / "forgets.yaml"
    suite.write_text("name: forgets\nsampling: {max_tokens: 12}\ncases:\n" + "".join(
        f"  - prompt: {json.dumps(q)}\n    checks: [{{not_contains: {json.dumps(a.split()[1])}}}]\n" for q, a in QA))
    manager = RunManager(Workspace.resolve(tmp_path / "ws"))
    cfg = base_config(tiny_model, tmp_path / "data", mode="ift", fine_tune_type="full", optimizer="adam",
                      iters=60, save_every=15, steps_per_eval=15, learning_rate=4e-3, keep_checkpoints=1,
                      eval={"suites": [str(suite)]}, best_by="eval:forgets")
    folder = manager.launch(cfg)
    info = manager.wait(folder.id, timeout=600)
    assert info["status"] == "completed", info.get("reason")
    records = results.read(folder)
    print("\n".join(f"{r['label']:>28}  forgets {r['forgets']:.2f}" for r in results.table(records)))
    top = results.best(records, "forgets")
    assert top is not None and top["iteration"] < 60  # the case this test is about: not among the last kept
    assert info["best"]["iteration"] == top["iteration"] and info["best"]["by"] == "eval:forgets"
    assert folder.checkpoint_iterations() == [top["iteration"], 60]  # the eval best survived the rotation
    assert [c["iteration"] for c in info["checkpoints"]] == [top["iteration"], 60]
    assert (folder.checkpoint_dir(top["iteration"]) / "adapters.safetensors").is_file()


# ----------------------------------------------------------------------------------------- in the model worker


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, chat_data):
    """A LoRA run with 5 checkpoints."""
    ws = Workspace.resolve(tmp_path_factory.mktemp("evals") / "ws")
    manager = RunManager(ws)
    folder = manager.launch(base_config(tiny_model, chat_data, mode="ift", iters=25, save_every=5, steps_per_eval=25,
                                        learning_rate=5e-3))
    info = manager.wait(folder.id, timeout=300)
    assert info["status"] == "completed", info.get("reason")
    return ws, folder


@pytest.fixture(scope="module")
def service():
    svc = ModelService()
    yield svc
    svc.unload()


def test_base_and_five_checkpoints_share_one_base_and_perplexity_equals_mlx_lm(lora_run, service, tiny_model,
                                                                                 chat_data, tmp_path):
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import evaluate
    from mlx_lm.utils import load

    _, folder = lora_run
    ckpts = [str(folder.checkpoint_dir(i)) for i in folder.checkpoint_iterations()]
    assert len(ckpts) == 5
    suites = [{"name": "ppl", "kind": "perplexity", "dataset": str(chat_data / "valid.jsonl"), "batch_size": 4,
               "max_seq_length": 128},
              {"name": "says", "cases": [{"prompt": "the cat", "checks": [{"contains": "the"}]}]}]
    one = service.evaluate(tiny_model, [ckpts[0]], suites)
    pid = service.worker_pid
    six = service.evaluate(tiny_model, [None, *ckpts], suites)
    assert service.worker_pid == pid
    adapter_bytes = sum(Path(c, "adapters.safetensors").stat().st_size for c in ckpts)
    base_bytes = sum(p.stat().st_size for p in Path(tiny_model).glob("*.safetensors"))
    grew = (six["memory"]["mlx_active_gb"] - one["memory"]["mlx_active_gb"]) * 1e9
    print(f"\nMLX active memory: {one['memory']['mlx_active_gb'] * 1e3:.2f} MB after 1 checkpoint, "
          f"{six['memory']['mlx_active_gb'] * 1e3:.2f} MB after base + 5 (grew {grew / 1e6:.3f} MB; adapters "
          f"{adapter_bytes / 1e6:.3f} MB, base weights {base_bytes / 1e6:.3f} MB); worker RSS "
          f"{six['memory']['rss_gb'] * 1e3:.0f} MB")
    assert grew <= adapter_bytes + base_bytes / 4  # a second copy of the base would not fit
    ppl = [r for r in six["records"] if r["name"] == "ppl"]
    assert [r["label"] for r in ppl] == ["base"] + [f"{folder.id}@{i}" for i in folder.checkpoint_iterations()]
    for rec in ppl[1:]:
        adapter = tmp_path / Path(rec["target"]).name
        adapter.mkdir()
        shutil.copy(folder.path / "adapter_config.json", adapter)
        shutil.copy(Path(rec["target"]) / "adapters.safetensors", adapter)
        model, tok = load(str(tiny_model), adapter_path=str(adapter))
        rows = [json.loads(x) for x in (chat_data / "valid.jsonl").read_text().splitlines()]
        data = CacheDataset(create_dataset(rows, tok, type("A", (), {"mask_prompt": False})()))
        np.random.seed(0)
        loss = evaluate(model=model, dataset=data, batch_size=4, num_batches=-1, max_seq_length=128)
        assert abs(rec["metrics"]["perplexity"] - math.exp(loss)) <= 1e-6 * math.exp(loss), (rec, math.exp(loss))
        del model
        mx.clear_cache()


def test_lm_eval_on_a_checkpoint_equals_mlx_lm_evaluate_on_the_fused_model(lora_run, service, tiny_model, tmp_path):
    from mlx_lm.evaluate import MLXLM
    from mlx_lm.utils import load, save

    from services.evaluation.harness import run_tasks
    from services.publishing.fuse import apply_checkpoint, fuse

    _, folder = lora_run
    k = folder.checkpoint_iterations()[2]
    spec = task_spec("forge_sample_mc,forge_sample_gen", SAMPLE_TASKS, limit=6, num_fewshot=1, chat_template=False)
    ours = service.evaluate(tiny_model, [str(folder.checkpoint_dir(k))], [], spec)["records"]
    model, tok, config = load(str(tiny_model), return_config=True)
    apply_checkpoint(model, folder.checkpoint_dir(k))
    fuse(model)
    save(tmp_path / "fused", str(tiny_model), model, tok, config, donate_model=False)
    reference = run_tasks(MLXLM(str(tmp_path / "fused"), use_chat_template=False), spec)
    for mine, ref in zip(ours, reference, strict=True):
        assert mine["name"] == ref["name"] and len(mine["samples"]) == 6
        key = "acc" if mine["name"].endswith("_mc") else "exact_match"
        assert [s[key] for s in mine["samples"]] == [s[key] for s in ref["samples"]]
        if key == "acc":  # the chosen answer, sample by sample
            pick = [max(range(len(s["filtered_resps"])), key=s["filtered_resps"].__getitem__) for s in mine["samples"]]
            assert pick == [max(range(len(s["filtered_resps"])), key=s["filtered_resps"].__getitem__)
                            for s in ref["samples"]]
        else:
            assert [s["filtered_resps"] for s in mine["samples"]] == [s["filtered_resps"] for s in ref["samples"]]
        assert mine["metrics"][key] == ref["metrics"][key]
        print(f"\n{mine['name']} @ {k}: {key} {mine['metrics'][key]:.3f} (ours) = {ref['metrics'][key]:.3f} (fused)")


def test_cli_eval_prints_json_and_exits_1_below_min_pass_rate(lora_run, tmp_path, capsys):
    ws, folder = lora_run
    strict = answers_suite(tmp_path / "strict.yaml", min_pass_rate=0.5)
    code = cli_main(["--workspace", str(ws.root), "eval", folder.id, "--suite", str(strict), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and {r["label"] for r in out["records"]} >= {"base", f"{folder.id}@25"}
    assert out["failures"] and "min_pass_rate" in out["failures"][0]
    assert results.read(folder)  # recorded in the run's evals.jsonl
    easy = tmp_path / "easy.jsonl"
    easy.write_text('{"suite": {"name": "easy", "min_pass_rate": 0.0}}\n'
                    '{"prompt": "x", "checks": [{"max_tokens": 64}]}\n')
    assert cli_main(["--workspace", str(ws.root), "eval", f"{folder.id}@5", "--suite", str(easy)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("cases:\n  - prompt: hi\n    checks: [{nope: 1}]\n")
    assert cli_main(["--workspace", str(ws.root), "eval", folder.id, "--suite", str(bad)]) == 2
    assert f"{bad}:2: unknown check 'nope'" in capsys.readouterr().err
